"""What a training run holds once it is built: the trained transformer(s) with their optimizers
and schedules (one trainee per expert; only those are loaded), and what every step reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Recipe
from ..memory.block_offload import BlockOffload, ExpertSwap
from ..models.loading import recipe_source
from ..models.precision import drop_autocast_wrapper
from ..models.spec import trainable_parameters
from ..models.variants import Variant, expert_label
from ..parallel.context_parallel import ONE_PROCESS_PER_CLIP, Layout
from ..parallel.context_parallel import enable as enable_context_parallel
from ..parallel.sharded_load import fill_shards
from ..parallel.sharding import local_share, sharding
from ..training.model_setup import load_for_training
from .ema import Ema
from .errors import TrainingError
from .experts import Trainee, make_trainee, sigma_bounds, sigma_sampler
from .init_from import init_file
from .optim import make_optimizer, make_scheduler


@dataclass
class Run:
    recipe: Recipe
    accelerator: object
    run_dir: Path
    variant: Variant
    trainees: list[Trainee]
    boundary: float | None
    """Wan2.2 A14B: sigma at or above which the high-noise expert runs (the model folder's own)."""
    bounds: dict[str, tuple[float, float]]
    """Each trainee's sigma range: the recipe's narrowed to its side of the boundary."""
    draw: Callable
    """draw(n, generator, lo, hi) -> n sigmas from the recipe's schedule."""
    compute_dtype: torch.dtype
    sharded: str | None
    trainable: int
    say: Callable
    layout: Layout = ONE_PROCESS_PER_CLIP
    """Data-parallel x context-parallel (train.context_parallel)."""
    swap: ExpertSwap | None = None
    """Wan2.2 A14B training both experts: the idle one's frozen weights wait in host memory."""

    @property
    def together(self) -> bool:
        return renders_together(self.sharded, self.layout)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def live(self) -> dict:
        """{expert: the unwrapped module} of the trainees, as validation and scoring take them."""
        return {tr.name: self.accelerator.unwrap_model(tr.model) for tr in self.trainees}


def tie_adapter(model, source) -> None:
    """Make `model`'s trainable parameters the very Parameter objects of `source` (the same
    architecture, the same adapter): one adapter, applied in both models."""
    own = dict(source.named_parameters())
    for name in trainable_parameters(model):
        path, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(path), attr, own[name])


def renders_together(sharded: str | None, lay: Layout) -> bool:
    """Whether every rank must run the model's forwards together (sharded weights gather,
    context-parallel groups split each clip): validation renders on every rank then."""
    return bool(sharded) or lay.cp > 1


def build_run(recipe: Recipe, accelerator, run_dir: Path, variant: Variant, experts: list[str], say,
              lay: Layout = ONE_PROCESS_PER_CLIP, fresh: bool = True) -> Run:
    """Load each trained expert (LoRA added, offload hooks, compile), its optimizer and schedule,
    prepared by accelerate. `fresh`: no checkpoint follows (adapter.init_from applies)."""
    boundary = recipe_source(recipe, components=()).boundary_ratio  # the folder's model_index.json
    trainees, n_trainable = [], 0
    swap = ExpertSwap(accelerator.device) if len(experts) > 1 else None
    sharded = sharding(accelerator)
    # FSDP2: no rank holds the whole model; each reads its shards' rows after prepare (sharded_load).
    # Not ZeRO-3: DeepSpeed broadcasts rank 0's weights into every rank's whole copy before it
    # partitions them (measured: the other rank's peak RSS is a whole copy), and makes the fp32
    # master copies of a full fine-tune inside prepare, before anything could be filled in.
    # DoRA sets its magnitudes from the base weights as its adapter is made: those must be read first.
    streamed = sharded == "fsdp2" and not recipe.train.fp8_base and recipe.adapter.method != "dora"
    shared = recipe.model.expert_mode == "shared" and len(experts) > 1
    for name in experts:
        torch.manual_seed(recipe.run.seed)  # LoRA init: the same for an expert trained alone or beside the other
        model = load_for_training(recipe, expert=name, empty=streamed, fresh=fresh)
        if fresh and recipe.adapter.init_from:
            say(f"adapter.init_from: {expert_label(variant, name)} starts from {init_file(recipe, variant, name)}")
        if shared and trainees:  # model.expert_mode=shared: the first expert's adapter, the very same Parameters
            tie_adapter(model, accelerator.unwrap_model(trainees[0].model))
        if lay.cp > 1:  # diffusers' hooks split the tokens at the first block, gather after proj_out
            enable_context_parallel(model, lay, accelerator.device)
        # Before prepare, which moves to the GPU whatever is still on the model.
        blocks = BlockOffload(model, recipe.train.offload_keep, accelerator.device) if recipe.train.offload == "blocks" else None
        if swap is not None:
            swap.add(model, blocks)
        if recipe.train.compile:  # regional: one compiled block serves all 30-40, compiling in seconds, not minutes
            model.compile_repeated_blocks(fullgraph=False)
        if shared and trainees:  # one optimizer and schedule for the one adapter
            model, optimizer, scheduler = accelerator.prepare(model), trainees[0].optimizer, trainees[0].scheduler
        else:
            named = trainable_parameters(model)
            n_trainable += sum(p.numel() for p in named.values())
            scale = recipe.train.lr_high_noise if variant.two_experts and expert_label(variant, name) == "high_noise" else 1.0
            optimizer = make_optimizer(named, recipe.train, recipe.adapter.lr_ratio, scale)
            scheduler = make_scheduler(optimizer, recipe.train)
            model, optimizer = accelerator.prepare(model, optimizer)
        drop_autocast_wrapper(accelerator.unwrap_model(model))
        if streamed:
            read = fill_shards(accelerator.unwrap_model(model), recipe_source(recipe), name)
            say(f"fsdp2: each rank read only its shards' rows of the weights ({read / 2**20:,.0f} MiB on rank 0): "
                "no rank held the whole model")
        trainee = make_trainee(variant, name, boundary, model, optimizer, scheduler)
        # FSDP2 replaces the parameters by sharded ones: clip what the optimizer now holds.
        live = trainable_parameters(accelerator.unwrap_model(model))
        trainee.params = list(live.values())
        if recipe.train.ema_decay:
            trainee.ema = trainees[0].ema if shared and trainees else Ema(live, recipe.train.ema_decay)
        trainees.append(trainee)
    t = recipe.timesteps
    try:
        bounds = {tr.name: sigma_bounds(tr, t.sigma_min, t.sigma_max) for tr in trainees}
    except ValueError as err:
        raise TrainingError(f"{err}: widen the range or pick the other expert (model.experts)") from None
    compute_dtype = accelerator.unwrap_model(trainees[0].model).dtype  # the base weights' dtype (LoRA params are fp32)
    if sharded:
        held, total = local_share(accelerator.unwrap_model(trainees[0].model))
        say(f"{sharded}: rank 0 holds {held:,} of the model's {total:,} weights ({held / total:.1%})")
    if variant.two_experts:
        say(f"experts: {', '.join(f'{tr.label} (sigma {bounds[tr.name][0]:g}-{bounds[tr.name][1]:g})' for tr in trainees)}; "
            f"boundary {boundary}")
    draw = sigma_sampler(recipe, variant)
    return Run(recipe, accelerator, run_dir, variant, trainees, boundary, bounds, draw, compute_dtype, sharded,
               n_trainable, say, lay, swap)
