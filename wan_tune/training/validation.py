"""Validation videos from the current weights, through the diffusers pipeline itself.

The pipeline is built once (VAE, scheduler, CLIP for I2V) around the live transformer; prompt
embeddings are computed once at start and the text encoder is dropped again, so the 11 GB umT5
does not sit in memory through training. Videos land in `<run>/validation/step-NNNNNN/NN.mp4`,
each with a contact sheet `NN.png` (the base model's frames above the current ones, same seed;
`overview.py`), and go to W&B when it is the tracker. The base model's renders are made once per
run, before training (a LoRA: with its adapters switched off, at any step), into `validation/base/`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config import Recipe
from ..config.checks import missing_inputs
from ..config.sources import all_resolutions
from ..media.animate_media import animate_rows
from ..media.vace_media import pipeline_inputs, sheet_rows, validation_media
from ..media.video_io import frame_row, to_uint8, write_video
from ..memory.block_offload import BlockOffload
from ..models.loading import resolve_source
from ..models.precision import AUTOCAST, DTYPES, as_inference
from ..models.variants import get_variant, pipeline_class
from ..parallel.sharding import reshard, unpartitioned_loading
from ..training.model_setup import load_frozen
from .clip_inputs import animate_validation_media, clip_first_frames
from .errors import TrainingError
from .launch import agree
from .overview import read_row, write_overview, write_row, write_sheet


def make_validator(recipe: Recipe, accelerator, experts: list[str], heldout, together: bool):
    """The run's Validator (None when validation is off, and on ranks that render nothing), made
    before the training model is loaded: the prompts are encoded then, so the text encoder (umT5,
    ~11 GB in bf16) is on the GPU alone and gone again before the transformer arrives (audit B3).
    `together`: every rank renders (sharded weights gather in each forward, context-parallel groups
    split each clip); else rank 0 alone."""
    if not recipe.validation.every or not (accelerator.is_main_process or together):
        return None
    missing = missing_inputs(recipe)
    if missing:
        raise TrainingError(f"{missing[0][0]}: {missing[0][1]}" + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
                            + ": give files that exist, or set validation.every=0")
    variant = get_variant(recipe.model.variant)
    try:
        first_frames = None
        if variant.image_conditioned(recipe.data.task) and not variant.animate and not recipe.validation.images:
            first_frames = clip_first_frames(recipe, recipe.data.shards, heldout.indices if heldout else [],
                                             len(recipe.validation.prompts), last=variant.last_frame)
        with unpartitioned_loading(accelerator):
            # The encoders in model.dtype, a full fine-tune's too (its fp32 is the trained weights'; an
            # fp32 umT5 would take ~22 GB for nothing).
            validator = Validator(recipe, accelerator.device, DTYPES[recipe.model.dtype], trained=experts,
                                  first_frames=first_frames, prefer=heldout.indices if heldout else [])
    except ValueError as err:  # ConditioningError too: a VACE control or reference that cannot serve
        raise TrainingError(str(err)) from None
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()  # the text encoder's blocks go back before the transformer loads
    return validator


def start_validation(run, validator, start_step: int) -> None:
    """The base model's renders for the contact sheets, made or read back once per run. Sharded
    weights: every rank runs the same pipeline (its forwards gather the shards together), rank 0 writes."""
    if not run.recipe.validation.every:
        return
    render_base = agree(run.accelerator, run.main and validator.base_missing(run.run_dir / "validation"))
    if validator is not None:
        note = validator.prepare_base(run.live(), run.run_dir / "validation", render_base,
                                      lora=run.recipe.adapter.method != "full", untrained=start_step == 0, write=run.main)
        if note:
            run.say(note)


def validate(run, validator, step: int) -> None:
    """Render the prompts from the current weights (every rank of a sharded run), write and log them on rank 0."""
    if validator is not None:
        paths = validator.render(run.live(), step, run.run_dir / "validation", write=run.main)
        if run.main:
            log_videos(run.accelerator, run.recipe, paths, step)
            run.say(f"validation videos: {paths[0].parent}")
    run.accelerator.wait_for_everyone()


class Validator:
    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype, trained: list[str] = ("transformer",),
                 first_frames: list | None = None, prefer: list[int] = ()):
        """`trained`: the experts the run trains (their live weights render); a Wan2.2 A14B
        expert that is not trained renders from the base weights, loaded here once.
        `first_frames`: I2V images for the prompts when `validation.images` gives none. `prefer`:
        clips whose VACE inputs serve first (the held-out ones), when the recipe gives none."""
        from PIL import Image

        v = recipe.validation
        self.recipe, self.device, self.dtype = recipe, device, dtype
        self.variant = get_variant(recipe.model.variant)
        source = resolve_source(self.variant, recipe.model.path, None, recipe.model.revision,
                                components=("vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "image_processor"))
        self.with_image = self.variant.image_conditioned(recipe.data.task) and not self.variant.animate  # Animate: media
        cls = pipeline_class(self.variant, self.with_image)
        # transformer=None: the live, training transformer is plugged in at render time.
        self.pipe = cls.from_pretrained(source.folder, transformer=None, transformer_2=None, torch_dtype=dtype)
        self.pipe.vae.to(DTYPES[recipe.model.vae_dtype])  # fp32 unless the recipe says otherwise (audit B12)
        # An A14B expert the run does not train waits in host memory, in fp8 with train.fp8_base, and
        # is on the GPU only while a round renders (audit B3: it sat there whole in bf16, ~27 GB); with
        # train.offload=blocks its blocks stream there as the trained expert's do.
        self.frozen = {name: load_frozen(recipe, name) for name in self.variant.experts if name not in trained}
        self.streamed = [BlockOffload(m, recipe.train.offload_keep, device) for m in self.frozen.values()
                         if recipe.train.offload == "blocks"]
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(device)
        self.height = v.height or all_resolutions(recipe)[0][0]
        self.width = v.width or all_resolutions(recipe)[0][1]
        cfg = max(v.guidance_scale, v.guidance_scale_2 or 0) > 1.0  # A14B: either expert may guide
        with torch.no_grad():
            self.embeds = [
                self.pipe.encode_prompt(p, negative_prompt="", do_classifier_free_guidance=cfg,
                                        max_sequence_length=recipe.data.max_text_tokens, device=device)
                for p in v.prompts
            ]
        self.pipe.text_encoder = None  # embeddings are cached; free the encoder
        # The VAE (and CLIP) wait in host memory too, on the GPU only while a round renders: the
        # training step's plan has no room for them (a 14B at 480p fills 16 GiB to 0.1 GiB).
        self.pipe.to("cpu")
        self.images = [Image.open(p).convert("RGB") for p in v.images] if self.with_image else []
        self.last_images = [Image.open(p).convert("RGB") for p in v.last_images]  # FLF2V
        if self.with_image and not self.images:
            frames = list(first_frames or [])
            if self.variant.last_frame:  # (first, last) pairs
                frames, self.last_images = [f for f, _ in frames], [last for _, last in frames]
            self.images = frames
            if len(self.images) < len(v.prompts):
                raise ValueError(f"I2V validation needs {len(v.prompts)} first frame(s): give validation.images")
        self.base_rows: list | None = None
        # VACE: each prompt's references / control / mask; Animate: its character, pose and face
        # videos; shown above the renders on its sheet.
        if self.variant.animate:
            self.media = animate_validation_media(recipe, self.variant.transformer["motion_encoder_size"], self.height,
                                                  self.width, list(prefer))
            self.media_rows = [animate_rows(m, self.height, self.width) for m in self.media]
        else:
            self.media = validation_media(recipe, self.height, self.width, list(prefer)) if self.variant.vace else []
            self.media_rows = [sheet_rows(m, self.height, self.width) for m in self.media]

    def base_missing(self, out_dir: Path) -> bool:
        return any(not (Path(out_dir) / "base" / f"{i:02d}.png").is_file() for i in range(len(self.embeds)))

    @torch.no_grad()
    def prepare_base(self, live: dict, out_dir: Path, render: bool, lora: bool, untrained: bool, write: bool = True) -> str | None:
        """The base model's frame rows for the contact sheets: read from `validation/base/`, or
        rendered there when `render` (every rank decides alike). A LoRA renders the base with its
        adapters off; a full fine-tune only while its weights are still the base (`untrained`).
        Returns a note when the sheets must go without the base."""
        base = Path(out_dir) / "base"
        if not render:
            if write:
                self.base_rows = [read_row(base / f"{i:02d}.png") for i in range(len(self.embeds))]
            return None
        if not (lora or untrained):
            return ("validation sheets show the current weights only: the base renders (validation/base/) are missing "
                    "and a resumed full fine-tune no longer holds the base weights")
        with adapters_off(live.values()) if lora else contextlib.nullcontext():
            videos = self._render_all(live)
        if write:
            self.base_rows = []
            for i, frames in enumerate(videos):
                write_video(base / f"{i:02d}.mp4", frames, fps=self.recipe.data.fps)
                self.base_rows.append(frame_row(frames))
                write_row(base / f"{i:02d}.png", self.base_rows[-1])
        return None
    @torch.no_grad()
    def render(self, live: dict, step: int, out_dir: Path, write: bool = True) -> list[Path]:
        """Videos and contact sheets of every prompt from the live transformers ({expert:
        module}), then the overview page; `write=False` renders without writing (the other ranks
        of a sharded run, whose forwards must take part in the gathers)."""
        videos = self._render_all(live)
        if not write:
            return []
        paths, folder = [], Path(out_dir) / f"step-{step:06d}"
        for i, frames in enumerate(videos):
            paths.append(write_video(folder / f"{i:02d}.mp4", frames, fps=self.recipe.data.fps))
            rows = (self.media_rows[i] if self.media_rows else []) + ([("base", self.base_rows[i])] if self.base_rows else [])
            write_sheet(folder / f"{i:02d}.png", rows + [(f"step {step}", frame_row(frames))])
        write_overview(out_dir, self.recipe.validation.prompts, Path(out_dir).parent / "metrics.jsonl")
        return paths

    def _render_all(self, live: dict) -> list:
        """uint8 frames [T, H, W, 3] of every prompt, same seed each time, the weights read as inference
        reads them (models/precision.py: as_inference)."""
        models = {**self.frozen, **live}
        was_training = {name: m.training for name, m in live.items()}
        self.pipe.to(self.device)  # before the transformers are plugged in: it moves every component
        for m in self.frozen.values():
            m.to(self.device)
        for name, m in models.items():
            m.eval()
            setattr(self.pipe, name, m)
        try:
            with as_inference(live.values(), self.recipe.adapter.method != "full", self.device.type,
                              AUTOCAST[self.recipe.train.mixed_precision]):
                return [to_uint8(self.pipe(**self._call_args(i, pos, neg)).frames[0])
                        for i, (pos, neg) in enumerate(self.embeds)]
        finally:
            for m in self.frozen.values():
                m.to("cpu")
            for name in models:
                setattr(self.pipe, name, None)
            self.pipe.to("cpu")
            for name, m in live.items():
                m.train(was_training[name])
                reshard(m)

    def _call_args(self, i: int, pos, neg) -> dict:
        """The pipeline's arguments for prompt `i`."""
        v = self.recipe.validation
        kwargs = dict(prompt_embeds=pos, negative_prompt_embeds=neg, height=self.height, width=self.width,
                      num_inference_steps=v.steps, guidance_scale=v.guidance_scale,
                      generator=torch.Generator().manual_seed(v.seed), output_type="np")
        if self.variant.animate:  # one segment of validation.frames: the clip's pose and face
            return dict(kwargs, segment_frame_length=v.frames, **self.media[i])
        kwargs["num_frames"] = v.frames
        if self.variant.two_experts:  # the pipeline's default: the same scale for both experts
            kwargs["guidance_scale_2"] = v.guidance_scale_2
        if self.with_image:
            kwargs["image"] = self.images[i]
        if self.last_images:
            kwargs["last_image"] = self.last_images[i]
        if self.variant.vace:
            kwargs.update(conditioning_scale=self.recipe.vace.conditioning_scale, **pipeline_inputs(self.media[i]))
        return kwargs


@contextlib.contextmanager
def adapters_off(models):
    """The LoRA layers of `models` compute the base alone. Not peft's `disable_adapters()`: it also
    turns the adapter weights' requires_grad off, and FSDP2 settles its mixed precision at the first
    forward from requires_grad: when that forward is the base render, it takes the LoRA for frozen
    weights and its gradients then reach the fp32 weights in bf16 (refused at the first backward)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


def log_videos(accelerator, recipe: Recipe, paths: list[Path], step: int) -> None:
    if recipe.tracking.backend != "wandb":
        return
    import wandb

    tracker = accelerator.get_tracker("wandb", unwrap=True)
    videos = {f"validation/{i:02d}": wandb.Video(str(p), caption=recipe.validation.prompts[i], format="mp4")
              for i, p in enumerate(paths)}
    sheets = {f"validation_sheet/{i:02d}": wandb.Image(str(p.with_suffix(".png")), caption=f"base (top) vs step {step}: "
                                                       f"{recipe.validation.prompts[i]}") for i, p in enumerate(paths)}
    tracker.log({**videos, **sheets}, step=step)
