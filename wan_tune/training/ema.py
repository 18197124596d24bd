"""`train.ema_decay`: an exponential moving average of the trainable weights (diffusers' EMAModel),
kept in each checkpoint beside the raw weights (`ema.safetensors`, the same names as
`trainable.safetensors`), scored on the held-out clips beside them, and what export writes by
default (`export.weights`).

diffusers' EMAModel does the averaging, with its decay warmup: 0 at the first update (the average
starts as the weights), then min(train.ema_decay, k / (9 + k)) at the k-th.
The average is swapped into the live parameters (their storage exchanged, nothing copied) for
held-out scoring and validation renders, and swapped back before the next step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def exports_ema(recipe) -> bool:
    """Whether export writes (and best.json follows) the average: EMA on and export.weights not `raw`."""
    return bool(recipe.train.ema_decay) and recipe.export.weights != "raw"


class Ema:
    """The average of one trainee's trainable parameters, by parameter name."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.names = list(named)
        self.average = EMAModel(list(named.values()), decay=decay, foreach=True)

    @property
    def updates(self) -> int:
        return self.average.optimization_step

    @property
    def current_decay(self) -> float:
        return float(self.average.cur_decay_value or 0.0)

    def step(self, params: list[torch.nn.Parameter]) -> None:
        self.average.step(params)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average, by parameter name, on the CPU (for ema.safetensors)."""
        return {n: t.detach().cpu().contiguous() for n, t in zip(self.names, self.average.shadow_params)}

    def load(self, tensors: dict[str, torch.Tensor], updates: int, where: str) -> None:
        """The average a checkpoint saved (`where` names its file in errors) and its update count;
        the decay stays the recipe's (a resume that changes train.ema_decay applies it from there on)."""
        missing = [n for n in self.names if n not in tensors]
        if missing or len(tensors) != len(self.names):
            raise ValueError(f"{where} does not hold this run's trainable weights (e.g. {(missing or sorted(tensors))[0]})")
        with torch.no_grad():
            for shadow, name in zip(self.average.shadow_params, self.names):
                shadow.copy_(tensors[name])
        self.average.optimization_step = int(updates)

    def restart(self, params: list[torch.nn.Parameter]) -> None:
        """Start the average again from the current weights (a run that turns EMA on at a resume)."""
        with torch.no_grad():
            for shadow, p in zip(self.average.shadow_params, params):
                shadow.copy_(p)
        self.average.optimization_step = 0


@contextmanager
def averaged(trainees: list, on: bool = True):
    """The trainees' parameters hold their EMA inside the block (when `on` and a trainee keeps one).
    Storage is exchanged both ways, so the raw weights come back bit for bit."""
    averages = {id(tr.ema): tr for tr in trainees if on and getattr(tr, "ema", None) is not None}  # shared experts: one
    swapped = [(p, s) for tr in averages.values() for p, s in zip(tr.params, tr.ema.average.shadow_params)]
    _exchange(swapped)
    try:
        yield bool(swapped)
    finally:
        _exchange(swapped)


def _exchange(pairs) -> None:
    for p, shadow in pairs:
        p.data, shadow.data = shadow.data, p.data
