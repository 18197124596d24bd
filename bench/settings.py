"""Memory settings measured: one short training run per setting, each in a fresh process, with its
step time against the first row's, its measured peak and `wan-tune plan`'s prediction beside it.

    python bench/settings.py                                    # CPU smoke: tiny model, 3x8x12 latent
    python bench/settings.py --variant wan2.1-t2v-1.3b --latent 21x60x104 --docs docs/benchmarks.md
    python bench/settings.py --variant wan2.1-t2v-14b --latent 21x60x104 --rows plan --budget 24

Every row is wan-tune's own `train()` (the recipe of bench/trainer_overhead.py on random weights of
the real architecture and synthetic shards, bench/common.py) with the row's overrides on top of
gradient checkpointing, bf16 weights and autocast on a GPU (fp32 on a CPU), with data.frames and
data.resolutions of the `--latent` trained, so the plan counts the shape measured. Step time: the
median of the steps after the first (metrics.jsonl's step_time). Peak: the largest step's
`torch.cuda.max_memory_allocated` (the trainer's peak_mem_gb, reset each step) on a GPU, with
`max_memory_reserved` beside it; on a CPU the process's peak RSS above what it held before train()
(bench/common.py's PeakRss), which also counts the modules train() imports and its loader (~0.13
GiB): on a CPU only the smoke run's plumbing is checked, not the plan. Host RAM (RSS above the
start) is reported on both, beside the plan's host row. The plan: `MemoryPlan(recipe).breakdown(
Setup.of(recipe))`, the same figure `wan-tune plan` prints for those settings (a CPU plan has no
offload: '-'). Row `plan` takes the planner's advice for `--budget` GiB (its headroom kept free)
and runs capped at that budget on a GPU. Each row's run folder is deleted once measured.

`--docs FILE` puts the table into FILE between `<!-- settings: VARIANT LATENT -->` and
`<!-- /settings -->` (added at the end the first time), so a rerun replaces its own table only.
bench/gpu_suite.sh runs every GPU row of bench/ this way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# name -> overrides on top of checkpointing; the first row of --rows is the reference for the ratios.
ROWS = {
    "ckpt": [],
    "none": ["train.gradient_checkpointing=false"],
    "fp8": ["train.fp8_base=true"],
    "compile": ["train.compile=true"],
    "block offload": ["train.offload=blocks", "train.offload_keep=0"],
    "act. offload": ["train.activation_offload=true"],
    "FFN chunks": ["train.ffn_chunks=4"],
    "attn. ckpt": ["train.attention_checkpointing=true"],
    "all": ["train.fp8_base=true", "train.activation_offload=true", "train.ffn_chunks=4",
            "train.attention_checkpointing=true"],
    "route 0.25": ["train.route_ratio=0.25"],  # token routing (TREAD) over blocks 2..-2
    "route 0.5": ["train.route_ratio=0.5"],
    # a progressive schedule (train.routes): light at the ends of 2..-2, heavier in the middle (30 blocks: 2..7, 8..21, 22..28)
    "routes": ["train.routes=[{ratio: 0.25, start: 2, end: 7}, {ratio: 0.5, start: 8, end: -9}, {ratio: 0.25, start: -8, end: -2}]"],
    "plan": None,  # the planner's advice for --budget
}


def base_overrides(gpu: bool) -> list[str]:
    extra = ["train.gradient_checkpointing=true"]
    return extra + (["model.dtype=bf16", "train.mixed_precision=bf16"] if gpu else [])


def shape_overrides(variant_name: str, latent: str) -> list[str]:
    """data.frames and data.resolutions of the clips whose latent is `latent` (F'xH'xW'): the plan
    counts the recipe's shape, so the recipe must say the shape the shards hold (audit A4)."""
    from wan_tune.models.variants import get_variant

    spatial = get_variant(variant_name).vae_spatial
    f, h, w = (int(x) for x in latent.split("x"))
    return [f"data.frames=[{(f - 1) * 4 + 1}]", f"data.resolutions=[[{h * spatial},{w * spatial}]]"]


def row_recipe(args, overrides: list[str]):
    from common import model_folder, synthetic_shards, workdir
    from trainer_overhead import recipe_for

    from wan_tune.models.variants import get_variant

    root = workdir()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    folder, shards_dir = model_folder(args.variant, root), synthetic_shards(args.variant, root, 2, fhw)
    ns = argparse.Namespace(variant=args.variant, steps=args.steps, batch=1, rank=args.rank)
    if get_variant(args.variant).transformer["num_layers"] < 5:  # the tiny model's two blocks: both routed
        if any(o.startswith("train.route_ratio") for o in overrides):
            overrides = [*overrides, "train.route_start=0", "train.route_end=-1"]
        if any(o.startswith("train.routes") for o in overrides):
            overrides = [o for o in overrides if not o.startswith("train.routes")]
            overrides.append("train.routes=[{ratio: 0.25, start: 0, end: 0}, {ratio: 0.5, start: 1, end: 1}]")
    return recipe_for(ns, folder, shards_dir, root / "runs-settings",
                      (*base_overrides(gpu_here()), *shape_overrides(args.variant, args.latent), *overrides))


def gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()


def advice(args) -> list[str]:
    """The overrides `wan-tune plan --gpu-memory BUDGET` gives for this run (its default headroom
    kept free), or [] if nothing fits."""
    from wan_tune.plan.advice import cheapest
    from wan_tune.plan.memory import MemoryPlan
    from wan_tune.plan.report import default_headroom

    setup = cheapest(MemoryPlan(row_recipe(args, [])), args.budget - default_headroom(args.budget, "gpu"))
    return setup.overrides().split() if setup is not None else []


def predicted(recipe) -> tuple[float | None, float | None]:
    """(device peak, host RAM) of the plan for the recipe's settings."""
    from wan_tune.plan.memory import MemoryPlan, Setup

    try:
        b = MemoryPlan(recipe, "gpu" if gpu_here() else "cpu").breakdown(Setup.of(recipe))
    except ValueError:  # a CPU plan has no offload
        return None, None
    return b.total, b.host


def child(args) -> dict:
    """Train the row's recipe; its step times, peaks and plan as one JSON line. On a GPU a `plan`
    row runs capped at --budget GiB (set_per_process_memory_fraction), so "fits" meets the
    allocator's fragmentation as it would on a card of that size."""
    import shutil

    import torch
    from common import PeakRss, rss_bytes

    from wan_tune.training.loop import train

    overrides = json.loads(args.child)
    recipe = row_recipe(args, overrides)
    if args.cap and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * GIB / torch.cuda.get_device_properties(0).total_memory))
    before, rss = rss_bytes(), PeakRss()
    train(recipe, resume="never", progress=False, say=lambda *_: None)
    host = rss.stop() - before
    run = Path(recipe.run.output_dir) / "bench"
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step_time" in r]
    shutil.rmtree(run)  # each row's run is measured, then gone: the next row starts in an empty folder
    plan, plan_host = predicted(recipe)
    gpu = torch.cuda.is_available()
    return {"seconds": [r["step_time"] for r in steps][1:], "peak": max(r["peak_mem_gb"] for r in steps) * GIB if gpu else host,
            "reserved": max(r["peak_reserved_gb"] for r in steps) * GIB if gpu else None, "host": host,
            "plan": plan, "plan_host": plan_host, "tokens": recipe_tokens(recipe), "flops": plan_flops(recipe)}


