"""The Wan variants wan-tune knows: their transformer configs, hub ids and defaults.

Everything the rest of the code needs to know about a model family lives here (and in
`keymap.py`): the loop asks the variant, it never hard-codes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .configs import (
    TINY_ANIMATE,
    TINY_IMAGE_TOKENS,
    animate,
    tiny,
    tiny22,
    vace,
    wan21,
    wan22_5b,
    wan22_a14b,
)


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
    """Pipeline components holding a denoiser; Wan2.2 A14B has two: `transformer` (high noise)
    and `transformer_2` (low noise)."""
    boundary_ratio: float | None = None
    """Wan2.2 two-expert models: sigma at or above which the high-noise expert runs (the
    pipeline's `boundary_ratio`; a model folder's model_index.json overrides it)."""
    expand_timesteps: bool = False
    """Wan2.2 TI2V-5B: one timestep per token (the first frame's tokens get 0 when conditioned on an image)."""
    last_frame: bool = False
    """FLF2V: conditioned on a clip's first and last frames (the I2V pipeline's `last_image`): both
    frames' latents in the condition, the CLIP tokens of both (a learned position embedding tells
    them apart: `pos_embed_seq_len`)."""
    fps: int = 16
    """Frame rate of the model's training footage and samples."""
    expected_params: float | None = None
    """Parameter count of the transformer (of each expert), checked by a test."""
    vae_z_dim: int = 16
    tiny: bool = False
    """Random-init model built locally for tests and the demo (nothing downloaded)."""
    notes: str = ""

    @property
    def is_i2v(self) -> bool:
        return self.task == "i2v"

    @property
    def vace(self) -> bool:
        """VACE: a T2V model with a second stack of blocks (`vace_blocks`) that reads a context of
        reference images, a control video and its mask, and adds hints into the main blocks."""
        return "vace_layers" in self.transformer

    @property
    def animate(self) -> bool:
        """Wan2.2-Animate: an I2V model that also reads a pose video (latents) and a face video (pixels,
        through its motion encoder), conditioned on a reference image of the character."""
        return "motion_encoder_dim" in self.transformer

    @property
    def face_adapters(self) -> int:
        """Wan2.2-Animate: its face adapters, one after every `inject_face_latents_blocks`-th block (0 for the others)."""
        return self.transformer["num_layers"] // self.transformer["inject_face_latents_blocks"] if self.animate else 0

    @property
    def vace_blocks(self) -> int:
        """How many VACE blocks the transformer has (0 for the others)."""
        return len(self.transformer.get("vace_layers", ()))

    @property
    def clip_image_tokens(self) -> bool:
        """Wan2.1 I2V feeds CLIP image tokens to cross-attention; Wan2.2 I2V does not."""
        return self.transformer.get("image_dim") is not None

    def image_conditioned(self, task: str = "auto") -> bool:
        """Whether a run conditions on a first frame: I2V variants always; TI2V-5B when the
        recipe says data.task=i2v (it does both, the image replacing the first latent frame)."""
        return self.is_i2v or (self.expand_timesteps and task == "i2v")

    def shard_task(self, task: str = "auto") -> str:
        """What prep's shards hold for this variant (meta.json's `task`): t2v, i2v or flf2v."""
        if self.last_frame:
            return "flf2v"
        if self.vace:
            return "vace"
        if self.animate:
            return "animate"
        return "i2v" if self.image_conditioned(task) else "t2v"

    @property
    def kind(self) -> str:
        """T2V, I2V, FLF2V, VACE or Animate, as the README's table says it."""
        if self.animate:
            return "Animate"
        return "FLF2V" if self.last_frame else "VACE" if self.vace else self.task.upper()

    @property
    def two_experts(self) -> bool:
        return len(self.experts) > 1

    @property
    def vae_spatial(self) -> int:
        """Pixels per latent side: the Wan2.1 VAE compresses 8x, the Wan2.2 VAE (48 channels) 16x."""
        return 16 if self.vae_z_dim == 48 else 8

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of a clip of `frames` x `height` x `width` pixels (the VAE packs 4
        frames per latent after the first; patches of patch_size)."""
        pt, ph, pw = self.transformer["patch_size"]
        s = self.vae_spatial
        return ((frames - 1) // 4 + 1) // pt * (height // s // ph) * (width // s // pw)

    def sigma_range(self, expert: str, boundary_ratio: float | None = None) -> tuple[float, float]:
        """The sigmas an expert denoises at inference: [boundary, 1] high noise, [0, boundary) low."""
        if not self.two_experts:
            return (0.0, 1.0)
        boundary = self.boundary_ratio if boundary_ratio is None else boundary_ratio
        return (boundary, 1.0) if expert == self.experts[0] else (0.0, boundary)

    def expert_for(self, sigma: float, boundary_ratio: float | None = None) -> str:
        """The expert that denoises `sigma` at inference: high noise (`transformer`) at or above
        the boundary (a model folder's own, when given), as the pipeline compares timestep =
        sigma * 1000 with boundary * 1000."""
        if not self.two_experts:
            return self.experts[0]
        boundary = self.boundary_ratio if boundary_ratio is None else boundary_ratio
        return self.experts[0] if sigma >= boundary else self.experts[1]

    @property
    def in_channels(self) -> int:
        return self.transformer["in_channels"]

    @property
    def inner_dim(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]


def transformer_class(variant: Variant | dict[str, Any]):
    """The diffusers class of a variant's (or a transformer config's) model:
    `WanVACETransformer3DModel` for VACE, `WanAnimateTransformer3DModel` for Animate,
    `WanTransformer3DModel` for the rest."""
    import diffusers

    config = variant.transformer if isinstance(variant, Variant) else variant
    if "motion_encoder_dim" in config:
        return diffusers.WanAnimateTransformer3DModel
    return diffusers.WanVACETransformer3DModel if "vace_layers" in config else diffusers.WanTransformer3DModel


def pipeline_class(variant: Variant, with_image: bool = False):
    """The diffusers pipeline that samples the variant (`with_image`: TI2V-5B given a first frame)."""
    import diffusers

    if variant.vace:
        return diffusers.WanVACEPipeline
    if variant.animate:
        return diffusers.WanAnimatePipeline
    return diffusers.WanImageToVideoPipeline if variant.is_i2v or with_image else diffusers.WanPipeline


# What a recipe calls the two Wan2.2 A14B experts (`model.experts`), by pipeline component.
EXPERT_LABELS = {"transformer": "high_noise", "transformer_2": "low_noise"}


def expert_label(variant: Variant, expert: str) -> str:
    """`high_noise` / `low_noise` for a two-expert model's components, else the component name."""
    return EXPERT_LABELS[expert] if variant.two_experts else expert


def trained_experts(variant: Variant, chosen: list[str]) -> list[str]:
    """Pipeline components a run trains: `chosen` labels (empty: every expert), in pipeline order."""
    if not chosen or not variant.two_experts:
        return list(variant.experts)
    return [e for e in variant.experts if EXPERT_LABELS[e] in chosen]


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            name="wan2.1-t2v-1.3b",
            task="t2v",
            hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            transformer=wan21(12, 30, 8960),
            flow_shift=3.0,
            resolution=(480, 832),
            expected_params=1.42e9,
        ),
        Variant(
            name="wan2.1-t2v-14b",
            task="t2v",
            hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
            transformer=wan21(40, 40, 13824),
            flow_shift=5.0,
            resolution=(720, 1280),
            expected_params=14.3e9,
        ),
        Variant(
            name="wan2.1-i2v-14b-480p",
            task="i2v",
            hub_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
            transformer=wan21(40, 40, 13824, i2v=True),
            flow_shift=3.0,
            resolution=(480, 832),
            expected_params=16.4e9,
        ),
        Variant(
            name="wan2.1-i2v-14b-720p",
            task="i2v",
            hub_id="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
            transformer=wan21(40, 40, 13824, i2v=True),
            flow_shift=5.0,
            resolution=(720, 1280),
            expected_params=16.4e9,
        ),
        Variant(
            name="wan2.1-flf2v-14b-720p",
            task="i2v",
            hub_id="Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers",
            # diffusers' conversion script (scripts/convert_wan_to_diffusers.py, "Wan-FLF2V-14B-720P"):
            # the I2V 14B with a position embedding over the two images' 2 x 257 CLIP tokens.
            transformer=dict(wan21(40, 40, 13824, i2v=True), pos_embed_seq_len=2 * 257),
            flow_shift=16.0,  # Wan's generate.py: sample_shift 16 for flf2v
            resolution=(720, 1280),
            expected_params=16.4e9,
            last_frame=True,
            notes="first and last frame to video",
        ),
        Variant(
            name="wan2.1-vace-1.3b",
            task="t2v",
            hub_id="Wan-AI/Wan2.1-VACE-1.3B-diffusers",
            transformer=vace(wan21(12, 30, 8960), list(range(0, 30, 2))),
            flow_shift=16.0,  # Wan's generate.py: sample_shift 16 for vace
            resolution=(480, 832),
            expected_params=2.15e9,
            notes="reference images, control video and mask (VACE blocks beside the T2V 1.3B)",
        ),
        Variant(
            name="wan2.1-vace-14b",
            task="t2v",
            hub_id="Wan-AI/Wan2.1-VACE-14B-diffusers",
            transformer=vace(wan21(40, 40, 13824), list(range(0, 40, 5))),
            flow_shift=16.0,
            resolution=(720, 1280),
            expected_params=17.3e9,
            notes="reference images, control video and mask (VACE blocks beside the T2V 14B)",
        ),
        Variant(
            name="wan2.2-vace-fun-a14b",
            task="t2v",
            # alibaba-pai's Wan2.2-VACE-Fun-A14B as diffusers' conversion script ("Wan2.2-VACE-Fun-14B")
            # writes it: each expert a VACE 14B; the diffusers-format copy is a community conversion.
            hub_id="linoyts/Wan2.2-VACE-Fun-14B-diffusers",
            transformer=vace(wan21(40, 40, 13824), list(range(0, 40, 5))),
            flow_shift=3.0,  # as the Wan2.2 T2V A14B pipeline's scheduler
            resolution=(720, 1280),
            experts=("transformer", "transformer_2"),
            boundary_ratio=0.875,
            expected_params=17.3e9,
            notes="two VACE 14B experts (high / low noise), reference images, control video and mask",
        ),
        Variant(
            name="wan2.2-ti2v-5b",
            task="t2v",
            hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            transformer=wan22_5b(),
            flow_shift=5.0,
            resolution=(704, 1280),
            frames=121,
            fps=24,
            vae_z_dim=48,
            expand_timesteps=True,
            expected_params=5.0e9,
            notes="text-to-video with the 48-channel Wan2.2 VAE (4x16x16 compression)",
        ),
        Variant(
            name="wan2.2-t2v-a14b",
            task="t2v",
            hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            transformer=wan22_a14b(i2v=False),
            flow_shift=3.0,
            resolution=(720, 1280),
            experts=("transformer", "transformer_2"),
            boundary_ratio=0.875,
            expected_params=14.3e9,
            notes="two 14B experts: high noise (transformer) above the boundary, low noise (transformer_2) below",
        ),
        Variant(
            name="wan2.2-i2v-a14b",
            task="i2v",
            hub_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
            transformer=wan22_a14b(i2v=True),
            flow_shift=3.0,
            resolution=(720, 1280),
            experts=("transformer", "transformer_2"),
            boundary_ratio=0.9,
            expected_params=14.3e9,
            notes="two 14B experts; conditions on mask + first-frame latents, no CLIP image tokens",
        ),
        Variant(
            name="wan2.2-animate-14b",
            task="i2v",
            hub_id="Wan-AI/Wan2.2-Animate-14B-Diffusers",
            transformer=animate(wan21(40, 40, 13824, i2v=True)),
            flow_shift=5.0,  # diffusers' conversion script: UniPC flow_shift 5 for Animate
            resolution=(720, 1280),
            frames=77,  # the pipeline's segment_frame_length
            fps=30,  # Wan2.2's Animate preprocessing (preprocess_data.py) resamples the driving video to 30
            expected_params=17.3e9,
            notes="character animation / replacement: reference image, pose and face videos",
        ),
        Variant(
            name="tiny",
            task="t2v",
            hub_id=None,
            transformer=tiny(i2v=False),
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
            transformer=tiny(i2v=True),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            tiny=True,
            notes="random init, for tests and the demo",
        ),
        Variant(
            name="tiny-ti2v",
            task="t2v",
            hub_id=None,
            transformer=tiny22(in_channels=48, out_channels=48),
            flow_shift=5.0,
            resolution=(64, 96),
            frames=9,
            fps=24,
            vae_z_dim=48,
            expand_timesteps=True,
            tiny=True,
            notes="random init, TI2V-5B-shaped (48-channel Wan2.2 VAE, per-token timesteps)",
        ),
        Variant(
            name="tiny-a14b",
            task="t2v",
            hub_id=None,
            transformer=tiny22(),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            experts=("transformer", "transformer_2"),
            boundary_ratio=0.875,
            tiny=True,
            notes="random init, A14B-shaped: two experts split at the boundary",
        ),
        Variant(
            name="tiny-flf2v",
            task="i2v",
            hub_id=None,
            transformer=dict(tiny(i2v=True), pos_embed_seq_len=2 * TINY_IMAGE_TOKENS),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            last_frame=True,
            tiny=True,
            notes="random init, FLF2V-shaped: first and last frame, CLIP tokens of both",
        ),
        Variant(
            name="tiny-vace",
            task="t2v",
            hub_id=None,
            transformer=vace(tiny(i2v=False), [0, 1]),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            tiny=True,
            notes="random init, VACE-shaped: a VACE block beside each of the two blocks",
        ),
        Variant(
            name="tiny-vace-a14b",
            task="t2v",
            hub_id=None,
            transformer=vace(tiny(i2v=False), [0, 1]),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            experts=("transformer", "transformer_2"),
            boundary_ratio=0.875,
            tiny=True,
            notes="random init, Wan2.2-VACE-Fun-A14B-shaped: two VACE experts split at the boundary",
        ),
        Variant(
            name="tiny-a14b-i2v",
            task="i2v",
            hub_id=None,
            transformer=tiny22(in_channels=36),
            flow_shift=3.0,
            resolution=(64, 96),
            frames=9,
            experts=("transformer", "transformer_2"),
            boundary_ratio=0.9,
            tiny=True,
            notes="random init, I2V-A14B-shaped: two experts, mask + condition latents, no CLIP",
        ),
        Variant(
            name="tiny-animate",
            task="i2v",
            hub_id=None,
            transformer=animate(tiny(i2v=True), **TINY_ANIMATE),
            flow_shift=5.0,
            resolution=(64, 96),
            frames=9,
            tiny=True,
            notes="random init, Animate-shaped: pose patch embedding, motion and face encoders, face adapters",
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
