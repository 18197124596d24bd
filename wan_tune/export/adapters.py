"""LoRA adapters in the formats other tools load (DESIGN.md section 6).

All three start from the same thing: per diffusers module name, the pair (A [r, in], B [out, r])
and alpha. Only key names and where alpha lives differ:

- comfyui (original keys): `diffusion_model.<original module>.lora_down.weight` / `.lora_up.weight`
  / `.alpha`. ComfyUI and diffusers both load it. Outside the transformer blocks (a target such as
  `condition_embedder.time_proj`) there is no `.alpha`: diffusers' converter reads alpha only inside
  the blocks and refuses the file otherwise, so alpha/rank is folded into `lora_up` there (ComfyUI
  takes a missing alpha as scale 1, diffusers too: both apply the same update).
- diffusers (PEFT keys): `transformer.<module>.lora_A.weight` / `.lora_B.weight`; alpha only in
  the `lora_adapter_metadata` header (diffusers' own convention), so diffusers alone loads it.
- kohya / musubi: `lora_unet_<original module with _>.lora_down.weight` ... + `.alpha`. diffusers'
  converter for it needs every block to carry q,k,v,o (self and cross), ffn.0 and ffn.2, and
  nothing outside the blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..models.keymap import to_original

FORMATS = ("comfyui", "diffusers", "kohya")


class ExportError(RuntimeError):
    """An export cannot be written as asked; the message says why."""


@dataclass
class Adapter:
    """A trained LoRA: module -> (A, B), plus its config."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    peft_config: dict
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    """DoRA: each module's learned row magnitudes (peft's lora_magnitude_vector)."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        return list(self.pairs)

    def shape(self, module: str) -> tuple[int, int]:
        """[out, in] of the weight the module's update is added to."""
        a, b = self.pairs[module]
        return b.shape[0], a.shape[1]

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.pairs[module]
        return self.scale * (b.float() @ a.float())


def adapter_from_trainable(weights: dict[str, torch.Tensor], rank: int, alpha: float, peft_config: dict,
                           dora: bool = False) -> Adapter:
    """From a checkpoint's trainable.safetensors (`<module>.lora_A.default.weight` names; DoRA's
    `<module>.lora_magnitude_vector.default.weight` too)."""
    pairs: dict[str, list] = {}
    magnitudes = {name.split(".lora_magnitude_vector.")[0]: t for name, t in weights.items() if ".lora_magnitude_vector." in name}
    if dora and not magnitudes:
        raise ExportError("adapter.method=dora, but the checkpoint holds no DoRA magnitudes: it was trained as a plain LoRA")
    for name, tensor in weights.items():
        for i, part in enumerate((".lora_A.", ".lora_B.")):
            if part in name:
                module = name.split(part)[0]
                pairs.setdefault(module, [None, None])[i] = tensor
    broken = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if not pairs or broken:
        raise ExportError(f"no complete LoRA pairs in the checkpoint (incomplete: {listing(broken)})")
    bad = [m for m, ab in pairs.items() if not all(torch.isfinite(t).all() for t in ab)]
    if bad:
        raise ExportError(f"the LoRA holds NaN or infinite values in {listing(bad)}: the run diverged before this "
                          "checkpoint; export an earlier one")
    return Adapter({m: (a, b) for m, (a, b) in sorted(pairs.items())}, rank, alpha, peft_config, magnitudes)


def listing(names: list[str], first: int = 3) -> str:
    """`a, b, c and 4 more`: names in a one-line message, never silently cut."""
    shown = ", ".join(names[:first])
    return f"{shown} and {len(names) - first} more" if len(names) > first else shown


def _alpha(adapter: Adapter) -> torch.Tensor:
    return torch.tensor(float(adapter.alpha), dtype=torch.float32)


def in_blocks(module: str) -> bool:
    return module.startswith("blocks.")


def comfyui_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in original_pairs(adapter).items():
        key = f"diffusion_model.{to_original(module)}"
        out[f"{key}.lora_down.weight"] = a
        if in_blocks(module):
            out[f"{key}.lora_up.weight"], out[f"{key}.alpha"] = b, _alpha(adapter)
        else:  # no .alpha outside the blocks (see the module docstring): the scale goes into B
            out[f"{key}.lora_up.weight"] = (b.float() * adapter.scale).to(b.dtype)
    return out


