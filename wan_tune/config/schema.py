"""Every recipe key: one dataclass per section, each field with its one-line doc.

The docs here are the recipe reference (docs/recipe-reference.md, `wan_tune.config.reference`), so a key is
documented exactly once. Field-level rules (`choices`, `check`) are given beside the field (the
checks themselves in `field_checks.py`); rules that involve several keys live in `checks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..models.variants import VARIANTS
from .field_checks import (
    below_one,
    expert_labels,
    frames_4k1,
    holdout_share,
    multiple_of_16,
    non_negative,
    optimizer_name,
    plain_name,
    positive,
    resolutions_16,
    seed_range,
    shift_value,
    sigmas_in_unit_interval,
    text_tokens,
    two_betas,
    unit_interval,
)
from .options import opt
from .route_schema import RouteConfig
from .source_schema import FRAME_EXTRACTION, SourceConfig

# --- sections ---------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Naming and reproducibility of a run."""

    name: str = opt("wan-lora", "Run name; checkpoints go to `<output_dir>/<name>/step-NNNNNN/`.", check=plain_name)
    output_dir: str = opt("checkpoints", "Folder holding the run folders.")
    seed: int = opt(42, "One seed for data order, noise, sigmas, caption dropout and LoRA init.", check=seed_range)


@dataclass
class ModelConfig:
    """Which Wan model, and where its weights are."""

    variant: str = opt("wan2.1-t2v-1.3b", "Model variant (see the variant table).", choices=tuple(VARIANTS))
    path: Optional[str] = opt(
        None,
        "Hub id or local diffusers-format folder; empty = the variant's hub id (tiny variants are built locally).",
    )
    transformer_file: Optional[str] = opt(
        None,
        "Original-key single-file transformer (`.safetensors`, as ComfyUI users hold it); its config comes from `path`. "
        "Wan2.2 A14B: the high-noise expert.",
    )
    transformer_2_file: Optional[str] = opt(
        None, "Wan2.2 A14B: the low-noise expert's original-key single file (ComfyUI holds one file per expert)."
    )
    experts: list[str] = opt(
        [],
        "Wan2.2 A14B: which experts to train, `high_noise` (sigmas at or above the boundary) and/or `low_noise`; "
        "empty = both. Each trains on its own sigma range with its own LoRA and optimizer.",
        check=expert_labels,
    )
    expert_mode: str = opt(
        "separate", "Wan2.2 A14B, both experts trained: separate (a LoRA per expert, each learning on its own side of the "
        "boundary) or shared (one LoRA applied to both experts, as musubi-tuner does: it learns from every sigma and "
        "exports as one file per expert with the same weights). shared: LoRA / LoHa / LoKr on one process.",
        choices=("separate", "shared"))
    revision: Optional[str] = opt(None, "Hub branch, tag or commit when `path` is a hub id.")
    dtype: str = opt(
        "bf16",
        "Dtype of the frozen weights (base transformer, text and image encoders). A CPU runs it too, slowly (no "
        "bf16 matmul units): the demo recipe sets fp32.",
        choices=("fp32", "bf16", "fp16"),
    )
    vae_dtype: str = opt(
        "fp32",
        "Dtype of the Wan VAE: prep encodes the training latents with it, validation and `wan-tune sample` decode "
        "with it. fp32 as diffusers' Wan pipelines load it (the VAE is small; bf16 latents differ from fp32 ones).",
        choices=("fp32", "bf16", "fp16"),
    )


