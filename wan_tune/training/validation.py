"""Validation videos from the current weights, through the diffusers pipeline itself.

The pipeline is built once (VAE, scheduler, CLIP for I2V) around the live transformer; prompt
embeddings are computed once at start and the text encoder is dropped again, so the 11 GB umT5
does not sit in memory through training. Videos land in `<run>/validation/step-NNNNNN/NN.mp4`
and go to W&B when it is the tracker.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Recipe
from ..models.loading import load_transformer, recipe_source, resolve_source
from ..models.variants import get_variant
from ..video_io import to_uint8, write_video


class Validator:
    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype, trained: list[str] = ("transformer",)):
        """`trained`: the experts the run trains (their live weights render); a Wan2.2 A14B
        expert that is not trained renders from the base weights, loaded here once."""
        from diffusers import WanImageToVideoPipeline, WanPipeline
        from PIL import Image

        v = recipe.validation
        self.recipe, self.device, self.dtype = recipe, device, dtype
        self.variant = get_variant(recipe.model.variant)
        source = resolve_source(self.variant, recipe.model.path, None, recipe.model.revision,
                                components=("vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "image_processor"))
        self.with_image = self.variant.image_conditioned(recipe.data.task)
        cls = WanImageToVideoPipeline if self.with_image else WanPipeline
        # transformer=None: the live, training transformer is plugged in at render time.
        self.pipe = cls.from_pretrained(source.folder, transformer=None, transformer_2=None, torch_dtype=dtype)
        self.frozen = {name: load_transformer(recipe_source(recipe), dtype, name).to(device).eval().requires_grad_(False)
                       for name in self.variant.experts if name not in trained}
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(device)
        self.height = v.height or recipe.data.resolutions[0][0]
        self.width = v.width or recipe.data.resolutions[0][1]
        cfg = max(v.guidance_scale, v.guidance_scale_2 or 0) > 1.0  # A14B: either expert may guide
        with torch.no_grad():
            self.embeds = [
                self.pipe.encode_prompt(p, negative_prompt="", do_classifier_free_guidance=cfg,
                                        max_sequence_length=recipe.data.max_text_tokens, device=device)
                for p in v.prompts
            ]
        self.pipe.text_encoder = None  # embeddings are cached; free the encoder
        self.images = [Image.open(p).convert("RGB") for p in v.images] if self.with_image else []

    @torch.no_grad()
    def render(self, live: dict, step: int, out_dir: Path, write: bool = True) -> list[Path]:
        """Videos of every prompt from the live transformers ({expert: module}); `write=False`
        renders without writing (the other ranks of a sharded run, whose forwards must take part
        in the gathers)."""
        v = self.recipe.validation
        models = {**self.frozen, **live}
        was_training = {name: m.training for name, m in live.items()}
        for name, m in models.items():
            m.eval()
            setattr(self.pipe, name, m)
        paths = []
        try:
            for i, (pos, neg) in enumerate(self.embeds):
                kwargs = dict(prompt_embeds=pos, negative_prompt_embeds=neg, height=self.height, width=self.width,
                              num_frames=v.frames, num_inference_steps=v.steps, guidance_scale=v.guidance_scale,
                              generator=torch.Generator().manual_seed(v.seed), output_type="np")
                if self.variant.two_experts:  # the pipeline's default: the same scale for both experts
                    kwargs["guidance_scale_2"] = v.guidance_scale_2
                if self.with_image:
                    kwargs["image"] = self.images[i]
                frames = self.pipe(**kwargs).frames[0]
                if write:
                    paths.append(write_video(Path(out_dir) / f"step-{step:06d}" / f"{i:02d}.mp4", to_uint8(frames), fps=self.recipe.data.fps))
        finally:
            for name in models:
                setattr(self.pipe, name, None)
            for name, m in live.items():
                m.train(was_training[name])
        return paths


def log_videos(accelerator, recipe: Recipe, paths: list[Path], step: int) -> None:
    if recipe.tracking.backend != "wandb":
        return
    import wandb

    tracker = accelerator.get_tracker("wandb", unwrap=True)
    tracker.log({f"validation/{i:02d}": wandb.Video(str(p), caption=recipe.validation.prompts[i], format="mp4")
                 for i, p in enumerate(paths)}, step=step)
