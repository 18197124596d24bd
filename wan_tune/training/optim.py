"""Optimizer and learning-rate schedule from a recipe (torch / bitsandbytes / diffusers)."""

from __future__ import annotations

import torch

from ..config.schema import TrainConfig

# Recipe names -> diffusers.optimization schedule names (all with linear warmup).
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_optimizer(params, cfg: TrainConfig, say=print):
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            say("train.optimizer=adamw8bit but bitsandbytes is not installed (pip install bitsandbytes): using torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer, cfg: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


# Keys the optimizer and lr schedule are built from. On a resume the schedule's shape (schedule,
# warmup, steps) comes from the recipe anyway (its lambda is rebuilt, not saved); lr, betas and
# weight decay live in the saved optimizer state and would silently win: they are set again here.
OPTIMIZER_KEYS = ("optimizer", "lr", "betas", "weight_decay", "lr_schedule", "warmup_steps", "steps")


def apply_changed_settings(cfg: TrainConfig, saved: dict, trainees: list, where: str, say=print) -> None:
    """After a resume, make the optimizers and schedules run as `cfg` says where it differs from
    the checkpoint's recipe (`saved`: its train section). A changed train.optimizer is refused:
    AdamW's state does not carry over to 8-bit AdamW or back."""
    changed = {k: (saved.get(k), getattr(cfg, k)) for k in OPTIMIZER_KEYS
               if k in saved and _differs(saved[k], getattr(cfg, k))}
    if "optimizer" in changed:
        raise ValueError(f"train.optimizer was {changed['optimizer'][0]} in {where}; its state cannot continue as "
                         f"{changed['optimizer'][1]}: set train.optimizer={changed['optimizer'][0]}, or start a new run "
                         "(--resume never, or another run.name)")
    if not changed:
        return
    for tr in trainees:
        groups, scheduler = tr.optimizer.param_groups, tr.scheduler
        scheduler.base_lrs = [cfg.lr] * len(groups)
        for group, factor in zip(groups, scheduler.lr_lambdas):
            group.update(initial_lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                         lr=cfg.lr * factor(scheduler.last_epoch))
        scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports until the next step
    say("resuming with changed settings, applied from here on: "
        + "; ".join(f"train.{k} {old} -> {new}" for k, (old, new) in changed.items()))


def _differs(old, new) -> bool:
    if isinstance(new, (list, tuple)):
        return [float(x) for x in old] != [float(x) for x in new]
    return old != new if isinstance(new, str) else float(old) != float(new)
