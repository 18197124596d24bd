"""A complete tiny Wan pipeline folder, random weights, built locally.

Tests and the demo load it through exactly the code that loads the real 1.3B/14B folders
(`WanPipeline.save_pretrained` layout: model_index.json + one subfolder per component), so
nothing is downloaded and no loader path is special-cased for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..data.atomic import new_file_mode
from .configs import TINY_IMAGE_DIM, TINY_TEXT_DIM
from .variants import Variant, get_variant, pipeline_class, transformer_class

# Words the demo and the tests use in captions; anything else becomes <unk>.
_WORDS = """
a an the of in on at with and or to from by over under into through across near while is are
video clip shot scene frame camera pan zoom slow fast moving moves spinning bouncing drifting
red green blue yellow orange purple white black gray pink cyan magenta gold silver bright dark
circle square triangle star ball cube shape shapes stripe stripes dot dots line lines ring grid
background foreground sky sea water light shadow glow neon pastel vivid soft sharp smooth
left right up down top bottom center corner small large big tiny round flat
style brand logo look studio footage animation motion wtune sks
person dog cat car tree city street room table chair window door
""".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # umT5 appends </s>; so does ours, so prompt lengths behave the same.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_tiny_pipeline(variant: Variant | str = "tiny", seed: int = 0):
    """The tiny diffusers pipeline for a tiny variant, in memory."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    variant = get_variant(variant) if isinstance(variant, str) else variant
    if not variant.tiny:
        raise ValueError(f"{variant.name!r} is not a tiny variant")
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = _tiny_vae(variant)
    transformer = transformer_class(variant)(**variant.transformer)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=variant.flow_shift
    )
    # eval(), as from_pretrained leaves them: umT5 has dropout, and in-memory must equal loaded.
    parts = dict(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler, transformer=transformer.eval()
    )
    if variant.two_experts:  # the low-noise expert: same shape, its own random weights
        parts.update(transformer_2=transformer_class(variant)(**variant.transformer).eval(), boundary_ratio=variant.boundary_ratio)
    if variant.expand_timesteps:
        parts.update(expand_timesteps=True)
    if not variant.is_i2v:
        return pipeline_class(variant)(**parts)  # WanPipeline, or WanVACEPipeline for VACE
    if not variant.clip_image_tokens:  # Wan2.2 I2V: the image enters as latents only
        return WanImageToVideoPipeline(**parts)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TINY_IMAGE_DIM,
            intermediate_size=64,
            num_hidden_layers=3,  # the pipeline takes the penultimate hidden state
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    # WanImageToVideoPipeline, or WanAnimatePipeline (the same CLIP reads its reference image)
    return (pipeline_class(variant) if variant.animate else WanImageToVideoPipeline)(
        **parts, image_encoder=image_encoder.eval(), image_processor=image_processor)


def _tiny_vae(variant: Variant):
    from diffusers import AutoencoderKLWan

    if variant.vae_z_dim == 16:
        # Same compression as the Wan2.1 VAE (8x spatial, 4x temporal, 16 latent channels),
        # trained so that decode inverts encode: the demo's pictures show what the LoRA learned.
        from .tiny_vae import tiny_vae

        return tiny_vae()
    # The Wan2.2 VAE's layout (pixels patchified 2x2 into 12 channels, residual blocks, 4x16x16,
    # 48 latent channels) at small widths, with its own latent normalisation.
    g = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=(torch.randn(48, generator=g) * 0.2).tolist(), latents_std=(1 + torch.rand(48, generator=g)).tolist(),
    )


def save_tiny_pipeline(path: str | os.PathLike, variant: Variant | str = "tiny", seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder at `path` (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, new_file_mode(folder=True))
        build_tiny_pipeline(variant, seed).save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process (a second rank) finished the same folder first: keep theirs.
            if not (path / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_cache_dir(variant: Variant) -> Path:
    root = Path(os.environ.get("WAN_TUNE_HOME", Path.home() / ".cache" / "wan-tune"))
    return root / "models" / variant.name


def ensure_tiny_pipeline(variant: Variant) -> Path:
    """The cached tiny folder for `variant`, built on first use."""
    path = tiny_cache_dir(variant)
    if not (path / "model_index.json").is_file():
        shutil.rmtree(path, ignore_errors=True)  # a folder left half-written by a killed build
        save_tiny_pipeline(path, variant)
    return path
