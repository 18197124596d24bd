"""The cheapest memory settings that fit a budget.

Settings are tried from the one that costs least speed to the one that costs most: none needed <
gradient checkpointing (~30% slower) < fp8 base weights (a cast per layer; LoRA only) < activation
offload (each block's input crosses PCIe twice a step, behind the compute of a whole block) < FFN
chunks (one more feed-forward forward in the backward) < attention checkpoints (the q/k/v/out
projections, norms and rope once more in the backward) < a higher ZeRO stage (more communication;
several GPUs) < context parallelism, degree 2, 4, ... (an all-to-all around every attention, and a
clip per group of GPUs instead of per GPU: what ZeRO cannot divide, one clip's activations) < block
offload with as many blocks kept on the GPU as fit (LoRA only, without DeepSpeed or context
parallelism). Each step keeps the savings of the ones before it.
"""

from __future__ import annotations

from dataclasses import replace

from .memory import GIB, MemoryPlan, Setup

# Feed-forward slices the advice tries: at 32k-75k tokens four make the FFN's hidden layer smaller
# than the attention's working set (the 14B's plan is the same with 8), each slice costing little.
FFN_CHUNKS = 4


def ladder(plan: MemoryPlan, zero: int = 0, gpus: int = 1, cp: int = 1) -> list[tuple[str, Setup]]:
    """(label, settings) from fastest to most frugal; the offload rung keeps no block (its floor).
    A CPU run is one process with nothing to offload to: no ZeRO, no offload, no context parallelism."""
    lora = not plan.full
    rungs = [("none", Setup(False, False, None, zero, gpus, cp=cp)), ("ckpt", Setup(True, False, None, zero, gpus, cp=cp))]
    if lora:
        rungs.append(("+fp8", Setup(True, True, None, zero, gpus, cp=cp)))
    if plan.device == "cpu":
        return rungs
    rungs.append(("+act. offload", Setup(True, lora, None, zero, gpus, True, cp=cp)))
    rungs.append(("+FFN chunks", Setup(True, lora, None, zero, gpus, True, FFN_CHUNKS, cp=cp)))
    rungs.append(("+attn. ckpt", Setup(True, lora, None, zero, gpus, True, FFN_CHUNKS, True, cp=cp)))
    if gpus > 1 and plan.experts == 1:  # the trainer refuses two experts under DeepSpeed
        rungs += [(f"+ZeRO-{z}", Setup(True, lora, None, z, gpus, True, FFN_CHUNKS, True, cp=cp)) for z in (2, 3) if z > zero]
    rungs += [(f"+CP {k}", replace(rungs[-1][1], cp=k)) for k in plan.cp_degrees(gpus) if k > cp]
    if lora:  # offload streams frozen weights: LoRA only, and the trainer refuses it under DeepSpeed
        rungs.append(("+offload", Setup(True, True, 0, 0, gpus, True, FFN_CHUNKS, True)))
    return rungs


def most_kept(plan: MemoryPlan, setup: Setup, budget: float) -> Setup:
    """`setup` with the most blocks kept on the GPU that fit `budget` bytes (0 when none does)."""
    lo, hi = 0, plan.layers - 1  # memory grows with each kept block: bisect for the last that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan.breakdown(replace(setup, offload_keep=mid)).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return replace(setup, offload_keep=lo)


def cheapest(plan: MemoryPlan, budget_gib: float, zero: int = 0, gpus: int = 1, cp: int = 1) -> Setup | None:
    """The first settings of the ladder whose peak fits `budget_gib`, or None."""
    budget = budget_gib * GIB
    for _, setup in ladder(plan, zero, gpus, cp):
        if setup.offload_keep is not None:
            setup = most_kept(plan, setup, budget)
        if plan.breakdown(setup).total <= budget:
            return setup
    return None


def floor(plan: MemoryPlan, zero: int = 0, gpus: int = 1, cp: int = 1) -> Setup:
    """The settings of the ladder with the lowest peak."""
    return min((s for _, s in ladder(plan, zero, gpus, cp)), key=lambda s: plan.breakdown(s).total)