@dataclass
class DataConfig:
    """Footage, how it is cut into training clips, and where the shards go."""

    source: Optional[str] = opt(
        None,
        "Footage: a folder of videos/images with optional sidecar `.txt` captions, a CSV/JSONL/Parquet manifest, "
        "or a `datasets` dataset saved to disk. One source; several (each with its own sizes, repeats or role): "
        "`data.sources`.",
    )
    sources: list[SourceConfig] = opt(
        [], "Several footage sources, each a mapping of the `data.sources[]` keys below (path, name, repeats or "
        "weight, role, sizes, captions); instead of `data.source`.")
    shards: str = opt("data/shards/${run.name}", "Folder prep writes latent shards to and training reads from.")
    captions: str = opt(
        "${data.shards}/captions.csv",
        "Caption review file `wan-tune caption` writes and `wan-tune prep` reads (edit it between the two).",
    )
    task: str = opt(
        "auto",
        "What prep encodes: t2v = text only; i2v = also the first frame (CLIP embedding + condition latents); "
        "auto = the variant's task.",
        choices=("auto", "t2v", "i2v"),
    )
    fps: float = opt(16.0, "Frame rate clips are resampled to (Wan is trained at 16).", check=positive)
    frames: list[int] = opt(
        [81],
        "Frame-count buckets, each 4k+1; a clip window takes the largest bucket its video can fill.",
        check=frames_4k1,
    )
    resolutions: list[list[int]] = opt(
        [[480, 832]],
        "Pixel areas as [height, width] pairs (multiples of 16); each clip goes to the aspect bucket of that area "
        "closest to its shape.",
        check=resolutions_16,
    )
    max_clips_per_video: int = opt(1, "Windows taken from one video at most.", check=positive)
    clip_stride: int = opt(0, "Frames between the starts of consecutive windows; 0 = back to back.", check=non_negative)
    frame_extraction: str = opt(
        "slide", "Which windows a video gives (each of the largest frame bucket it fills): slide = from the start, "
        "every `clip_stride` frames, up to `max_clips_per_video`; head = the first window only; uniform = "
        "`max_clips_per_video` windows spread evenly from the start to the end.", choices=FRAME_EXTRACTION)
    max_text_tokens: int = opt(512, "umT5 token limit (Wan: 512); longer captions are truncated.", check=text_tokens)
    shard_dtype: str = opt(
        "bf16", "Dtype of stored latents and embeddings: bf16 halves the disk of fp32.", choices=("bf16", "fp16", "fp32")
    )
    samples_per_shard: int = opt(64, "Samples per shard file; a killed prep redoes at most one file's worth.", check=positive)
    num_workers: int = opt(2, "Data-loader worker processes while training.", check=non_negative)
    holdout: float = opt(
        0.0,
        "Share of the samples kept out of training (whole clips, chosen by a hash of their path) to score the "
        "held-out loss on (see `eval`); 0 = off.",
        check=holdout_share,
    )


@dataclass
class VaceConfig:
    """VACE models (wan2.1-vace-*): how the references and control video are used in training."""

    drop_reference: float = opt(
        0.0, "Share of steps trained without the clip's reference images, so one adapter serves with and without.",
        check=unit_interval)
    drop_control: float = opt(
        0.0, "Share of steps trained without the control video and mask (the grey video the pipeline uses "
        "when none is given), so one adapter serves with and without.", check=unit_interval)
    conditioning_scale: float = opt(
        1.0, "Weight of the VACE hints added into the blocks (the pipeline's `conditioning_scale`).", check=non_negative)


@dataclass
class AnimateConfig:
    """Wan2.2-Animate (wan2.2-animate-14b): which of its tasks the clips' inputs are for."""

    mode: str = opt(
        "animate", "animate: the character (its reference image) performs the pose and face videos on a black "
        "canvas; replace: it replaces the person in the clip, on the background video (clip.bg.mp4) outside the "
        "mask (clip.mask.mp4, white where the person is).", choices=("animate", "replace"))
    drop_face: float = opt(
        0.0, "Share of steps trained with the face video blanked (all pixels -1, as the pipeline's unconditional "
        "branch blanks it for guidance_scale > 1), so the adapter serves that branch too.", check=unit_interval)


@dataclass
class CaptionConfig:
    """How captions are made before encoding (`wan-tune caption`), for review."""

    mode: str = opt(
        "sidecar",
        "sidecar: the `.txt` beside each clip (or the manifest's caption); template: fill `template`; "
        "vlm: describe each clip with a vision-language model.",
        choices=("sidecar", "template", "vlm"),
    )
    trigger_word: str = opt("", "Word that names your style; template and vlm modes put it at the start of each caption.")
    template: str = opt("{trigger} a video", "Caption for mode=template; `{trigger}` and `{stem}` (file name) are filled in.")
    vlm_model: str = opt("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2-VL / Qwen2.5-VL checkpoint: hub id or local folder.")
    vlm_prompt: str = opt(
        "Describe this video in one detailed sentence: subject, motion, camera, lighting and style.",
        "Instruction given to the vision-language model with each clip's frames.",
    )
    vlm_frames: int = opt(8, "Frames sampled evenly from each clip for the vision-language model.", check=positive)
    vlm_batch_size: int = opt(4, "Clips captioned per forward pass.", check=positive)
    vlm_max_new_tokens: int = opt(120, "Longest caption the vision-language model may write, in tokens.", check=positive)
    overwrite: bool = opt(False, "Re-caption clips that already have a caption (otherwise reviewed captions are kept).")


