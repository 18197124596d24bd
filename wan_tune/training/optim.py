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