def original_pairs(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's pairs by the original model's layers: a Wan2.2-Animate face adapter's key and
    value LoRAs become one pair of its fused `linear1_kv` (key rows first), the downs stacked and the
    ups block-diagonal, so up @ down is the two updates stacked (a rank-2r pair; a layer not trained
    gives zeros). Named by its key layer (to_original maps both to `linear1_kv`)."""
    out = {m: p for m, p in adapter.pairs.items() if not _face_kv(m)}
    for prefix in sorted({m.rsplit(".", 1)[0] for m in adapter.pairs if _face_kv(m)}):
        pairs = [adapter.pairs.get(f"{prefix}.to_k"), adapter.pairs.get(f"{prefix}.to_v")]
        a0, b0 = next(p for p in pairs if p is not None)
        filled = [p if p is not None else (torch.zeros_like(a0), torch.zeros_like(b0)) for p in pairs]
        out[f"{prefix}.to_k"] = (torch.cat([a for a, _ in filled]), torch.block_diag(*(b for _, b in filled)))
    return out


def _face_kv(module: str) -> bool:
    return module.startswith("face_adapter.") and module.endswith((".to_k", ".to_v"))


def read_original(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """An original-key (ComfyUI) LoRA as {diffusers module: (down, up, scale)}: scale = alpha / rank,
    1 without an alpha (as ComfyUI and diffusers read it)."""
    from ..models.animate_keys import face_adapter_diffusers, split_fused_kv
    from ..models.keymap import to_diffusers

    parts: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix("diffusion_model.")
        module, part = (name.removesuffix(".alpha"), "alpha") if name.endswith(".alpha") else name.split(".lora_", 1)
        parts.setdefault(module, {})[part] = tensor
    out = {}
    for module, p in parts.items():
        scale = float(p["alpha"]) / p["down.weight"].shape[0] if "alpha" in p else 1.0
        layers = face_adapter_diffusers(module)
        if len(layers) == 2:  # a face adapter's fused key/value: its key's and value's pairs
            for layer, pair in zip(layers, split_fused_kv(p["down.weight"], p["up.weight"])):
                if pair is not None:
                    out[layer] = (*pair, scale)
        else:
            out[to_diffusers(module)] = (p["down.weight"], p["up.weight"], scale)
    return out


def peft_from_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-key LoRA in diffusers' own keys (`transformer.<module>.lora_A/B.weight`, the scale
    folded into B): what `load_lora_weights` takes where its converter cannot read the original
    (VACE blocks, diffusers 0.42)."""
    out = {}
    for module, (down, up, scale) in read_original(state_dict).items():
        out[f"transformer.{module}.lora_A.weight"] = down
        out[f"transformer.{module}.lora_B.weight"] = (up.float() * scale).to(up.dtype)
    return out


def diffusers_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in adapter.pairs.items():
        out[f"transformer.{module}.lora_A.weight"], out[f"transformer.{module}.lora_B.weight"] = a, b
        if module in adapter.magnitudes:  # DoRA, as peft saves it (diffusers' loader turns use_dora on for it)
            out[f"transformer.{module}.lora_magnitude_vector"] = adapter.magnitudes[module]
    return out


def diffusers_metadata(adapter: Adapter) -> dict[str, str]:
    """The `lora_adapter_metadata` header as diffusers' `save_lora_weights` writes it (prefixed)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    config = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in adapter.peft_config.items()}
    return {LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True, default=str)}


def kohya_problems(adapter: Adapter, is_i2v: bool) -> list[str]:
    """What diffusers' kohya/musubi converter needs and this adapter lacks."""
    blocks = sorted({int(m.split(".")[1]) for m in adapter.pairs if m.startswith("blocks.")})
    need = [f"attn{n}.{p}" for n in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + ["ffn.net.0.proj", "ffn.net.2"]
    if is_i2v and any("add_k_proj" in m for m in adapter.pairs):
        need += ["attn2.add_k_proj", "attn2.add_v_proj"]
    missing = sorted({n for i in range(max(blocks, default=-1) + 1) for n in need if f"blocks.{i}.{n}" not in adapter.pairs})
    return missing if blocks else ["no transformer blocks"]


def kohya_outside_blocks(modules) -> list[str]:
    """Targets diffusers' kohya/musubi converter cannot take (it expects `blocks_N` in every key;
    VACE's `vace_blocks` are not among them)."""
    return sorted(m for m in modules if not in_blocks(m))


def kohya_state_dict(adapter: Adapter, is_i2v: bool) -> dict[str, torch.Tensor]:
    outside = kohya_outside_blocks(adapter.pairs)
    if outside:
        raise ExportError(
            f"kohya format refused: it cannot carry adapters outside the transformer blocks ({listing(outside)}); "
            "diffusers' kohya/musubi loader fails on them. Export --format comfyui or diffusers (both load in diffusers; "
            "comfyui also in ComfyUI)."
        )
    missing = kohya_problems(adapter, is_i2v)
    if missing:
        raise ExportError(
            "kohya format refused: diffusers' kohya/musubi loader needs every block to carry q,k,v,o of self- and "
            f"cross-attention and ffn.0/ffn.2, and this adapter lacks {listing(missing, 6)}. Train with "
            "adapter.targets=[attention, ffn], or export --format comfyui (loads in ComfyUI and diffusers)."
        )
    out = {}
    for module, (a, b) in adapter.pairs.items():
        key = "lora_unet_" + to_original(module).replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"], out[f"{key}.alpha"] = a, b, _alpha(adapter)
    return out