def plan_flops(recipe) -> float:
    """`wan-tune plan`'s matmul FLOPs of one step of the recipe (what a row's speed-up is set against)."""
    from wan_tune.plan.memory import MemoryPlan

    return MemoryPlan(recipe).flops()


def recipe_tokens(recipe) -> int:
    from wan_tune.models.variants import get_variant
    from wan_tune.plan.memory import run_shape

    return run_shape(recipe, get_variant(recipe.model.variant)).tokens


def run_row(args, name: str) -> dict:
    overrides = advice(args) if ROWS[name] is None else ROWS[name]
    cmd = [sys.executable, __file__, "--child", json.dumps(overrides), "--variant", args.variant, "--latent", args.latent,
           "--steps", str(args.steps), "--rank", str(args.rank), "--cap", str(args.budget if name == "plan" else 0)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    except subprocess.TimeoutExpired:
        return {"name": name, "overrides": overrides, "error": f"over {args.timeout} s"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": name, "overrides": overrides, "error": last[:120]}
    return {"name": name, "overrides": overrides, **json.loads(out.stdout.strip().splitlines()[-1])}


def table(args, rows: list[dict]) -> str:
    import torch

    where = torch.cuda.get_device_name() if gpu_here() else f"CPU ({os.cpu_count()} cores)"
    tokens = next((r["tokens"] for r in rows if "tokens" in r), "?")
    ref = next((statistics.median(r["seconds"]) for r in rows if r.get("seconds")), None)
    ref_flops = next((r["flops"] for r in rows if r.get("flops")), None)
    lines = [f"{args.variant} LoRA r{args.rank}, latent {args.latent} ({tokens} tokens), {args.steps} steps a row "
             f"(the first not timed), {where}, torch {torch.__version__}. Command: `python bench/settings.py "
             f"--variant {args.variant} --latent {args.latent} --steps {args.steps} --rows '{args.rows}'`", "",
             "Peak: the steps' `max_memory_allocated` on a GPU (what the plan counts), the process's RSS above its "
             "start on a CPU; reserved: `max_memory_reserved` (the allocator's hold, fragmentation included); host: "
             "the process's RSS above its start (pinned buffers, offloaded weights); a `plan` row runs capped at "
             f"--budget {args.budget:g} GiB.", "",
             "| settings | s/step | x first row | plan FLOPs x first row | peak measured | plan | measured / plan | reserved | "
             "host RAM | plan host |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['name']} (`{' '.join(r['overrides'])}`)" if r["name"] == "plan" else r["name"]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | |")
            continue
        s = statistics.median(r["seconds"]) if r["seconds"] else None
        plan = size(r["plan"]) if r["plan"] else "-"
        ratio = f"{r['peak'] / r['plan']:.2f}" if r["plan"] else "-"
        timed = f"{s:.3f} | {s / ref:.2f}" if s else "- | -"
        timed += f" | {r['flops'] / ref_flops:.2f}" if r.get("flops") and ref_flops else " | -"
        more = " | ".join(size(r[k]) if r.get(k) else "-" for k in ("reserved", "host", "plan_host"))
        lines.append(f"| {name} | {timed} | {size(r['peak'])} | {plan} | {ratio} | {more} |")
    return "\n".join(lines) + "\n"


def size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2**20:.1f} MiB"


def put_in_docs(path: Path, key: str, text: str) -> None:
    """Replace (or append) the table of `key` in the docs file, atomically."""
    from wan_tune.data.atomic import write_text

    start, end = f"<!-- settings: {key} -->", "<!-- /settings -->"
    old = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text}{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _m: block, old)
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block + "\n"
    write_text(path, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--latent", default="3x8x12", help="F'xH'xW' of the latent (480x832x81: 21x60x104; 720x1280x81: 21x90x160)")
    ap.add_argument("--rows", default="ckpt,none,fp8,block offload,act. offload,FFN chunks,attn. ckpt,all",
                    help=f"comma-separated, the first is the reference; of: {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=3, help="training steps a row (the first is warm-up)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--budget", type=float, default=24.0, help="GiB for the `plan` row's advice")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a row may take")
    ap.add_argument("--docs", type=Path, help="put the table into this markdown file (see above)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=0.0, help=argparse.SUPPRESS)  # GiB a child may use on a GPU (0: all)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; rows are: {', '.join(ROWS)}")
    rows = []
    for name in names:
        rows.append(run_row(args, name))
        print(f"{name}: {json.dumps(rows[-1])}", flush=True)
    text = table(args, rows)
    print("\n" + text)
    if args.docs:
        put_in_docs(args.docs, f"{args.variant} {args.latent}", text)


if __name__ == "__main__":
    main()