@dataclass
class AdapterConfig:
    """LoRA or full fine-tuning."""

    method: str = opt(
        "lora", "lora: low-rank adapters (B A); dora: DoRA, a LoRA for the direction of each weight row plus a learned "
        "magnitude per row (exports in the diffusers format only: ComfyUI's dora_scale cannot hold peft's DoRA "
        "exactly); loha: LyCORIS LoHa, two low-rank pairs multiplied element-wise (more "
        "expressive at the same rank, ~2x the parameters of a LoRA); lokr: LyCORIS LoKr, a Kronecker product of a "
        "small factor and a (low-rank) large one (far fewer parameters); full: train every transformer weight. "
        "loha and lokr export in ComfyUI's keys only (diffusers' and kohya's loaders take LoRA pairs).",
        choices=("lora", "dora", "loha", "lokr", "full"))
    rank: int = opt(32, "LoRA rank: capacity and file size grow with it.", check=positive)
    alpha: Optional[float] = opt(None, "LoRA alpha; the update is scaled by alpha/rank. Empty = rank (scale 1).", check=positive)
    dropout: float = opt(0.0, "LoRA dropout on the adapter input.", check=below_one)
    lokr_factor: int = opt(
        -1, "lokr: the factor each weight's rows and columns are split by (peft's decompose_factor); -1 = as square as "
        "the size allows.", check=lambda v: None if v == -1 or v > 0 else f"must be -1 or positive, got {v}")
    decompose_both: bool = opt(False, "lokr: also split the small Kronecker factor into a rank-`rank` pair.")
    lr_ratio: Optional[float] = opt(
        None, "LoRA+: the up (B) matrices learn at this multiple of train.lr (16 is LoRA+'s suggestion); empty = the "
        "same lr.", check=positive)
    init_from: list[str] = opt(
        [], "Start from a LoRA you have (a .safetensors in comfyui, kohya / musubi-tuner, diffusers or ai-toolkit keys; "
        "Wan2.2 A14B: one per trained expert, matched by wan-tune's expert header or listed in model.experts order) "
        "instead of zeros. It must have adapter.rank and the modules adapter.targets select; alpha may differ. "
        "Read on a fresh start only; its sha256 goes into the checkpoints and the model card.")
    targets: list[str] = opt(
        ["attention", "ffn"],
        "Presets `attention` (self + cross q,k,v,o), `self_attention`, `cross_attention`, `ffn`, `vace_blocks` (every "
        "layer of a VACE model's VACE blocks; the other presets then mean the main blocks only), `face_adapters` "
        "(Wan2.2-Animate: the q,k,v,o of its face adapters, for a character's expressions), or diffusers module "
        "names such as `attn1.to_q`.",
    )


