"""The Wan variants wan-tune knows: their transformer configs, hub ids and defaults.

Everything the rest of the code needs to know about a model family lives here (and in
`keymap.py`): the loop asks the variant, it never hard-codes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# Shared by every Wan2.1 transformer (DESIGN.md section 3).
_WAN21_COMMON: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "freq_dim": 256,
    "text_dim": 4096,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "out_channels": 16,
    "rope_max_seq_len": 1024,  # keep the default: small values break wide latents
}


@dataclass(frozen=True)
class Variant:
    """One Wan model a recipe can name in `model.variant`."""

    name: str
    task: Literal["t2v", "i2v"]
    hub_id: str | None
    """Diffusers-format repository on the Hugging Face Hub; None for locally built models."""
    transformer: dict[str, Any]
    """`WanTransformer3DModel` config."""
    flow_shift: float
    """Default shift of the flow-matching schedule (training and sampling)."""
    resolution: tuple[int, int]
    """Native (height, width) in pixels."""
    frames: int = 81
    experts: tuple[str, ...] = ("transformer",)
    """Pipeline components holding a denoiser; Wan2.2 A14B has two (high/low noise)."""
    boundary_ratio: float | None = None
    """Wan2.2 two-expert models: sigma above which the high-noise expert runs."""
    expected_params: float | None = None
    """Parameter count of the transformer (DESIGN.md), checked by a test."""
    vae_z_dim: int = 16
    tiny: bool = False
    """Random-init model built locally for tests and the demo (nothing downloaded)."""
    notes: str = ""

    @property
    def is_i2v(self) -> bool:
        return self.task == "i2v"

    @property
    def in_channels(self) -> int:
        return self.transformer["in_channels"]

    @property
    def inner_dim(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]


def _wan21(heads: int, layers: int, ffn: int, *, i2v: bool = False) -> dict[str, Any]:
    cfg = dict(_WAN21_COMMON, num_attention_heads=heads, num_layers=layers, ffn_dim=ffn)
    if i2v:
        # 16 noisy latent channels + 4 mask channels + 16 condition-latent channels.
        cfg.update(in_channels=36, image_dim=1280, added_kv_proj_dim=heads * 128)
    else:
        cfg.update(in_channels=16, image_dim=None, added_kv_proj_dim=None)
    return cfg


def _tiny(*, i2v: bool) -> dict[str, Any]:
    # Two layers and small dims; the head dim must leave room for the 3-axis RoPE split.
    cfg = dict(
        _WAN21_COMMON,
        num_attention_heads=2,
        attention_head_dim=24,
        num_layers=2,
        ffn_dim=64,
        freq_dim=32,
        text_dim=TINY_TEXT_DIM,
    )
    if i2v:
        cfg.update(in_channels=36, image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=48)
    else:
        cfg.update(in_channels=16, image_dim=None, added_kv_proj_dim=None)
    return cfg


TINY_TEXT_DIM = 32
TINY_IMAGE_DIM = 32

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            name="wan2.1-t2v-1.3b",
            task="t2v",
            hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            transformer=_wan21(12, 30, 8960),
            flow_shift=3.0,
            resolution=(480, 832),
            expected_params=1.42e9,
        ),
        Variant(
            name="wan2.1-t2v-14b",
            task="t2v",
            hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
            transformer=_wan21(40, 40, 13824),
            flow_shift=5.0,
            resolution=(720, 1280),
            expected_params=14.3e9,
        ),
        Variant(
            name="wan2.1-i2v-14b-480p",
            task="i2v",
            hub_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
            transformer=_wan21(40, 40, 13824, i2v=True),
            flow_shift=3.0,
            resolution=(480, 832),
            expected_params=16.4e9,
        ),
        Variant(
            name="wan2.1-i2v-14b-720p",
            task="i2v",
            hub_id="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
            transformer=_wan21(40, 40, 13824, i2v=True),
            flow_shift=5.0,
            resolution=(720, 1280),
            expected_params=16.4e9,
        ),
        Variant(
            name="tiny",
            task="t2v",
            hub_id=None,
            transformer=_tiny(i2v=False),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            tiny=True,
            notes="random init, for tests and the demo",
        ),
        Variant(
            name="tiny-i2v",
            task="i2v",
            hub_id=None,
            transformer=_tiny(i2v=True),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            tiny=True,
            notes="random init, for tests and the demo",
        ),
    ]
}


class UnknownVariantError(KeyError):
    pass


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariantError(
            f"unknown model variant {name!r}; known: {', '.join(VARIANTS)}"
        ) from None


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
)


def architecture_mismatches(variant: Variant, config: dict[str, Any]) -> list[str]:
    """Human-readable differences between a loaded transformer config and the variant's."""
    out = []
    for key in ARCHITECTURE_KEYS:
        want, got = variant.transformer.get(key), config.get(key)
        if want != got:
            out.append(f"{key}: variant {variant.name!r} has {want}, the weights have {got}")
    return out
