"""Names of Wan transformer weights in the original (Wan / ComfyUI) layout and in diffusers'.

diffusers converts original -> diffusers when it loads a single file; wan-tune also needs the
way back, to write original-key files (full-model export, ComfyUI LoRAs). One table serves both
directions so they cannot drift apart; a test checks it against diffusers' own converter.
"""

from __future__ import annotations

import re

# (diffusers name, original name) for module / parameter paths; `{i}` is a block index.
# Parameters that are not `.weight`/`.bias` of a module (the modulation tables) are listed whole.
_PAIRS: list[tuple[str, str]] = [
    ("blocks.{i}.attn1.to_q", "blocks.{i}.self_attn.q"),
    ("blocks.{i}.attn1.to_k", "blocks.{i}.self_attn.k"),
    ("blocks.{i}.attn1.to_v", "blocks.{i}.self_attn.v"),
    ("blocks.{i}.attn1.to_out.0", "blocks.{i}.self_attn.o"),
    ("blocks.{i}.attn1.norm_q", "blocks.{i}.self_attn.norm_q"),
    ("blocks.{i}.attn1.norm_k", "blocks.{i}.self_attn.norm_k"),
    ("blocks.{i}.attn2.to_q", "blocks.{i}.cross_attn.q"),
    ("blocks.{i}.attn2.to_k", "blocks.{i}.cross_attn.k"),
    ("blocks.{i}.attn2.to_v", "blocks.{i}.cross_attn.v"),
    ("blocks.{i}.attn2.to_out.0", "blocks.{i}.cross_attn.o"),
    ("blocks.{i}.attn2.norm_q", "blocks.{i}.cross_attn.norm_q"),
    ("blocks.{i}.attn2.norm_k", "blocks.{i}.cross_attn.norm_k"),
    # Wan2.1 I2V: the image branch of cross-attention.
    ("blocks.{i}.attn2.add_k_proj", "blocks.{i}.cross_attn.k_img"),
    ("blocks.{i}.attn2.add_v_proj", "blocks.{i}.cross_attn.v_img"),
    ("blocks.{i}.attn2.norm_added_k", "blocks.{i}.cross_attn.norm_k_img"),
    ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
    ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
    # Only the cross-attention norm has weights; diffusers calls it norm2, Wan norm3.
    ("blocks.{i}.norm2", "blocks.{i}.norm3"),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.modulation"),
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
    """diffusers name (module path or parameter key) -> original Wan name."""
    return _convert(name, _TO_ORIGINAL, "original")


def to_diffusers(name: str) -> str:
    """Original Wan name (module path or parameter key) -> diffusers name."""
    return _convert(name, _TO_DIFFUSERS, "diffusers")


def state_dict_to_original(state_dict: dict) -> dict:
    """A diffusers `WanTransformer3DModel` state dict with original (Wan / ComfyUI) keys."""
    return {to_original(k): v for k, v in state_dict.items()}
