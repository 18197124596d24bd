"""Wan2.2-Animate's own weights (pose patch embedding, motion encoder, face encoder, face adapters)
under their original (Wan2.2 / ComfyUI) names: the way back from diffusers' single-file converter
(`convert_wan_transformer_to_diffusers`), which renames them, reshapes the motion encoder's
activation biases to vectors and splits each face adapter's fused key/value projection in two.

`to_original_animate` undoes all three; a test writes a tiny Animate model this way and loads it
back through diffusers' own converter, weights equal.
"""

from __future__ import annotations

import re

import torch

ANIMATE_PREFIXES = ("pose_patch_embedding.", "motion_encoder.", "face_encoder.", "face_adapter.")
_ENC = "motion_encoder.enc.net_app.convs"
# diffusers' res block i is the original conv layer i + 1 (layer 0 is conv_in, the last conv_out: 8 at 512 px).
_RES = {"conv1.weight": "conv1.0.weight", "conv1.act_fn.bias": "conv1.1.bias", "conv2.weight": "conv2.1.weight",
        "conv2.act_fn.bias": "conv2.2.bias", "conv_skip.weight": "skip.1.weight"}
_FACE_ENCODER = {"conv1_local": "conv1_local.conv", "conv2": "conv2.conv", "conv3": "conv3.conv"}
_ADAPTER = {"to_q": "linear1_q", "to_out": "linear2", "norm_q": "q_norm", "norm_k": "k_norm"}


def is_animate_key(name: str) -> bool:
    return name.startswith(ANIMATE_PREFIXES)


def face_adapter_original(module: str) -> str | None:
    """A face adapter layer's original module name (a LoRA target: to_q, to_k, to_v, to_out), None for
    other names. Key and value are one original layer, `linear1_kv` (key rows first)."""
    m = re.fullmatch(r"face_adapter\.(\d+)\.(to_q|to_k|to_v|to_out)", module)
    if not m:
        return None
    part = "linear1_kv" if m.group(2) in ("to_k", "to_v") else _ADAPTER[m.group(2)]
    return f"face_adapter.fuser_blocks.{m.group(1)}.{part}"


def split_fused_kv(down: torch.Tensor, up: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """A LoRA pair (down [r, in], up [2 out, r]) of a face adapter's fused `linear1_kv` as the key's
    and the value's pairs, each with its rows of up (key first): exact for any pair. Where up is
    block-diagonal in halves (wan-tune's own export: two rank-r/2 pairs stacked), each layer gets its
    own half of the rank; else each takes the whole down. None for a layer whose rows are all zero
    (wan-tune fills an untrained one so). Copies: safetensors refuses shared storage."""
    rows, half = up.chunk(2), down.shape[0] // 2
    if down.shape[0] % 2 == 0 and not rows[0][:, half:].any() and not rows[1][:, :half].any():
        pairs = [(down[:half], rows[0][:, :half]), (down[half:], rows[1][:, half:])]
    else:
        pairs = [(down, rows[0]), (down, rows[1])]
    return [(a.clone(), b.clone()) if b.any() else None for a, b in pairs]


def face_adapter_diffusers(original: str) -> list[str]:
    """The diffusers layers of an original face adapter module (two for `linear1_kv`: key, value); []
    for other names."""
    m = re.fullmatch(r"face_adapter\.fuser_blocks\.(\d+)\.(linear1_q|linear1_kv|linear2)", original)
    if not m:
        return []
    parts = {"linear1_q": ["to_q"], "linear1_kv": ["to_k", "to_v"], "linear2": ["to_out"]}[m.group(2)]
    return [f"face_adapter.{m.group(1)}.{p}" for p in parts]


def to_original_animate(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Animate-only entries of a diffusers state dict, under original names and shapes."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not is_animate_key(name) or re.search(r"face_adapter\.\d+\.to_v\.", name):
            continue
        m = re.fullmatch(r"face_adapter\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m:
            i, part, kind = m.groups()
            if part == "to_k":  # the original fuses key and value into one projection, key first
                t = torch.cat([t, state_dict[f"face_adapter.{i}.to_v.{kind}"]])
                out[f"face_adapter.fuser_blocks.{i}.linear1_kv.{kind}"] = t
            else:
                out[f"face_adapter.fuser_blocks.{i}.{_ADAPTER[part]}.{kind}"] = t
            continue
        out[_original_name(name)] = t.view(1, -1, 1, 1) if name.endswith("act_fn.bias") else t
    return out


def _original_name(name: str) -> str:
    if name == "motion_encoder.motion_synthesis_weight":
        return "motion_encoder.dec.direction.weight"
    if name.startswith("motion_encoder.conv_in."):
        return f"{_ENC}.0." + ("0.weight" if name.endswith("weight") else "1.bias")
    if name.startswith("motion_encoder.conv_out."):
        return f"{_ENC}.8.weight"
    m = re.fullmatch(r"motion_encoder\.res_blocks\.(\d+)\.(.+)", name)
    if m:
        return f"{_ENC}.{int(m.group(1)) + 1}.{_RES[m.group(2)]}"
    if name.startswith("motion_encoder.motion_network."):
        return name.replace("motion_encoder.motion_network.", "motion_encoder.enc.fc.")
    m = re.fullmatch(r"face_encoder\.(conv1_local|conv2|conv3)\.(weight|bias)", name)
    if m:
        return f"face_encoder.{_FACE_ENCODER[m.group(1)]}.{m.group(2)}"
    return name  # pose_patch_embedding, face_encoder.out_proj / padding_tokens: the same names
