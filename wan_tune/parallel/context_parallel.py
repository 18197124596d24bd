"""`train.context_parallel`: one clip's tokens across a group of processes (diffusers' context
parallelism, Ulysses or ring attention: `train.context_parallel_kind`).

The world is `data-parallel x context-parallel`: ranks `g*cp ... g*cp+cp-1` form group g and train
one batch together.
- Data and seeds follow the data-parallel position (`Layout.data_rank` / `data_world`): every rank
  of a group reads the same batch and draws the same noise, sigmas and caption dropout.
- The model: diffusers' context-parallel plan for Wan (the transformer's `_cp_plan`) splits the
  tokens at the first block, runs each attention with an all-to-all (Ulysses: token shards <->
  head shards) or by passing keys and values round the group (ring: partial attentions merged by
  their log-sum-exp, on the kernel `parallel/cp_attention.py` sets) and gathers after `proj_out`. Every rank of a group computes the same whole output and loss; its
  parameter gradients are those of its own tokens (their sum over the group is one process's
  gradient: tested).
- Gradients: DDP, FSDP2 and DeepSpeed ZeRO (2 and 3) all average over all `dp x cp` ranks, so the
  loss is scaled by `cp` before the backward (`Layout.loss_scale`): their mean times cp is the mean
  over groups of the group sums. Sharded weights are sharded over the whole world, context ranks
  included: FSDP2 / ZeRO-3 gather each block's weights before diffusers' hooks split its tokens.

Why not `enable_parallelism` alone: it places the model on `rank % torch.accelerator.device_count()`
(a division by zero on a CPU, where the tests run with gloo) and builds a mesh of the whole world.
Here the mesh has a data-parallel axis too (`dp x ring x ulysses`) and the device is accelerate's;
the config is resolved as diffusers' `_resolve_parallel_config` does, then diffusers applies its
own hooks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..training.errors import TrainingError


@dataclass(frozen=True)
class Layout:
    cp: int
    rank: int
    world: int
    kind: str = "ulysses"
    """train.context_parallel_kind: ulysses | ring."""

    @property
    def data_rank(self) -> int:
        return self.rank // self.cp

    @property
    def data_world(self) -> int:
        return self.world // self.cp

    @property
    def loss_scale(self) -> float:
        return float(self.cp)

    def describe(self) -> str:
        """How the processes divide the work, for the start line; nothing without context parallelism."""
        return f" ({self.data_world} data-parallel x {self.cp} context-parallel, {self.kind})" if self.cp > 1 else ""


ONE_PROCESS_PER_CLIP = Layout(1, 0, 1)
"""No context parallelism (what a run that is not told otherwise has)."""


def layout(recipe, accelerator) -> Layout:
    cp, world = recipe.train.context_parallel, accelerator.num_processes
    if world % cp:
        raise TrainingError(
            f"train.context_parallel={cp} splits each clip over {cp} processes, but this launch has {world}: launch a "
            f"multiple of {cp} processes (--num_processes), or set train.context_parallel to a divisor of {world}"
        )
    kind = recipe.train.context_parallel_kind
    if cp > 1 and kind == "ring" and accelerator.device.type == "cuda" and recipe.train.mixed_precision == "no":
        raise TrainingError("train.context_parallel_kind=ring runs attention on torch's flash kernel, which takes "
                            "bf16/fp16 on a GPU: set train.mixed_precision=bf16 (or use ulysses)")
    return Layout(cp, accelerator.process_index, world, kind)


def token_problem(variant, buckets, cp: int) -> str | None:
    """A message naming the buckets (frames, height, width) whose token count the degree does not
    divide, or None. A bucket key may carry more after the three (VACE's reference count)."""
    buckets = {tuple(b[:3]) for b in buckets}
    bad = sorted({b for b in buckets if variant.tokens(*b) % cp})
    if cp == 1 or not bad:
        return None
    shown = ", ".join(f"{f}x{h}x{w} ({variant.tokens(f, h, w)} tokens)" for f, h, w in bad[:3])
    heads = variant.transformer["num_attention_heads"]
    fits = [d for d in range(2, heads + 1) if heads % d == 0 and all(variant.tokens(*b) % d == 0 for b in buckets)]
    return (f"train.context_parallel={cp} must divide every clip's token count, and the bucket(s) {shown} "
            f"do not: change data.resolutions or data.frames, or use a degree that fits these clips "
            f"({', '.join(map(str, fits)) or 'none above 1'})")


def enable(model: torch.nn.Module, lay: Layout, device: torch.device) -> None:
    """Split `model`'s tokens over the group (Ulysses or ring), diffusers' hooks on diffusers' plan."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    # diffusers' gather after proj_out calls a torch collective torch has deprecated: once a step
    # per rank otherwise, in every run's log.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)

    from .cp_attention import register_cp_kernels, use_ring_kernel

    register_cp_kernels()  # q, k, v in one dtype before the all-to-alls / the ring
    ring = lay.cp if lay.kind == "ring" else 1
    mesh = init_device_mesh(device.type, (lay.data_world, ring, lay.cp // ring), mesh_dim_names=("dp", "ring", "ulysses"))
    if ring > 1:
        use_ring_kernel(model)
        cp_config = ContextParallelConfig(ring_degree=ring, mesh=mesh)
    else:
        cp_config = ContextParallelConfig(ulysses_degree=lay.cp, mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(lay.rank, lay.world, device, mesh=mesh)

    def resolved(_config):
        model._parallel_config = config
        return config

    model._resolve_parallel_config = resolved  # for this call only: see the module docstring
    try:
        model.enable_parallelism(config=cp_config)
    finally:
        del model._resolve_parallel_config
