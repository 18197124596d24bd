"""Transformer configs of the Wan variants (diffusers' config keys), built from a few shared facts:
diffusers' conversion script (scripts/convert_wan_to_diffusers.py) pins each real one.
"""

from __future__ import annotations

from typing import Any

# Shared by every Wan2.1 and Wan2.2 transformer (DESIGN.md section 3).
WAN_COMMON: dict[str, Any] = {
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


def wan21(heads: int, layers: int, ffn: int, *, i2v: bool = False) -> dict[str, Any]:
    cfg = dict(WAN_COMMON, num_attention_heads=heads, num_layers=layers, ffn_dim=ffn)
    if i2v:
        # 16 noisy latent channels + 4 mask channels + 16 condition-latent channels.
        cfg.update(in_channels=36, image_dim=1280, added_kv_proj_dim=heads * 128)
    else:
        cfg.update(in_channels=16, image_dim=None, added_kv_proj_dim=None)
    return cfg


def vace(cfg: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    # diffusers' conversion script ("Wan-VACE-1.3B" / "Wan-VACE-14B"): a T2V model plus one VACE
    # block per listed layer. 96 context channels: inactive + reactive video latents (2 x 16) and
    # the mask folded 8 x 8 into 64 channels (WanVACEPipeline.prepare_masks).
    return dict(cfg, vace_layers=layers, vace_in_channels=96)


def wan22_5b() -> dict[str, Any]:
    # 48 latent channels in and out (the Wan2.2 VAE); no image branch: TI2V conditions on an
    # image by replacing the first latent frame.
    return dict(WAN_COMMON, num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48,
                image_dim=None, added_kv_proj_dim=None)


def wan22_a14b(*, i2v: bool) -> dict[str, Any]:
    # Each expert is a Wan2.1 14B; the I2V one takes mask + condition latents but no CLIP tokens.
    return dict(wan21(40, 40, 13824), in_channels=36 if i2v else 16)


def tiny(*, i2v: bool) -> dict[str, Any]:
    # Two layers and small dims; the head dim must leave room for the 3-axis RoPE split.
    cfg = dict(
        WAN_COMMON,
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
TINY_IMAGE_TOKENS = 5  # the tiny CLIP (models/tiny.py): (28 / 14)^2 patches + the class token


def tiny22(**changes) -> dict[str, Any]:
    return dict(tiny(i2v=False), **changes)


def animate(cfg: dict[str, Any], **sizes) -> dict[str, Any]:
    """Wan2.2-Animate (diffusers' `WanAnimateTransformer3DModel`): the I2V 14B's blocks (CLIP tokens;
    36 channels in: noisy latents, then a mask and the reference image's and previous segment's
    latents) with a pose patch embedding added to the frames after the reference, a motion encoder
    reading the face video's pixels (at `motion_encoder_size` square) and face adapters cross-
    attending to its features after every `inject_face_latents_blocks`-th block. `sizes`: the
    Animate-specific keys, diffusers' conversion script's ("Wan2.2-Animate-14B") by default."""
    return dict(cfg, pos_embed_seq_len=None, **{**ANIMATE_14B, **sizes})


ANIMATE_14B: dict[str, Any] = {
    "motion_encoder_size": 512, "motion_style_dim": 512, "motion_dim": 20, "motion_encoder_dim": 512,
    "face_encoder_hidden_dim": 1024, "face_encoder_num_heads": 4, "inject_face_latents_blocks": 5,
}
# The tiny Animate: the real 512 px face input (diffusers' single-file conversion maps the original
# motion encoder's layers by their places at that size), at a few channels per layer.
TINY_ANIMATE: dict[str, Any] = {
    "motion_encoder_channel_sizes": {str(2**i): 4 for i in range(2, 10)}, "motion_style_dim": 16, "motion_dim": 4,
    "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16, "face_encoder_num_heads": 2, "inject_face_latents_blocks": 1,
}
