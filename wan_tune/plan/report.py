"""What `wan-tune plan` prints: the run's shape, a memory table across settings, the step's FLOPs,
and the verdict for a budget."""

from __future__ import annotations

from ..config.sources import data_sources
from .advice import cheapest, floor, ladder, most_kept
from .memory import GIB, MemoryPlan, Setup

MIB = 2**20

FITS, NOTHING_FITS = 0, 1
# What a GPU holds beyond the step's tensors, kept out of --gpu-memory before anything "fits": the
# CUDA context (~0.5 GiB), cuBLAS / cuDNN / NCCL workspaces, and the caching allocator's
# fragmentation, which grows with the card's use (its reserved bytes run a few percent above the
# allocated peak). `--headroom` says otherwise.
HEADROOM_GIB, HEADROOM_SHARE = 1.0, 0.05


def default_headroom(budget_gib: float, device: str) -> float:
    """GiB kept free of a `budget_gib` card: 1 GiB + 5% on a GPU; none of a CPU's RAM."""
    return HEADROOM_GIB + HEADROOM_SHARE * budget_gib if device == "gpu" else 0.0


def headline(plan: MemoryPlan, zero: int, gpus: int, cp: int = 1) -> str:
    r, s, device = plan.recipe, plan.shape, plan.device
    a = r.adapter
    kind = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}.get(a.method, a.method)
    method = "full fine-tune" if plan.full else f"{kind} r{a.rank} on {', '.join(a.targets)}"
    experts = f", {plan.experts} experts trained" if plan.experts > 1 else ""
    c, f, h, w = s.latent
    autocast = f"{r.train.mixed_precision} autocast" if r.train.mixed_precision != "no" else "no autocast"
    precision = f"{'fp32' if plan.full else r.model.dtype} weights, {autocast}" + (
        " (CUDA's: RMS norms in fp32)" if device == "gpu" and r.train.mixed_precision != "no" else "")
    where = "one CPU process" if device == "cpu" else f"{gpus} GPU{'s' if gpus > 1 else ''}"
    where += f", ZeRO-{zero}" if zero else ""
    kind = "ring" if plan.ring else "Ulysses"
    where += f", context parallel {cp}, {kind} ({gpus // cp} clip{'s' if gpus // cp > 1 else ''} at a time)" if cp > 1 else ""
    face = ""
    if "face" in s.extras:  # Wan2.2-Animate: the reference's latent frame first; the face video's pixels
        _, frames, side, _ = s.extras["face"]
        face = f" (frame 0: the reference image); face video {frames} x {side}x{side} px into the motion encoder"
    return (f"{r.model.variant}, {method}{experts}; per {'process' if device == 'cpu' else 'GPU'}: batch {s.batch} x "
            f"{s.frames} frames at {s.height}x{s.width} -> latent {c}x{f}x{h}x{w}, "
            f"{s.tokens:,} tokens per clip + {s.text_tokens} text{face}\n{precision}; {where}")


def table(plan: MemoryPlan, columns: list[tuple[str, Setup]]) -> str:
    """Memory in GiB (MiB for tiny models): one column per settings, one row per (section, item), then the peak."""
    parts = [plan.breakdown(s) for _, s in columns]
    unit, name = (GIB, "GiB") if max(b.total for b in parts) >= GIB else (MIB, "MiB")  # tiny models: MiB
    keys: list[tuple[str, str]] = []
    for b in parts:
        keys += [(sec, item) for sec, item, _ in b.rows if (sec, item) not in keys]
    sections = list(dict.fromkeys(sec for sec, _ in keys))
    keys.sort(key=lambda k: sections.index(k[0]))  # stable: items keep their order within a section
    width = max(10, *(len(label) + 2 for label, _ in columns))
    lines = [f"{name:<44}" + "".join(f"{label:>{width}}" for label, _ in columns)]
    last = None
    for sec, item in keys:
        cells = [next((n for s2, i2, n in b.rows if (s2, i2) == (sec, item)), 0.0) for b in parts]
        if not any(cells):
            continue
        lines.append(f"  {sec if sec != last else '':<14}{item:<28}" + "".join(_cell(n, width, unit) for n in cells))
        last = sec
    lines.append(f"  {'peak':<42}" + "".join(f"{b.total / unit:>{width}.2f}" for b in parts))
    if any(b.host for b in parts):
        lines.append(f"  {'host RAM (offloaded weights, inputs)':<42}" + "".join(_cell(b.host, width, unit) for b in parts))
    lines.append("  (the peak holds the largest of activations, the AdamW step's temporaries and what a validation "
                 "render adds: never two at once)")
    return "\n".join(lines)


def _cell(n: float, width: int, unit: float) -> str:
    return f"{n / unit:>{width}.2f}" if n else f"{'-':>{width}}"


