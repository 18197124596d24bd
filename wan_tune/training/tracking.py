"""Experiment tracking (W&B, TensorBoard or none): checked before any work, started on rank 0.

A run that would only learn at its first log line that W&B has no API key, or that TensorBoard
is not installed, has by then loaded a model for minutes; `tracking_problem` says so at once.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from ..config import Recipe, recipe_container
from ..config.schema import TrackingConfig

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def _wandb_key_stored() -> bool:
    """Whether `wandb login` left a key for the W&B host in the netrc file (where it writes them)."""
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def tracking_problem(cfg: TrackingConfig) -> str | None:
    """Why the recipe's tracker cannot start here (None when it can)."""
    if cfg.backend == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            return ("tracking.backend=tensorboard needs TensorBoard: pip install 'wan-tune[tensorboard]' "
                    "(or set tracking.backend=wandb / none)")
        return None
    if cfg.backend != "wandb":
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode.strip().lower() not in WANDB_MODES:
        return f"WANDB_MODE={mode!r} is not a W&B mode ({', '.join(WANDB_MODES[:3])}): fix or unset it"
    if cfg.offline or (mode or "").strip().lower() in ("offline", "disabled", "dryrun"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _wandb_key_stored():
        return None
    return ("tracking.backend=wandb, but W&B has no API key here (no WANDB_API_KEY, no `wandb login`): run `wandb login`, "
            "or log to disk with WANDB_MODE=offline (or tracking.offline=true), or set tracking.backend=none")


def init_tracking(accelerator, recipe: Recipe, run_dir: Path) -> None:
    """Start the recipe's tracker with the recipe as its config (secrets from `${oc.env:...}` kept out)."""
    flat = {f"{section}.{k}": v for section, values in recipe_container(recipe).items() for k, v in values.items()}
    init = {}
    if recipe.tracking.backend == "wandb":
        init["wandb"] = {"name": recipe.run.name, "dir": str(run_dir), "mode": "offline" if recipe.tracking.offline else None,
                         "entity": recipe.tracking.entity}
    accelerator.init_trackers(recipe.tracking.project, config=flat, init_kwargs=init)
