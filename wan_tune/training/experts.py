"""The transformers a run trains: one for Wan2.1 and TI2V-5B, one or both experts of Wan2.2 A14B.

Each expert owns a side of the boundary at inference (high noise at or above it, low noise
below), so each trains only there: a step first picks the expert, as inference would pick it
for a sigma drawn from the recipe's schedule, then draws the step's sigmas inside that expert's
range. Each expert has its own adapter, optimizer and lr schedule. All ranks and all micro-batches
of a step use the same expert (the routing draw depends on the step alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.variants import Variant, expert_label
from . import flow_matching as fm


@dataclass
class Trainee:
    name: str
    """Pipeline component: `transformer`, or `transformer_2` (A14B's low-noise expert)."""
    label: str
    """What logs and exported files call it: `high_noise` / `low_noise`, or `transformer`."""
    model: Any
    optimizer: Any
    scheduler: Any
    sigma_range: tuple[float, float]
    params: list = field(default_factory=list)
    ema: Any = None
    """train.ema_decay: the moving average of `params` (training/ema.py)."""


def sigma_bounds(trainee: Trainee, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """The recipe's [sigma_min, sigma_max] narrowed to the expert's side of the boundary."""
    lo, hi = max(sigma_min, trainee.sigma_range[0]), min(sigma_max, trainee.sigma_range[1])
    if lo >= hi:
        raise ValueError(
            f"the {trainee.label} expert denoises sigmas in [{trainee.sigma_range[0]}, {trainee.sigma_range[1]}], "
            f"outside timesteps.sigma_min/sigma_max = [{sigma_min}, {sigma_max}]"
        )
    return lo, hi


def route(trainees: list[Trainee], variant: Variant, boundary: float | None, seed: int, step: int, draw) -> Trainee:
    """The trainee of a step. With two experts, `draw(generator)` gives one sigma from the recipe's
    schedule and the expert that inference runs at that sigma trains (so each is trained about as
    often as the schedule visits its side); the generator depends on (seed, step) only."""
    if len(trainees) == 1:
        return trainees[0]
    sigma = float(draw(torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777_777_777)))
    name = variant.expert_for(sigma, boundary)
    return next(t for t in trainees if t.name == name)


def make_trainee(variant: Variant, name: str, boundary: float | None, model, optimizer, scheduler) -> Trainee:
    return Trainee(name=name, label=expert_label(variant, name), model=model, optimizer=optimizer, scheduler=scheduler,
                   sigma_range=variant.sigma_range(name, boundary))


def batch_shift(recipe, variant: Variant, tokens: int | None = None) -> float:
    """The flow shift a batch of `tokens` tokens per clip is drawn at: timesteps.shift, the
    variant's flow shift when empty, or (auto) scaled by the batch's tokens against the native size's."""
    shift = recipe.timesteps.shift
    if shift is None or (shift == "auto" and tokens is None):
        return variant.flow_shift
    if shift == "auto":
        return fm.auto_shift(variant.flow_shift, variant.tokens(variant.frames, *variant.resolution), tokens)
    return float(shift)


def sigma_sampler(recipe, variant: Variant):
    """`draw(n, generator, lo, hi, tokens)` for the recipe's timestep settings (`tokens`: of one
    clip of the batch, for timesteps.shift=auto; None: the variant's own shift)."""
    t = recipe.timesteps

    def draw(n: int, generator: torch.Generator, lo: float, hi: float, tokens: int | None = None) -> torch.Tensor:
        return fm.sample_sigmas(n, t.sampling, generator, shift=batch_shift(recipe, variant, tokens),
                                logit_mean=t.logit_mean, logit_std=t.logit_std, sigmoid_scale=t.sigmoid_scale,
                                sigma_min=lo, sigma_max=hi)

    return draw