def flops_line(plan: MemoryPlan, cp: int = 1) -> str:
    step = plan.flops(cp)
    recompute = step / (3 if plan.full else 2)  # checkpointing runs the forward once more
    line = (f"step: {_flop(step)} of matmuls per {'GPU' if plan.device == 'gpu' else 'process'} "
            f"(+{_flop(recompute)} recomputed with gradient checkpointing)")
    routes = plan.routing()
    if routes:
        line += "; token routing: " + ", ".join(f"{ratio:g} of the tokens skip blocks {a}..{b}" for ratio, a, b in routes)
    if any(src.role == "preserve" for src in data_sources(plan.recipe)):
        # the base model's prediction, without the adapter and without a graph: one more forward
        line += f"; +{_flop(recompute)} on steps that draw a role: preserve sample (the base model's prediction)"
    return line


def _flop(n: float) -> str:
    return f"{n / 1e12:,.0f} TFLOP" if n >= 1e13 else f"{n / 1e9:,.1f} GFLOP"


def columns_for(plan: MemoryPlan, zero: int, gpus: int, budget_gib: float | None, cp: int = 1) -> list[tuple[str, Setup]]:
    """The recipe's own settings, then the ladder (offload keeping as many blocks as fit the budget)."""
    cols = [("recipe", Setup.of(plan.recipe, zero, gpus, cp))]
    for label, s in ladder(plan, zero, gpus, cp):
        if s.offload_keep is not None:
            s = most_kept(plan, s, budget_gib * GIB) if budget_gib else s
            label = f"offload {s.offload_keep}"
        cols.append((label, s))
    return cols


def verdict(plan: MemoryPlan, budget_gib: float | None, zero: int, gpus: int, cp: int = 1,
            headroom_gib: float = 0.0) -> tuple[str, int]:
    """Whether the step fits `budget_gib` less `headroom_gib`, and with which settings."""
    if budget_gib is None:
        return "give --gpu-memory GiB for the cheapest settings that fit", FITS
    usable = max(0.0, budget_gib - headroom_gib)
    kept = (f" ({usable:.1f} GiB usable: {headroom_gib:.1f} GiB kept for the CUDA context, kernel workspaces and "
            f"fragmentation; --headroom)") if headroom_gib else ""
    fit = cheapest(plan, usable, zero, gpus, cp)
    if fit is not None:
        run = "wan-tune train" if plan.device == "cpu" else f"{fit.launch()} -m wan_tune.train"
        text = (f"fits in {budget_gib:g} GiB{kept} (peak {_size(plan.breakdown(fit).total)}) with:\n"
                f"  {fit.overrides()}\nrun: {run} RECIPE {fit.overrides()}")
        return text, FITS
    low = floor(plan, zero, gpus, cp)
    more = " or spread the run over more GPUs with --gpus and ZeRO" if plan.device == "gpu" else ""
    text = (f"nothing fits in {budget_gib:g} GiB{kept}: the floor is {_size(plan.breakdown(low).total)}, with "
            f"{low.overrides()}{f' under ZeRO-{low.zero}' if low.zero else ''}.\n"
            f"Lower data.frames or data.resolutions (activations grow with tokens){more}.")
    return text, NOTHING_FITS


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


def cp_problem(plan: MemoryPlan, gpus: int, cp: int) -> str | None:
    """Why `cp` cannot split this recipe's clips over `gpus`, or None."""
    if cp == 1:
        return None
    if plan.device == "cpu":
        return "--cpu plans one process: context parallelism needs several"
    if cp in plan.cp_degrees(gpus):
        return None
    fits = ", ".join(map(str, plan.cp_degrees(gpus))) or "none above 1"
    heads = "" if plan.ring else f"the {plan.variant.transformer['num_attention_heads']} attention heads (Ulysses) and "
    return f"--cp {cp} must divide --gpus ({gpus}), {heads}the clip's {plan.shape.tokens:,} tokens; degrees that do: {fits}"


def run_plan(recipe, budget_gib: float | None = None, gpus: int = 1, zero: int = 0, device: str = "gpu",
             say=print, cp: int | None = None, headroom_gib: float | None = None) -> int:
    """Print the plan of `recipe`; 0 when it fits (or no budget was given), 1 when nothing fits.
    `cp`: the context-parallel degree (default: the recipe's train.context_parallel). `headroom_gib`:
    kept free of the budget (default: `default_headroom`). A degree the run cannot use raises ValueError."""
    plan = MemoryPlan(recipe, device)
    cp = cp or recipe.train.context_parallel
    problem = cp_problem(plan, gpus, cp)
    if problem:
        raise ValueError(problem)
    if budget_gib is not None and headroom_gib is None:
        headroom_gib = default_headroom(budget_gib, device)
    usable = max(0.0, budget_gib - headroom_gib) if budget_gib is not None else None
    say(headline(plan, zero, gpus, cp))
    say("")
    say(table(plan, columns_for(plan, zero, gpus, usable, cp)))
    say("")
    say(flops_line(plan, cp))
    text, status = verdict(plan, budget_gib, zero, gpus, cp, headroom_gib or 0.0)
    say(text)
    if device == "gpu":
        say("(GPU figures are counted, not yet measured on a GPU)")
    return status