@dataclass
class TrainConfig:
    """Optimisation and precision."""

    steps: int = opt(2000, "Optimizer steps in the run.", check=positive)
    batch_size: int = opt(1, "Clips per step per GPU (one bucket per batch).", check=positive)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", check=positive)
    lr: float = opt(1e-4, "Peak learning rate.", check=positive)
    lr_schedule: str = opt("constant", "Learning-rate schedule after warmup.", choices=("constant", "linear", "cosine"))
    lr_high_noise: float = opt(
        1.0, "Wan2.2 A14B: the high-noise expert learns at this multiple of `lr` (users report it overtraining at "
        "the same lr as the low-noise one).", check=positive)
    warmup_steps: int = opt(0, "Steps of linear warmup from 0 to `lr`.", check=non_negative)
    optimizer: str = opt(
        "adamw", "adamw (torch); adamw8bit or paged_adamw8bit (bitsandbytes); adafactor (transformers' Adafactor at a "
        "fixed lr, factored second moments); prodigy (prodigyopt: estimates its step size, `lr` is its multiplier, "
        "usually 1.0); schedulefree_adamw (schedulefree: no lr schedule, its own warmup; held-out scores, validation "
        "and checkpoints use its averaged weights); came (came-pytorch: factored like Adafactor, plus a confidence "
        "term; betas come from optimizer_args, three of them); or `module:Class` for any torch optimizer (e.g. `torch.optim:SGD`). "
        "betas apply where the optimizer takes them; `optimizer_args` passes the rest.", check=optimizer_name)
    optimizer_args: dict[str, Any] = opt({}, "Extra keyword arguments for the optimizer, e.g. `{momentum: 0.9}`.")
    weight_decay: float = opt(0.01, "AdamW weight decay.", check=non_negative)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.", check=two_betas)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 = off.", check=non_negative)
    ema_decay: float = opt(
        0.0, "Keep an exponential moving average of the trainable weights at this decay (e.g. 0.999; 0 = off): saved in "
        "each checkpoint, scored on the held-out clips beside the raw weights, rendered by validation and exported "
        "by default (export.weights). Costs one fp32 copy of the trainable weights. One GPU or DDP.", check=below_one)
    loss_mask_conditioned_frames: bool = opt(
        False, "I2V / FLF2V: no loss on the latent frames the clip is conditioned on (the first; FLF2V's last too), "
        "which the model is given. TI2V-5B's image frame never carries loss.")
    mixed_precision: str = opt("bf16", "Autocast dtype of the forward pass (`no` on CPU).", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(True, "Recompute activations in the backward: ~30% slower, far less memory.")
    fp8_base: bool = opt(
        False, "Store frozen base weights in fp8 (LoRA only), read straight into fp8 from disk: halves their memory."
    )
    offload: str = opt(
        "none",
        "blocks: frozen transformer blocks wait in pinned host memory and stream to the GPU just before they run "
        "(LoRA only; needs gradient_checkpointing). none: the whole model on the GPU.",
        choices=("none", "blocks"),
    )
    offload_keep: int = opt(0, "With offload=blocks: blocks kept on the GPU (more: faster, more memory).", check=non_negative)
    activation_offload: bool = opt(
        False,
        "Keep each checkpointed block's input in pinned host memory from its forward to its recompute (copied on a "
        "side stream, one block prefetched): the GPU holds one block's input instead of all of them (14B 480p: "
        "12.5 GiB less). Needs gradient_checkpointing; LoRA or full.",
    )
    ffn_chunks: int = opt(
        0,
        "Compute each block's feed-forward in this many slices of tokens, each checkpointed: its hidden layer (~2.7x "
        "the width) never exists for all tokens at once. 0 or 1 = off. Costs one more FFN forward in the backward.",
        check=non_negative,
    )
    attention_checkpointing: bool = opt(
        False,
        "Checkpoint each attention layer again inside its block's recompute, keeping the attention kernel's output: "
        "the backward holds one layer's q/k/v, norms and rope at a time, not the whole block's (14B 720p: 6 GiB "
        "less). Same results; the projections, norms and rope run once more in the backward. Needs gradient_checkpointing.",
    )
    lora_fp32_inputs: bool = opt(
        False,
        "Cast each LoRA layer's input to fp32 as peft does by default. Off: the adapter reads the autocast dtype "
        "(the same bf16 matmul, without the fp32 copy in every block's working set); LoRA weights and AdamW stay fp32.",
    )
    compile: bool = opt(False, "torch.compile each transformer block (diffusers' compile_repeated_blocks): GPU speed-up.")
    route_ratio: float = opt(
        0.0, "Token routing (TREAD): this share of each clip's tokens, drawn afresh every step, skips the blocks "
        "route_start..route_end and rejoins after them (inference unchanged; held-out scores and validation never "
        "route). 0.5 over blocks 2..-2 roughly halves those blocks' work. 0 = off.", check=below_one)
    route_start: int = opt(2, "First routed block (0-based; negative counts from the end: -1 is the last).")
    route_end: int = opt(-2, "Last routed block, inclusive (negative counts from the end: -2 is the one before the last).")
    routes: list[RouteConfig] = opt(
        [], "Several token routes (a progressive schedule), each a mapping of the `train.routes[]` keys below (ratio, "
        "start, end): spans in block order that do not overlap, each with its own share of skipping tokens. Give "
        "route_ratio or routes, not both.")
    context_parallel: int = opt(
        1,
        "Split each clip's tokens across this many processes (context parallelism, diffusers' Ulysses or ring attention): "
        "groups of this many consecutive ranks train one batch together, so world = data-parallel x this. For "
        "clips whose activations one GPU cannot hold (720p, long clips). 1 = off.",
        check=positive,
    )
    context_parallel_kind: str = opt(
        "ulysses",
        "ulysses: an all-to-all swaps token shards for head shards around each attention (the degree must divide "
        "the attention heads). ring: each rank's keys and values pass round the group, partial attentions merged by "
        "their log-sum-exp (any degree that divides the tokens; attention runs on torch's flash kernel: bf16/fp16 "
        "on a GPU, so mixed precision on).",
        choices=("ulysses", "ring"),
    )
    caption_dropout: float = opt(0.1, "Share of steps trained on the empty prompt (keeps guidance working).", check=unit_interval)
    preserve_weight: float = opt(
        1.0, "Loss weight of the samples of `role: preserve` sources (whose target is the base model's own prediction: "
        "one more forward, without the adapter, in each step that draws one).", check=non_negative)


@dataclass
class TimestepsConfig:
    """How flow-matching noise levels (sigmas) are drawn."""

    sampling: str = opt(
        "shift",
        "uniform, logit_normal (mean, std), shift (sigma' = s*sigma / (1 + (s-1)*sigma)) or sigmoid (of scaled normal).",
        choices=("uniform", "logit_normal", "shift", "sigmoid"),
    )
    shift: Optional[Any] = opt(
        None, "Shift s for sampling=shift; empty = the variant's flow shift; auto = per batch, from its token count N: "
        "s = s_native * sqrt(N / N_native), the variant's flow shift at its native size scaled by SD3's "
        "resolution-dependent rule (Esser et al. 2024, sec. 5.3.2); a still or a small bucket trains at less shift, a "
        "large one at more. Inference keeps the variant's flow shift.", check=shift_value)
    logit_mean: float = opt(0.0, "Mean of the normal for logit_normal.")
    logit_std: float = opt(1.0, "Std of the normal for logit_normal.", check=positive)
    sigmoid_scale: float = opt(1.0, "Scale of the normal before the sigmoid, for sampling=sigmoid.", check=positive)
    sigma_min: float = opt(0.0, "Lowest sigma trained (Wan2.2 experts train one side of the boundary).", check=unit_interval)
    sigma_max: float = opt(1.0, "Highest sigma trained.", check=unit_interval)
    loss_weighting: str = opt("none", "Per-sample loss weight over sigma.", choices=("none", "sigma_sqrt", "cosmap"))


@dataclass
class CheckpointConfig:
    """What is saved, how often, and resuming."""

    every: int = opt(250, "Save every N optimizer steps (and always at the end).", check=positive)
    keep_last: int = opt(3, "Checkpoints kept; older ones are deleted. 0 = keep all.", check=non_negative)
    resume: str = opt("auto", "auto: continue from this run's newest complete checkpoint; never; or a step folder path.")
    on_new_data: str = opt(
        "stop", "Resuming when data.shards no longer holds the index the checkpoint trained on (another prep wrote "
        "there): stop, saying what changed; or continue, training on the shards as they are now.",
        choices=("stop", "continue"))


@dataclass
class ValidationConfig:
    """Sample videos during training."""

    every: int = opt(0, "Render the prompts every N steps; 0 = off.", check=non_negative)
    prompts: list[str] = opt([], "Prompts to render; include the trigger word.")
    images: list[str] = opt([], "I2V only: first-frame image per prompt.")
    last_images: list[str] = opt([], "FLF2V only: last-frame image per prompt (with `images`); both empty: the first "
                                     "and last frames of held-out clips (else of the first clips).")
    references: list[str] = opt([], "VACE: reference image(s) per prompt, several separated by `;` (an empty "
                                    "entry: none). All three VACE lists empty: each prompt takes a clip's own inputs "
                                    "(held-out clips first). Wan2.2-Animate: the character image per prompt (your "
                                    "mascot), performing a clip's pose and face videos (held-out clips first); an "
                                    "empty entry or list: the clip's own reference, else its first frame.")
    controls: list[str] = opt([], "VACE only: control video per prompt (an empty entry: none).")
    masks: list[str] = opt([], "VACE only: mask video per prompt, for its control (an empty entry: none).")
    frames: int = opt(33, "Frames per validation video (4k+1).", check=frames_4k1)
    height: Optional[int] = opt(None, "Height in pixels; empty = the first `data.resolutions` entry.", check=multiple_of_16)
    width: Optional[int] = opt(None, "Width in pixels; empty = the first `data.resolutions` entry.", check=multiple_of_16)
    steps: int = opt(30, "Denoising steps.", check=positive)
    guidance_scale: float = opt(5.0, "Classifier-free guidance scale (Wan2.2 A14B: of the high-noise expert).", check=non_negative)
    guidance_scale_2: Optional[float] = opt(
        None, "Wan2.2 A14B: guidance of the low-noise expert; empty = guidance_scale.", check=non_negative
    )
    seed: int = opt(0, "Noise seed, fixed so videos compare across steps.", check=seed_range)


@dataclass
class EvalConfig:
    """The held-out loss (needs `data.holdout` > 0), fixed sigmas and noise: the best checkpoint goes to `<run>/best.json`."""

    every: int = opt(0, "Score every N steps; 0 = with every checkpoint (only checkpointed steps can be `best`).",
                     check=non_negative)
    sigmas: list[float] = opt([0.1, 0.3, 0.5, 0.7, 0.9], "Noise levels each held-out sample is scored at.",
                              check=sigmas_in_unit_interval)
    seed: int = opt(0, "Seed of the fixed noise.", check=seed_range)


@dataclass
class TrackingConfig:
    """Experiment tracking (rank 0 only)."""

    backend: str = opt("wandb", "wandb, tensorboard or none.", choices=("wandb", "tensorboard", "none"))
    project: str = opt("wan-tune", "W&B project (or TensorBoard subfolder).")
    entity: Optional[str] = opt(None, "W&B team or user; empty = your default.")
    offline: bool = opt(False, "W&B offline: log to disk only, upload later with `wandb sync`.")
    log_every: int = opt(10, "Log metrics every N steps.", check=positive)
    log_artifacts: str = opt(
        "best", "W&B model artifacts: best = the checkpoint with the lowest held-out loss (the last one without held-out "
        "clips), all = every checkpoint, none; the exported files are logged at export unless none.",
        choices=("best", "all", "none"))


@dataclass
class ExportConfig:
    """What `wan-tune export` writes."""

    format: str = opt(
        "comfyui",
        "comfyui (original keys: ComfyUI and diffusers load it), diffusers (PEFT keys), kohya, or all.",
        choices=("comfyui", "diffusers", "kohya", "all"),
    )
    out: Optional[str] = opt(None, "Output folder; empty = `<checkpoint>/export/`.")
    merge: bool = opt(False, "Bake the LoRA into the base weights and write a full transformer.")
    weights: Optional[str] = opt(
        None, "ema: the moving average of train.ema_decay; raw: the weights as last stepped. Empty = ema when the "
        "checkpoint keeps one (it also picks which held-out score best.json follows).", choices=("ema", "raw"))


@dataclass
class Recipe:
    """A whole project: every stage reads its section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    vace: VaceConfig = field(default_factory=VaceConfig)
    animate: AnimateConfig = field(default_factory=AnimateConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


ENTRIES: dict[str, type] = {"data.sources": SourceConfig, "train.routes": RouteConfig}
"""List keys whose entries are mappings of their own keys (checked, and documented, key by key)."""
SECTIONS: dict[str, type] = {name: f.default_factory for name, f in Recipe.__dataclass_fields__.items()}  # type: ignore[misc]
