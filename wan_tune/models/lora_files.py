"""LoRA files in the keys other tools write, read back as {diffusers module: (A, B, scale)}.

One reader for every layout a studio's last LoRA may be in (`adapter.init_from`):
- comfyui / original keys, as wan-tune and ComfyUI write them: `diffusion_model.blocks.0.self_attn.q
  .lora_down.weight`, `.lora_up.weight`, `.alpha`; ai-toolkit writes the same names with `lora_A` /
  `lora_B`;
- kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`;
- diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight`, alpha in the
  `lora_adapter_metadata` header (as diffusers' `save_lora_weights` writes it), else scale 1.
A module may be spelled the diffusers way or the original way, dotted or with underscores: each
key is matched against the model's own module names, so nothing is guessed from underscores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .keymap import UnmappedKeyError, to_original

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "lora_unet_")
# key ending -> 0 (down / A) or 1 (up / B)
PARTS = {".lora_down.weight": 0, ".lora_A.weight": 0, ".lora_up.weight": 1, ".lora_B.weight": 1}


class LoraFileError(ValueError):
    """The file cannot start this run's adapter; the message names the file and the first key at fault."""


def spellings(modules) -> dict[str, str]:
    """Every way a file may name each module (diffusers or original, dotted or underscored) -> its diffusers name."""
    out = {}
    for m in modules:
        try:
            original = to_original(m)
        except UnmappedKeyError:  # a module only diffusers names
            original = m
        # A face adapter's key and value are one original layer (linear1_kv): named by its key layer.
        fused_value = m.startswith("face_adapter.") and m.endswith(".to_v")
        for name in (m,) if fused_value else (m, original):
            out[name] = out[name.replace(".", "_")] = m
    return out


def read_lora(path: str | Path, modules) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, str]]:
    """({diffusers module: (A [r, in], B [out, r], scale)}, {module: the file's key for its A}) of a
    LoRA file; `modules`: the model's module names (diffusers). scale = alpha / rank from the
    module's `.alpha`, else the PEFT header's lora_alpha / r, else 1 (as ComfyUI and diffusers read it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise LoraFileError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:160]})") from None
    names = spellings(modules)
    parts: dict[str, dict] = {}
    keys: dict[str, str] = {}
    for key in sorted(tensors):
        rest = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        ending = next((e for e in (*PARTS, ".alpha") if rest.endswith(e)), None)
        if ending is None:
            raise LoraFileError(f"{path}: {key} is not part of a LoRA pair (lora_down/lora_up, lora_A/lora_B, alpha): "
                                "LoKr, LoHa, DoRA and full-weight files cannot start a LoRA run")
        spelled = rest[: -len(ending)]
        module = names.get(spelled)
        if module is None:
            raise LoraFileError(f"{path}: {key} names no module of this model ({spelled}): a LoRA of another model?")
        slot = "alpha" if ending == ".alpha" else PARTS[ending]
        parts.setdefault(module, {})[slot] = tensors[key]
        if slot == 0:
            keys[module] = key
    default_scale = _header_scale(header)
    pairs = {}
    for module, p in sorted(parts.items()):
        if 0 not in p or 1 not in p:
            raise LoraFileError(f"{path}: {module} has {'no down/A' if 0 not in p else 'no up/B'} matrix")
        rank = p[0].shape[0]
        scale = float(p["alpha"]) / rank if "alpha" in p else default_scale.get(rank, 1.0)
        if "linear1_kv" in keys[module]:  # a face adapter's fused key/value (original keys): its two layers
            from .animate_keys import split_fused_kv

            for layer, pair in zip((module, module.removesuffix("to_k") + "to_v"), split_fused_kv(p[0], p[1])):
                if pair is not None:
                    pairs[layer], keys[layer] = (*pair, scale), keys[module]
            continue
        pairs[module] = (p[0], p[1], scale)
    if not pairs:
        raise LoraFileError(f"{path} holds no LoRA pairs")
    return pairs, keys


def _header_scale(header: dict[str, str]) -> dict[int, float]:
    """{rank: lora_alpha / rank} from diffusers' `lora_adapter_metadata` (PEFT-key files), else {}."""
    try:
        config = json.loads(header.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return {}
    config = {k.split(".", 1)[-1]: v for k, v in config.items()}  # `transformer.r` -> `r`
    r, alpha = config.get("r"), config.get("lora_alpha")
    return {int(r): float(alpha) / int(r)} if isinstance(r, int) and isinstance(alpha, (int, float)) else {}
