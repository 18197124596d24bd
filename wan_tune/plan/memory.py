"""Per-device memory of one training step: weights by dtype, trainable state, activations, block
offload and ZeRO sharding, for a recipe and a set of memory settings (`Setup`).

Activations, weights and FLOPs come from `meta_step` (a step counted on the meta device); the rest is
the layout of optimizer state and of weights across GPUs, stated where it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import Recipe, to_yaml
from ..config.sources import all_frames, all_resolutions
from ..memory.host_arena import packed_bytes
from ..models.precision import AUTOCAST, base_dtype
from ..models.variants import Variant, get_variant, trained_experts
from .flops import step_flops
from .meta_step import StepCount, count_step, with_routes, with_train

GIB = 2**30
# Streamed blocks on the GPU at once under train.offload=blocks: the one running, the next one
# prefetched on the side stream, and the one just finished (memory/block_offload.py drops its copy, the
# memory returns once the backward no longer holds views of it).
STREAMED_BLOCKS = 3
# Block inputs on the GPU at once under train.activation_offload: in the backward, the input of the
# block recomputing and the one copied back ahead of it (memory/activation_offload.py).
INPUTS_IN_FLIGHT = 2
# DeepSpeed's defaults (runtime/zero/config.py), which launch/accelerate/zero*.yaml leave as they are:
# gradients are reduced through a buffer of reduce_bucket_size elements, two of them with
# overlap_comm (on by default for ZeRO-3 only).
REDUCE_BUCKET_ELEMENTS = 500_000_000
# diffusers' Ulysses attention (TemplatedUlyssesAttention): in the backward, the gradients of q, k
# and v as the kernel returns them, permuted for the all-to-all and exchanged, before the permuted
# copies back are made and the first ones freed; one rank's q each.
ALL_TO_ALL_COPIES = 9
# diffusers' ring attention (TemplatedRingAttention.backward): fp32 sums of the gradients of q, k
# and v, and the k/v gradient buffer passed to the next rank.
RING_FP32_GRADIENTS = 5
# CLIP ViT-H/14 at 224 px: (224/14)^2 patches + the class token; Wan2.1 I2V's image tokens.
CLIP_IMAGE_TOKENS = 257
_COUNTS: dict[tuple, StepCount] = {}


@dataclass(frozen=True)
class Setup:
    """The memory settings a plan compares; `overrides()` is how a recipe says them."""

    checkpointing: bool
    fp8: bool
    offload_keep: int | None = None
    """Blocks kept on the GPU under train.offload=blocks; None = no offload."""
    zero: int = 0
    """DeepSpeed ZeRO stage (0: none, plain DDP when gpus > 1)."""
    gpus: int = 1
    activations: bool = False
    """train.activation_offload: checkpointed block inputs wait in host memory."""
    ffn_chunks: int = 0
    """train.ffn_chunks: each block's feed-forward in slices of tokens (0: whole)."""
    attention: bool = False
    """train.attention_checkpointing: attention layers checkpointed again inside the block's recompute."""
    cp: int = 1
    """train.context_parallel: each clip's tokens split over groups of this many GPUs (the recipe's kind)."""

    def overrides(self) -> str:
        keys = [f"train.gradient_checkpointing={str(self.checkpointing).lower()}",
                f"train.fp8_base={str(self.fp8).lower()}", f"train.activation_offload={str(self.activations).lower()}",
                f"train.ffn_chunks={self.ffn_chunks}",
                f"train.attention_checkpointing={str(self.attention).lower()}", "train.offload=none"]
        if self.offload_keep is not None:
            keys[-1:] = ["train.offload=blocks", f"train.offload_keep={self.offload_keep}"]
        if self.cp > 1:
            keys.append(f"train.context_parallel={self.cp}")
        return " ".join(keys)

    def launch(self) -> str:
        if self.zero:
            return f"accelerate launch --config_file launch/accelerate/zero{self.zero}.yaml --num_processes {self.gpus}"
        if self.gpus > 1:
            return f"accelerate launch --config_file launch/accelerate/ddp.yaml --num_processes {self.gpus}"
        return "accelerate launch --config_file launch/accelerate/single_gpu.yaml"

    @classmethod
    def of(cls, recipe: Recipe, zero: int = 0, gpus: int = 1, cp: int = 1) -> "Setup":
        t = recipe.train
        return cls(t.gradient_checkpointing, t.fp8_base, t.offload_keep if t.offload == "blocks" else None, zero, gpus,
                   t.activation_offload and t.gradient_checkpointing, t.ffn_chunks if t.ffn_chunks > 1 else 0,
                   t.attention_checkpointing and t.gradient_checkpointing, cp)


