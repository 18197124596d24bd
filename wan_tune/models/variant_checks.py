"""Whether a folder's weights are the variant a recipe names: a transformer config, a pipeline's
model_index.json against the variant's (loading refuses a mismatch in one message; `wan-tune
sample` finds a folder's variant with the same rules)."""

from __future__ import annotations

from typing import Any

from .variants import Variant

# Config keys that decide whether weights fit a variant; used to catch a recipe naming
# one variant while `model.path` holds another.
ARCHITECTURE_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "ffn_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "image_dim",
    "added_kv_proj_dim",
    "pos_embed_seq_len",  # FLF2V's; the I2V 14B 720P is otherwise the same
    "vace_layers",  # VACE's; its main blocks are the T2V model's
    "vace_in_channels",
    "motion_encoder_dim",  # Animate's; its blocks are the I2V 14B's
    "inject_face_latents_blocks",
)


def architecture_mismatches(variant: Variant, config: dict[str, Any]) -> list[str]:
    """Human-readable differences between a loaded transformer config and the variant's."""
    out = []
    for key in ARCHITECTURE_KEYS:
        want, got = variant.transformer.get(key), config.get(key)
        if want != got:
            out.append(f"{key}: variant {variant.name!r} has {want}, the weights have {got}")
    return out


def pipeline_mismatches(variant: Variant, index: dict[str, Any]) -> list[str]:
    """Differences between a pipeline folder's model_index.json and the variant's pipeline: a
    Wan2.2 A14B expert has exactly a Wan2.1 14B's config, only the pipeline tells them apart.
    An empty index (a bare transformer folder) says nothing."""
    if not index:
        return []
    out = []
    has_second = (index.get("transformer_2") or [None])[0] is not None
    if has_second != variant.two_experts:
        out.append(f"the folder has {'two experts (transformer, transformer_2)' if has_second else 'one transformer'}, "
                   f"variant {variant.name!r} has {'two' if variant.two_experts else 'one'}")
    if bool(index.get("expand_timesteps")) != variant.expand_timesteps:
        out.append(f"expand_timesteps: variant {variant.name!r} has {variant.expand_timesteps}, "
                   f"the pipeline has {bool(index.get('expand_timesteps'))}")
    return out
