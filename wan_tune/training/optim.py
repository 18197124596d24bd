"""Optimizer and learning-rate schedule from a recipe: torch's AdamW, bitsandbytes' 8-bit AdamW,
transformers' Adafactor, Prodigy (prodigyopt) or any `module:Class`; LoRA+ groups; diffusers' schedules."""

from __future__ import annotations

import torch

from ..config.schema import TrainConfig

# Recipe names -> diffusers.optimization schedule names (all with linear warmup).
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


# Optimizers from packages wan-tune does not install: (module, class, the line that installs it).
PACKAGED = {"adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "pip install bitsandbytes"),
            "paged_adamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit", "pip install bitsandbytes"),
            "prodigy": ("prodigyopt", "Prodigy", "pip install prodigyopt"),
            "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "pip install schedulefree"),
            "came": ("came_pytorch", "CAME", "pip install came-pytorch")}

# Optimizers that do their own warmup and need no schedule: the diffusers schedule stays constant.
OWN_SCHEDULE = ("schedulefree_adamw",)


def param_groups(named: dict[str, torch.nn.Parameter], lr: float, lr_ratio: float | None, scale: float = 1.0) -> list[dict]:
    """One group, or with LoRA+ (`adapter.lr_ratio`) two: the up (`lora_B`) matrices at lr x ratio;
    `scale`: the expert's multiple (train.lr_high_noise). Each group carries its `lr_ratio` (both
    factors), so a resume with another train.lr keeps the proportions."""
    if not lr_ratio or lr_ratio == 1:
        return [{"params": list(named.values()), "lr": lr * scale, "lr_ratio": float(scale)}]
    up = [p for n, p in named.items() if ".lora_B." in n]
    rest = [p for n, p in named.items() if ".lora_B." not in n]
    return [{"params": rest, "lr": lr * scale, "lr_ratio": float(scale)},
            {"params": up, "lr": lr * lr_ratio * scale, "lr_ratio": float(lr_ratio * scale)}]


def make_optimizer(named: dict[str, torch.nn.Parameter], cfg: TrainConfig, lr_ratio: float | None = None,
                   scale: float = 1.0):
    """train.optimizer over the trainable parameters (names: which are LoRA+'s up matrices), at
    `scale` x the lr (an A14B expert's multiple); a missing package is a TrainingError with the
    line that installs it."""
    import importlib
    import inspect

    from .errors import TrainingError

    groups = param_groups(named, cfg.lr, lr_ratio, scale)
    if cfg.optimizer == "adamw":
        cls = torch.optim.AdamW
    elif cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed lr from the schedule (not Adafactor's own relative step), no update clipping
        # beyond its default, factored second moments: ~nothing per parameter besides them.
        return Adafactor(groups, lr=cfg.lr * scale, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay, **cfg.optimizer_args)
    else:
        module, name, install = PACKAGED.get(cfg.optimizer, (*cfg.optimizer.split(":"), None))
        try:
            cls = getattr(importlib.import_module(module.strip()), name.strip())
        except (ImportError, AttributeError) as err:
            how = install or f"install the package that holds {module}"
            raise TrainingError(f"train.optimizer={cfg.optimizer}: {type(err).__name__}: {err} ({how})") from None
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise TrainingError(f"train.optimizer={cfg.optimizer} is not a torch.optim.Optimizer class")
    takes = inspect.signature(cls).parameters
    given = [("betas", tuple(cfg.betas)), ("weight_decay", cfg.weight_decay)]
    if cfg.optimizer == "came":  # three betas of its own (momentum, second moment, confidence)
        given = given[1:]
    if cfg.optimizer in OWN_SCHEDULE:  # it warms its own lr up (and weights its average by it)
        given.append(("warmup_steps", cfg.warmup_steps))
    kwargs = {k: v for k, v in given if k in takes}
    try:
        return cls(groups, lr=cfg.lr * scale, **{**kwargs, **cfg.optimizer_args})
    except TypeError as err:  # an optimizer_args key the class does not take
        raise TrainingError(f"train.optimizer={cfg.optimizer} with train.optimizer_args={cfg.optimizer_args}: {err}") from None


def make_scheduler(optimizer, cfg: TrainConfig):
    from diffusers.optimization import get_scheduler

    if cfg.optimizer in OWN_SCHEDULE:  # a constant multiplier of 1: the optimizer warms up itself
        return get_scheduler("constant", optimizer)
    return get_scheduler(SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


# Keys the optimizer and lr schedule are built from. On a resume the schedule's shape (schedule,
# warmup, steps) comes from the recipe anyway (its lambda is rebuilt, not saved); lr, betas and
# weight decay live in the saved optimizer state and would silently win: they are set again here.
OPTIMIZER_KEYS = ("optimizer", "optimizer_args", "lr", "lr_high_noise", "betas", "weight_decay", "lr_schedule",
                  "warmup_steps", "steps")


def apply_changed_settings(cfg: TrainConfig, saved: dict, trainees: list, where: str, say=print) -> None:
    """After a resume, make the optimizers and schedules run as `cfg` says where it differs from
    the checkpoint's recipe (`saved`: its train section). A changed train.optimizer is refused:
    AdamW's state does not carry over to 8-bit AdamW or back."""
    changed = {k: (saved.get(k), getattr(cfg, k)) for k in OPTIMIZER_KEYS
               if k in saved and _differs(saved[k], getattr(cfg, k))}
    for key in ("optimizer", "optimizer_args"):  # another optimizer's state (or hyperparameters kept in it)
        if key in changed:
            raise ValueError(f"train.{key} was {changed[key][0]} in {where}; its state cannot continue as "
                             f"{changed[key][1]}: set train.{key}={changed[key][0]}, or start a new run "
                             "(--resume never, or another run.name)")
    if not changed:
        return
    for tr in trainees:
        groups, scheduler = tr.optimizer.param_groups, tr.scheduler
        if tr.label == "high_noise" and "lr_high_noise" in changed:  # its groups' multiple, LoRA+'s kept
            old, new = changed["lr_high_noise"]
            for g in groups:
                g["lr_ratio"] = g.get("lr_ratio", 1.0) / float(old) * float(new)
        scheduler.base_lrs = [cfg.lr * g.get("lr_ratio", 1.0) for g in groups]  # LoRA+'s proportion kept
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group.update(initial_lr=base, lr=base * factor(scheduler.last_epoch), weight_decay=cfg.weight_decay)
            if "betas" in group and cfg.optimizer != "came":  # CAME's three betas are its optimizer_args
                group["betas"] = tuple(cfg.betas)
            if "warmup_steps" in group:  # schedule-free's own warmup
                group["warmup_steps"] = cfg.warmup_steps
        scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports until the next step
    say("resuming with changed settings, applied from here on: "
        + "; ".join(f"train.{k} {old} -> {new}" for k, (old, new) in changed.items()))


def _differs(old, new) -> bool:
    if isinstance(new, dict):
        return dict(old or {}) != dict(new)
    if isinstance(new, (list, tuple)):
        return [float(x) for x in old] != [float(x) for x in new]
    return old != new if isinstance(new, str) else float(old) != float(new)