@dataclass(frozen=True)
class RunShape:
    """The largest batch a recipe trains on: its biggest resolution and frame bucket."""

    batch: int
    frames: int
    height: int
    width: int
    latent: tuple[int, int, int, int]
    """[C, F', H', W'] of one sample."""
    tokens: int
    """Transformer tokens per sample."""
    text_tokens: int
    text_dim: int
    extras: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Other batch tensors (I2V conditioning) and their per-sample shapes."""

    def batch_shapes(self, cp: int = 1, patch: tuple[int, int] = (2, 2)) -> dict[str, tuple[int, ...]]:
        """The collated batch as the trainer hands it to the model (text padded to its full length).

        With context parallelism (`cp` > 1), what one rank of the group works on: tokens / cp of
        them, laid out as one latent frame of h x w patches (h x w = tokens / cp, as square as the
        count allows: the rope covers 1024 patches per axis; conditioning likewise).
        Every per-token tensor of a block then has one rank's size, and the attention's too: after
        Ulysses' all-to-all a rank holds all tokens of heads / cp, the same bytes. The text is
        not split. What differs (the all-to-all copies, the gathered output) is added by the plan."""
        shapes = {"latents": self.latent, "text": (self.text_tokens, self.text_dim), **self.extras}
        if cp > 1:
            n = self.tokens // cp
            h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
            grid = (1, h * patch[0], n // h * patch[1])
            shapes = {k: (s[0], *grid) if k in ("latents", "condition") else s for k, s in shapes.items()}
        return {k: (self.batch, *s) for k, s in shapes.items()}


def run_shape(recipe: Recipe, variant: Variant) -> RunShape:
    """Latent and token counts of the recipe's largest bucket (aspect buckets keep the pixel area of
    their `data.resolutions` entry within a few percent)."""
    frames = max(all_frames(recipe))
    height, width = max(all_resolutions(recipe), key=lambda hw: hw[0] * hw[1])
    s, z = variant.vae_spatial, variant.vae_z_dim
    latent = (z, (frames - 1) // 4 + 1, height // s, width // s)  # the VAE packs 4 frames per latent after the first
    _, ph, pw = variant.transformer["patch_size"]
    extras: dict[str, tuple[int, ...]] = {}
    if variant.animate:
        latent, extras = _animate_shapes(variant, latent, frames)
    elif variant.vace:  # the context beside the latents (a control: no reference frames counted)
        extras["vace_context"] = (variant.transformer["vace_in_channels"], *latent[1:])
    if variant.image_conditioned(recipe.data.task) and not variant.animate:
        if variant.expand_timesteps:  # TI2V-5B: the image's latent replaces the first latent frame
            extras["condition"] = (z, 1, *latent[2:])
        else:  # mask + condition latents beside the noisy ones
            extras["condition"] = (variant.in_channels - z, *latent[1:])
        if variant.clip_image_tokens:  # FLF2V: the first and the last frame's
            extras["image_embeds"] = (CLIP_IMAGE_TOKENS * (2 if variant.last_frame else 1), variant.transformer["image_dim"])
    tokens = latent[1] * (latent[2] // ph) * (latent[3] // pw)
    return RunShape(recipe.train.batch_size, frames, height, width, latent, tokens, recipe.data.max_text_tokens,
                    variant.transformer["text_dim"], extras)


def _animate_shapes(variant: Variant, latent: tuple[int, int, int, int], frames: int):
    """Wan2.2-Animate's step (models/animate.py): the latents with the reference's slot first (one
    more latent frame of tokens), the reference and segment condition beside them, the pose latents
    (the clip's frames), the face video as 8-bit frames at the motion encoder's square, the CLIP tokens."""
    z, f, h, w = latent
    size = variant.transformer["motion_encoder_size"]
    extras = {"reference": (z + 4, 1, h, w), "segment": (z + 4, f, h, w), "pose": (z, f, h, w),
              "face": (3, frames, size, size), "image_embeds": (CLIP_IMAGE_TOKENS, variant.transformer["image_dim"])}
    return (z, f + 1, h, w), extras


@dataclass
class Breakdown:
    """Bytes per (section, item) on one device, and the step's peak."""

    rows: list[tuple[str, str, float]]
    total: float
    host: float = 0.0
    """Host RAM holding weights that wait off the device (offloaded blocks, an idle expert)."""


def optimizer_state_bytes(optimizer: str) -> float:
    """Bytes of optimizer state per trained parameter: AdamW's two fp32 moments (8), two 8-bit ones
    (2), Adafactor's factored second moment (a row and a column per matrix: for a rank-32 LoRA of
    width 5120, (32 + 5120) x 4 bytes over 32 x 5120 values, 0.13; counted 0.25), Prodigy's four
    fp32 buffers (its moments, `s` and the initial weights `p0`: 16), schedule-free AdamW's `z` and
    second moment (8: it keeps no first moment), CAME's first moment plus factored second moment
    and confidence (4 + 2 x 0.25). A `module:Class` optimizer is counted as AdamW (most keep two
    moments; plain SGD keeps less)."""
    return {"adamw8bit": 2.0, "paged_adamw8bit": 2.0, "adafactor": 0.25, "prodigy": 16.0, "schedulefree_adamw": 8.0,
            "came": 4.5}.get(optimizer, 8.0)


class MemoryPlan:
    """Memory of a recipe's training step on `device`, in the recipe's dtypes and autocast ('gpu':
    CUDA's autocast, offload and several processes; 'cpu': one process, CPU autocast)."""

    def __init__(self, recipe: Recipe, device: str = "gpu"):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device is 'gpu' or 'cpu', got {device!r}")
        self.recipe, self.device = recipe, device
        self.variant = get_variant(recipe.model.variant)
        self.shape = run_shape(recipe, self.variant)
        # VACE blocks are Wan blocks beside the main ones: counted as more layers of the same kind.
        # Block offload and activation offload move the main blocks' (`main_layers`) only.
        self.main_layers = self.variant.transformer["num_layers"]
        self.layers = self.main_layers + self.variant.vace_blocks
        self.full = recipe.adapter.method == "full"
        self.experts = len(trained_experts(self.variant, recipe.model.experts))
        # model.expert_mode=shared: both experts apply one adapter (one set of weights, gradients, state)
        self.adapters = 1 if recipe.model.expert_mode == "shared" else self.experts
        self._counts: dict[tuple, StepCount] = {}

    @property
    def ring(self) -> bool:
        """train.context_parallel_kind=ring (else Ulysses)."""
        return self.recipe.train.context_parallel_kind == "ring"

    def cp_degrees(self, gpus: int) -> list[int]:
        """Context-parallel degrees above 1 that `gpus` can run: each divides the GPUs, the
        clip's tokens and (Ulysses splits them) the attention heads."""
        heads = self.variant.transformer["num_attention_heads"]
        return [k for k in range(2, gpus + 1)
                if gpus % k == 0 and (self.ring or heads % k == 0) and self.shape.tokens % k == 0]

    # --- what the meta device counts ----------------------------------------------------------

    @property
    def load_dtype(self) -> torch.dtype:
        """The frozen weights' dtype, as load_for_training picks it (on a CPU too)."""
        return base_dtype(self.recipe)

    @property
    def autocast(self) -> torch.dtype | None:
        return AUTOCAST[self.recipe.train.mixed_precision]

    def count(self, checkpointing: bool, fp8: bool, deepspeed: bool = False, ffn_chunks: int = 0,
              attention: bool = False, cp: int = 1) -> StepCount:
        """The whole model's step, from a 2-block model counted on the meta device, for one rank of
        a context-parallel group of `cp`. Block inputs are counted as kept on the device: activation
        offload is taken off by `_moved_inputs`."""
        mine = (checkpointing, fp8, deepspeed, ffn_chunks, attention, cp)
        if mine not in self._counts:
            recipe = with_train(self.recipe, gradient_checkpointing=checkpointing, fp8_base=fp8 and not self.full,
                                ffn_chunks=ffn_chunks, attention_checkpointing=attention and checkpointing,
                                activation_offload=False)
            engine = (self.autocast or torch.float32) if deepspeed else None
            args = (self.shape.batch_shapes(cp, self.variant.transformer["patch_size"][1:]), self.load_dtype,
                    self.autocast, engine)
            count = self._counted(recipe, args).extend(self.layers)
            routes = self.routing()
            if routes:  # the routed blocks at their kept tokens (a count per ratio: blocks 1..3 of 4 routed)
                routed = {ratio: self._counted(recipe, args, ((ratio, 1, 3),)) for ratio, _, _ in routes}
                count = with_routes(count, routed, routes)
            self._counts[mine] = count
        return self._counts[mine]

    def _counted(self, recipe: Recipe, args: tuple, routes: tuple = ()) -> StepCount:
        # Kept for the process (never on disk): plans of the same recipe share their counts.
        key = (to_yaml(recipe), self.variant.name, *map(repr, args), routes)
        if key not in _COUNTS:
            _COUNTS[key] = count_step(recipe, self.variant, *args, cuda=self.device == "gpu",
                                      layers=4 if routes or self.variant.animate else 2, routes=routes)
        return _COUNTS[key]

    def flops(self, cp: int = 1) -> float:
        """Matmul FLOPs of one step on one GPU (`step_flops` of the whole model, built on the meta
        device; a LoRA's own matmuls are rank-sized and not counted, LoHa's and LoKr's whole-size
        updates are); a context-parallel group of `cp` splits them evenly (each rank: its tokens'
        projections, its heads' attention)."""
        from ..models.spec import lora_config
        from ..models.variants import transformer_class

        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = transformer_class(self.variant)(**self.variant.transformer)
            if self.recipe.adapter.method in ("loha", "lokr"):
                model.add_adapter(lora_config(self.recipe, self.variant))
        # Attention runs within each sample: a batch costs `batch` times one sample.
        face_frames = self.shape.frames if self.variant.animate else 0  # the motion encoder reads every face frame
        return self.shape.batch * step_flops(model, self.shape.tokens, self.full, self.shape.text_tokens,
                                             self.routing(), face_frames) / cp

    def routing(self) -> list[tuple[float, int, int]]:
        """train.route_ratio's or train.routes' (ratio, first, last block) of each route ([]: none)."""
        from ..models.token_routing import route_spans

        return route_spans(self.variant.transformer["num_layers"], self.recipe.train)

    # --- the layout of one step ----------------------------------------------------------------

    def breakdown(self, s: Setup) -> Breakdown:
        if self.device == "cpu" and (s.zero or s.gpus > 1 or s.offload_keep is not None or s.cp > 1):
            raise ValueError("a CPU plan is one process without offload, ZeRO or context parallelism")
        count = self._count(s)
        rows = self._weights(s, count) + self._trainable(s, count)
        moved = self._moved_inputs(s, count)
        rows += self._context_parallel(s)
        rows.append(("activations", "kept for backward", count.saved - moved))
        # A small Animate model's peak is its motion encoder's, before the blocks (the 512 px face frames).
        working = "backward working set" if count.late_peak >= count.early_peak else "motion encoder (forward)"
        rows.append(("activations", working, count.peak - count.saved))
        optimizer = self._optimizer_temporaries(s, count)
        rows.append(("optimizer", "AdamW step temporaries", optimizer))
        render = self.render_extra(s)
        if render:
            rows.append(("validation", "untrained expert (renders)", render))
        # Activations are gone when the optimizer steps, and both when a validation round renders:
        # the peak holds the largest of the three.
        resident = sum(b for sec, _, b in rows if sec not in ("activations", "optimizer", "validation"))
        return Breakdown(rows, resident + max(count.peak - moved, optimizer, render), self._host(s, count))

    def _context_parallel(self, s: Setup) -> list[tuple[str, str, float]]:
        """What a rank of a context-parallel group holds beyond its share of the tokens (counted on
        top of the peak, though they are transient). Ulysses: diffusers' attention copies q, k and
        v around each all-to-all (permuted, exchanged, permuted back; in the backward the gradients
        of all three the same way: up to 9 tensors of one rank's q at once). Ring: diffusers
        gathers the keys and values of the whole clip before the ring steps (forward and backward),
        and the backward sums the gradients of q, k and v in fp32, with the k/v gradients passed on
        (5 fp32 tensors of one rank's q). After proj_out the output is gathered whole on every
        rank, for the loss and its gradient."""
        if s.cp == 1:
            return []
        cfg, b, tokens = self.variant.transformer, self.shape.batch, self.shape.tokens
        act = 4 if self.autocast is None else torch.finfo(self.autocast).bits // 8
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        out = cfg["out_channels"] * cfg["patch_size"][0] * cfg["patch_size"][1] * cfg["patch_size"][2]
        gathered = ("ctx. parallel", "whole output, gathered", 3 * b * tokens * out * 4)
        if self.ring:
            return [("ctx. parallel", "whole clip's K and V", 2 * b * tokens * inner * act),
                    ("ctx. parallel", "fp32 ring gradients", RING_FP32_GRADIENTS * b * tokens // s.cp * inner * 4), gathered]
        return [("ctx. parallel", "all-to-all copies", ALL_TO_ALL_COPIES * b * tokens // s.cp * inner * act), gathered]

    def _moved_inputs(self, s: Setup, count: StepCount) -> float:
        """Bytes of block inputs train.activation_offload takes off the device (with checkpointing,
        what a block keeps for the backward is its input). On a CPU, host and device are one memory:
        nothing leaves it, and the copies back in flight come on top."""
        if not (s.activations and s.checkpointing):
            return 0.0
        if self.device == "cpu":
            return -INPUTS_IN_FLIGHT * count.block_saved
        return (self.main_layers - INPUTS_IN_FLIGHT) * count.block_saved

    def _weights(self, s: Setup, count: StepCount) -> list[tuple[str, str, float]]:
        on_device = {d: float(n) for d, n in count.frozen.items()}
        if self.device == "cpu" and self.experts > 1:  # host and device are one memory: both experts stay
            on_device = {d: n * self.experts for d, n in on_device.items()}
        if s.offload_keep is not None:
            resting = self._resting_blocks(s)
            block = self._per_block(s)
            on_device = {d: n - resting * block.get(d, 0) for d, n in on_device.items()}
        rows = [("base weights", d, n / (s.gpus if s.zero == 3 else 1)) for d, n in sorted(on_device.items())]
        if s.zero == 3:  # each module's weights are gathered whole around its forward and backward
            rows.append(("base weights", "ZeRO-3 gathered block", sum(self._per_block(s).values())))
        return rows

    def _per_block(self, s: Setup) -> dict[str, float]:
        """Frozen bytes of one transformer block, by dtype."""
        return self._count(s).block_frozen

    def _count(self, s: Setup) -> StepCount:
        return self.count(s.checkpointing, s.fp8, s.zero > 0, s.ffn_chunks, s.attention, s.cp)

    def _trainable(self, s: Setup, count: StepCount) -> list[tuple[str, str, float]]:
        n = count.trainable * self.adapters  # both A14B experts keep their LoRA and optimizer on the GPU
        what = "weights" if self.full else "LoRA weights"
        moments = optimizer_state_bytes(self.recipe.train.optimizer)
        state = {"adafactor": "Adafactor state", "prodigy": "Prodigy state", "schedulefree_adamw": "schedule-free state",
                 "came": "CAME state"}.get(self.recipe.train.optimizer, "AdamW moments")
        # train.ema_decay: the average is one more fp32 copy of the trainable weights (one GPU or DDP only).
        ema = [("trainable", "EMA copy fp32", 4 * n)] if self.recipe.train.ema_decay else []
        if s.zero == 0:
            rows = [("trainable", f"{what} fp32", 4 * n), ("trainable", "gradients fp32", 4 * n),
                    ("trainable", state, moments * n), *ema]
            if s.gpus > 1:  # DDP reduces through buckets as large as the gradients (gradient_as_bucket_view off)
                rows.append(("trainable", "DDP gradient buckets", 4 * n))
            return rows
        # DeepSpeed in mixed precision: the module holds 16-bit weights and gradients, the optimizer
        # an fp32 master copy and the moments; ZeRO-2 partitions gradients and optimizer state, ZeRO-3
        # the weights too.
        g = s.gpus
        low = 2 if self.autocast is not None else 4
        buckets = 2 if s.zero == 3 else 1
        return [("trainable", f"{what} ({low * 8}-bit)", low * n / (g if s.zero == 3 else 1)),
                ("trainable", f"gradients ({low * 8}-bit)", low * n / g),
                ("trainable", "fp32 master weights", 4 * n / g), ("trainable", state, moments * n / g),
                ("trainable", "ZeRO reduce buckets", buckets * low * REDUCE_BUCKET_ELEMENTS)]

    def _optimizer_temporaries(self, s: Setup, count: StepCount) -> float:
        """torch's AdamW: on a GPU the foreach step makes one fp32 temporary per state tensor
        (sqrt of the second moment); on a CPU the loop makes one for the parameter at hand.
        bitsandbytes' 8-bit step works in place; Adafactor's per-parameter loop makes one at a time."""
        if self.recipe.train.optimizer in ("adamw8bit", "paged_adamw8bit", "adafactor"):
            return 0.0
        if self.device == "cpu":
            return 4.0 * count.largest_trainable
        return 4.0 * count.trainable * self.adapters / (s.gpus if s.zero else 1)

    def render_extra(self, s: Setup) -> float:
        """GPU bytes a validation round adds while it renders, beyond the training step's resident
        weights and state (the step's activations are gone then): a Wan2.2 expert the run does not
        train (whole, or its non-block weights and the streamed blocks with block offload), which
        waits in host memory between rounds (audit B3). The VAE, CLIP and the renders' own
        activations are not counted."""
        if not (self.recipe.validation.every and self.variant.two_experts and self.experts == 1):
            return 0.0
        count = self._count(s)
        return float(sum(count.frozen.values())) - self._resting_blocks(s) * sum(count.block_frozen.values())

    def _resting_blocks(self, s: Setup) -> int:
        """Blocks whose weights wait in host memory under train.offload=blocks (0 without offload)."""
        return 0 if s.offload_keep is None else max(0, self.main_layers - s.offload_keep - STREAMED_BLOCKS)

    def _host(self, s: Setup, count: StepCount) -> float:
        """Host RAM the run pins, per trained expert (each has its own copies), in the slabs of the
        trainer's `HostArena`s (memory/host_arena.py: packed as they pack, tails and last slabs
        included): the streamed blocks' weights; with two experts, each one's other frozen weights
        (the active one's host copy stays: offloading drops the device copy only); a buffer per block
        input under activation offload."""
        per_expert = 0.0
        block = list(count.block_frozen_sizes)
        streamed = self.main_layers - s.offload_keep if s.offload_keep is not None else 0
        if streamed:
            per_expert += packed_bytes(block * streamed)
        if self.device == "gpu" and self.experts > 1:
            # The meta model's outer weights hold its VACE blocks below layer 2; the others count as blocks.
            counted_vace = sum(1 for i in self.variant.transformer.get("vace_layers") or () if i < 2)
            resident = self.main_layers - streamed + self.variant.vace_blocks - counted_vace
            per_expert += packed_bytes(list(count.outer_frozen_sizes) + block * resident)
        if self.device == "gpu" and s.activations and s.checkpointing:
            per_expert += packed_bytes([count.block_saved] * self.main_layers)
        return per_expert * (self.experts if self.device == "gpu" else 1)
