"""LoHa and LoKr adapters (adapter.method: loha, lokr) in ComfyUI's keys, and read back.

peft trains them (LoHaConfig / LoKrConfig); ComfyUI's weight adapters load them
(comfy/weight_adapter/loha.py, lokr.py), under the original module names beside LoRA's:
- LoHa: `diffusion_model.<module>.hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `.alpha`.
  Both compute (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (ComfyUI's rank: hada_w1_b's rows).
- LoKr: `lokr_w1` (or `lokr_w1_a` / `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a` / `lokr_w2_b`).
  peft scales kron(w1, w2) by alpha / rank always; ComfyUI by alpha / rank only when a factor is
  split and by 1 when both are whole. So the file carries no alpha and the scale is folded into
  the first factor: both read the same update in every case.
diffusers' `load_lora_weights` and its kohya converter build LoRA pairs only, so these methods
export in the comfyui format alone (ComfyUI, and `wan-tune sample`, which merges them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.keymap import to_diffusers, to_original
from .adapters import ExportError, listing

PARTS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
PREFIX = "diffusion_model."


@dataclass
class Lycoris:
    """A trained LoHa or LoKr: module -> {peft's tensor name: tensor}."""

    method: str
    parts: dict[str, dict[str, torch.Tensor]]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        return list(self.parts)

    def shape(self, module: str) -> tuple[int, int]:
        """[out, in] of the weight the module's update is added to, from the factors' shapes (the
        update itself is built once, by the self-test)."""
        p = self.parts[module]
        if self.method == "loha":
            return p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1]
        (r1, c1), (r2, c2) = (_factor_shape(p, w) for w in ("lokr_w1", "lokr_w2"))
        return r1 * r2, c1 * c2

    def delta(self, module: str) -> torch.Tensor:
        """The update as peft computes it (its own functions), fp32 [out, in]."""
        p = {k: v.float() for k, v in self.parts[module].items()}
        if self.method == "loha":
            from peft.tuners.loha.layer import make_weight

            return make_weight(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], torch.tensor(self.scale))
        from peft.tuners.lokr.layer import make_kron

        return make_kron(_factor(p, "lokr_w1"), _factor(p, "lokr_w2"), self.scale)


def _factor(p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A LoKr factor: whole (`lokr_w1`), or the product of its split pair (`lokr_w1_a @ lokr_w1_b`)."""
    return p[name] if name in p else p[f"{name}_a"] @ p[f"{name}_b"]


def _factor_shape(p: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    return tuple(p[name].shape) if name in p else (p[f"{name}_a"].shape[0], p[f"{name}_b"].shape[1])


def lycoris_from_trainable(weights: dict[str, torch.Tensor], method: str, rank: int, alpha: float) -> Lycoris:
    """From a checkpoint's trainable.safetensors (`<module>.<part>.default` names)."""
    parts: dict[str, dict] = {}
    for name, tensor in weights.items():
        module, part, _ = name.rsplit(".", 2)
        if part not in PARTS[method]:
            raise ExportError(f"{name} is not part of a {method} adapter: the checkpoint was trained with another "
                              "adapter.method")
        parts.setdefault(module, {})[part] = tensor
    bad = [m for m, p in parts.items() if not all(torch.isfinite(t).all() for t in p.values())]
    if bad:
        raise ExportError(f"the adapter holds NaN or infinite values in {listing(bad)}: the run diverged before this "
                          "checkpoint; export an earlier one")
    return Lycoris(method, dict(sorted(parts.items())), rank, alpha)


def comfyui_lycoris_state_dict(adapter: Lycoris) -> dict[str, torch.Tensor]:
    out = {}
    for module, p in adapter.parts.items():
        key = PREFIX + to_original(module)
        if adapter.method == "loha":
            out.update({f"{key}.{name}": t for name, t in p.items()})
            out[f"{key}.alpha"] = torch.tensor(float(adapter.alpha))
            continue
        first = "lokr_w1" if "lokr_w1" in p else "lokr_w1_b"  # the scale goes into the first factor (see above)
        out.update({f"{key}.{name}": ((t.float() * adapter.scale).to(t.dtype) if name == first else t)
                    for name, t in p.items()})
    return out


def comfyui_updates(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{diffusers module: update} of a LoHa / LoKr file as ComfyUI's weight adapters compute it
    (alpha / rank where they read an alpha, else 1), fp32 [out, in]."""
    grouped: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        module, part = key.removeprefix(PREFIX).rsplit(".", 1)
        grouped.setdefault(module, {})[part] = tensor.float()
    out = {}
    for module, p in grouped.items():
        alpha = float(p["alpha"]) if "alpha" in p else None
        if "hada_w1_a" in p:
            scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
            out[to_diffusers(module)] = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * scale
            continue
        w1, w2 = _factor(p, "lokr_w1"), _factor(p, "lokr_w2")
        dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
        out[to_diffusers(module)] = torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim else 1.0)
    return out


def is_lycoris(keys) -> bool:
    """Whether a file's keys are LoHa / LoKr ones (which diffusers' loader does not take)."""
    return any(k.rsplit(".", 1)[-1].startswith(("hada_", "lokr_")) for k in keys)
