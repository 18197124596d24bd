"""How a run is launched: the Accelerator for this machine and launch, what the ranks agree on,
the signals that stop a run cleanly, and the settings a launch cannot take.

Launch-agnostic: plain `python`, `accelerate launch` (DDP, DeepSpeed ZeRO, FSDP) or SLURM all
arrive here; accelerate decides what `prepare` wraps.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch

from ..config import Recipe
from ..models.precision import emulate_if_asked
from ..parallel.process_group import use_cpu
from ..parallel.sharding import fsdp2_precision, fsdp_on_cpu
from .errors import TrainingError
from .tracking import tracking_problem


def make_accelerator(recipe: Recipe, run_dir):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = use_cpu()
    if cpu:
        emulate_if_asked()  # a test mode: CPU autocast runs CUDA's fp32 ops in fp32 (models/precision.py)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    handlers = [process_group_kwargs(cpu)] if multi else []
    tracker = None if recipe.tracking.backend == "none" else recipe.tracking.backend
    if not multi:  # one process may train several recipes (tests, a notebook): each with its own precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=cpu and not deepspeed,  # cpu=True would drop DeepSpeed; DeepSpeed finds the CPU by itself
        mixed_precision=recipe.train.mixed_precision,  # a CPU too: torch's CPU autocast
        gradient_accumulation_steps=recipe.train.grad_accum,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )
    if cpu and multi:
        fsdp_on_cpu(accelerator)
    fsdp2_precision(accelerator, recipe.train.mixed_precision)
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = recipe.train.batch_size  # we feed batches ourselves
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = recipe.train.max_grad_norm or 0.0
        if cpu:  # torch AdamW instead of DeepSpeed's CPU Adam: no ~50 s JIT build per op
            ds["zero_force_ds_cpu_optimizer"] = False
    return accelerator


# How long a rank waits in a collective before the process group gives up. Ranks that do not render
# (DDP: rank 0 renders validation alone) wait in their next collective through the whole render: the
# base renders and every round, several prompts of 30-50 steps with guidance, minutes each on a 14B
# with block offload. torch's default for NCCL (10 minutes) would have the watchdog kill the job.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def process_group_kwargs(cpu: bool):
    """The process group's settings: gloo on CPUs (multi-process tests), NCCL on GPUs; both with
    `COLLECTIVE_TIMEOUT`."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=COLLECTIVE_TIMEOUT)


def agree(accelerator, flag: bool) -> bool:
    """True on every rank if it is true on any (a stop signal, a refusal: all ranks act together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def check_launch(recipe: Recipe, accelerator, experts: list[str]) -> None:
    """Refuse, on every rank and before anything loads, what this launch cannot run: a tracker
    that cannot start here, two A14B experts, block offload or EMA under DeepSpeed / FSDP, another
    optimizer than AdamW under DeepSpeed."""
    problem = tracking_problem(recipe.tracking) if accelerator.is_main_process else None
    if agree(accelerator, problem is not None):
        raise TrainingError(problem or "tracking is not set up on rank 0")
    partitioned = accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
    if len(experts) > 1 and partitioned:
        raise TrainingError(
            "training both Wan2.2 A14B experts in one run works with one process or DDP; under DeepSpeed / FSDP "
            "train one expert per run (model.experts=[high_noise], then [low_noise])"
        )
    if recipe.train.optimizer != "adamw" and accelerator.distributed_type.name == "DEEPSPEED":
        raise TrainingError(
            f"train.optimizer={recipe.train.optimizer} under DeepSpeed: DeepSpeed runs its own AdamW over the partitioned "
            "state and refuses other optimizers: set train.optimizer=adamw, or launch with FSDP2 or DDP"
        )
    if recipe.train.optimizer == "schedulefree_adamw" and accelerator.distributed_type.name == "FSDP":
        raise TrainingError(
            "train.optimizer=schedulefree_adamw under FSDP2: torch's distributed loader cannot resume its state (it "
            "makes the state with a step the optimizer refuses outside train mode, then finds no tensors to fill; tested): "
            "use it on one GPU or with DDP, or pick another optimizer"
        )
    if recipe.model.expert_mode == "shared" and accelerator.num_processes > 1:
        raise TrainingError(
            "model.expert_mode=shared works on one process for now (DDP would wrap the shared adapter twice): launch one "
            "process, or set model.expert_mode=separate"
        )
    if recipe.train.ema_decay and partitioned:
        raise TrainingError(
            f"train.ema_decay={recipe.train.ema_decay:g} works with one process or DDP; under DeepSpeed / FSDP each rank "
            "holds a shard (and DeepSpeed 16-bit copies) of the weights, which the average does not follow yet: set "
            "train.ema_decay=0, or launch with DDP"
        )
    if recipe.train.offload != "none" and partitioned:
        raise TrainingError(
            f"train.offload={recipe.train.offload} works with one process or DDP; under DeepSpeed / FSDP the weights "
            "are already sharded over the GPUs: set train.offload=none (or launch without DeepSpeed / FSDP)"
        )


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) and Ctrl-C (SIGINT) ask for a clean stop after the
    current step, with a checkpoint. A second Ctrl-C stops at once (KeyboardInterrupt): the
    checkpoints already written are whole. `restore` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    LAUNCHER_GONE = "the launcher's death"

    def __init__(self, say=print):
        self._received: str | None = None
        self.say = say
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        # A process `accelerate launch` / torchrun started: its launcher killed (SIGKILL, a lost
        # session) leaves it orphaned, training on with nobody to stop it. Its parent changes then.
        launched = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"))
        self.launcher = os.getppid() if launched else None

    @property
    def received(self) -> str | None:
        """The signal asking for a stop, or LAUNCHER_GONE once this process's launcher is gone."""
        if self._received is None and self.launcher is not None and os.getppid() != self.launcher:
            self._received = self.LAUNCHER_GONE
            self.say(f"the launcher (process {self.launcher}) is gone: stopping after this step with a checkpoint")
        return self._received

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self._received == "SIGINT":
            raise KeyboardInterrupt
        self._received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.say("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers share the terminal's Ctrl-C; the main process decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
