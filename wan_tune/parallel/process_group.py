"""The process group for whichever way wan-tune was started (plain python, or accelerate launch)."""

from __future__ import annotations

import os


def use_cpu() -> bool:
    """CPU-only runs: no CUDA here, or ACCELERATE_USE_CPU=1 (multi-process CPU tests use gloo)."""
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def process_state():
    """accelerate's PartialState; without `cpu=True` a CPU-only multi-process launch stays one process."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())
