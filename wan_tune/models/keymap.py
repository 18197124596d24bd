"""Names of Wan transformer weights in the original (Wan / ComfyUI) layout and in diffusers'.

diffusers converts original -> diffusers when it loads a single file; wan-tune also needs the
way back, to write original-key files (full-model export, ComfyUI LoRAs). One table serves both
directions so they cannot drift apart; a test checks it against diffusers' own converter.
"""

from __future__ import annotations

import re

# (diffusers name, original name) for module / parameter paths; `{i}` is a block index.
# Parameters that are not `.weight`/`.bias` of a module (the modulation tables) are listed whole.
_BLOCK_PAIRS: list[tuple[str, str]] = [
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
    # Wan2.1 I2V: the image branch of cross-attention.
    ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    # Only the cross-attention norm has weights; diffusers calls it norm2, Wan norm3.
    ("norm2", "norm3"),
    ("scale_shift_table", "modulation"),
]
# VACE (WanVACETransformer3DModel): its blocks are Wan blocks; the first also projects the context
# in (original `before_proj`), each projects its hint out (`after_proj`).
_VACE_PAIRS = [("proj_in", "before_proj"), ("proj_out", "after_proj")]

_PAIRS: list[tuple[str, str]] = [
    *((f"blocks.{{i}}.{d}", f"blocks.{{i}}.{o}") for d, o in _BLOCK_PAIRS),
    *((f"vace_blocks.{{i}}.{d}", f"vace_blocks.{{i}}.{o}") for d, o in _BLOCK_PAIRS + _VACE_PAIRS),
    ("vace_patch_embedding", "vace_patch_embedding"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),  # FLF2V: first vs last frame's tokens
    ("patch_embedding", "patch_embedding"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
]

_SUFFIX = r"(?P<suffix>\.(?:weight|bias))?"


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + _SUFFIX)


_TO_ORIGINAL = [(_compile(d), o) for d, o in _PAIRS]
_TO_DIFFUSERS = [(_compile(o), d) for d, o in _PAIRS]


class UnmappedKeyError(KeyError):
    pass


def _convert(name: str, table: list[tuple[re.Pattern[str], str]], what: str) -> str:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m:
            out = template.replace("{i}", m.groupdict().get("i") or "")
            return out + (m.group("suffix") or "")
    raise UnmappedKeyError(f"no {what} name for Wan transformer key {name!r}")


def to_original(name: str) -> str:
    """diffusers name (module path or parameter key) -> original Wan name (a Wan2.2-Animate face
    adapter's layer: its original module, `linear1_kv` for both key and value)."""
    from .animate_keys import face_adapter_original

    return face_adapter_original(name) or _convert(name, _TO_ORIGINAL, "original")


def to_diffusers(name: str) -> str:
    """Original Wan name (module path or parameter key) -> diffusers name. A face adapter's fused
    `linear1_kv` is two diffusers layers: refused here (export/adapters.py splits its LoRA)."""
    from .animate_keys import face_adapter_diffusers

    layers = face_adapter_diffusers(name)
    if len(layers) > 1:
        raise UnmappedKeyError(f"{name!r} is {' and '.join(layers)} in diffusers: split it first")
    return layers[0] if layers else _convert(name, _TO_DIFFUSERS, "diffusers")


def state_dict_to_original(state_dict: dict) -> dict:
    """A diffusers `WanTransformer3DModel` state dict with original (Wan / ComfyUI) keys (Animate's
    own weights renamed, reshaped and fused as the original holds them: models/animate_keys.py)."""
    from .animate_keys import is_animate_key, to_original_animate

    return {**{to_original(k): v for k, v in state_dict.items() if not is_animate_key(k)},
            **to_original_animate(state_dict)}
