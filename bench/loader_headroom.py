"""Loader headroom: samples/s the shard loader delivers against samples/s a training step
consumes, both measured in this command. Goal: >= 50x.

    python bench/loader_headroom.py                                   # tiny step, tiny samples
    python bench/loader_headroom.py --variant wan2.1-t2v-1.3b --latent 1x32x32 --steps 3

The loader is wan-tune's own: ShardDataset (memory-mapped safetensors, bf16 as stored) +
BucketBatchSampler + collate, then `to_device` (cast to fp32, text padded to 512) as the trainer
does it, with 0 and 2 worker processes. The step is
wan-tune's `train()` on the same shards (median step time from metrics.jsonl). The loader is also
timed on samples of the real 480x832x81 size (latents 16x21x60x104, 226 text tokens) to show
what it sustains where a GPU step consumes samples fastest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_folder, synthetic_shards, workdir  # noqa: E402


def loader_rate(shards_dir: Path, workers: int, batches: int, batch_size: int = 1) -> float:
    import torch
    from torch.utils.data import DataLoader

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.data.sampler import BucketBatchSampler

    ds = ShardDataset(shards_dir)
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds.buckets, batch_size, seed=0), num_workers=workers,
                        collate_fn=collate, persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first mmap) is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        to_device(next(it), "cpu", torch.float32, 512)
    return batches * batch_size / (time.perf_counter() - t)


def step_rate(args, folder: Path, shards_dir: Path) -> tuple[float, float]:
    from trainer_overhead import recipe_for

    from wan_tune.training.loop import train

    recipe = recipe_for(args, folder, shards_dir, workdir() / "runs-headroom")
    train(recipe, resume="never", progress=False, say=lambda *_: None)
    lines = (Path(recipe.run.output_dir) / "bench" / "metrics.jsonl").read_text().splitlines()[-args.steps:][1:]
    step = statistics.median(json.loads(line)["step_time"] for line in lines)
    return step, args.batch / step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--latent", default="3x8x12")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batches", type=int, default=200, help="loader batches timed")
    args = ap.parse_args()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    root = workdir()
    folder = model_folder(args.variant, root)
    small = synthetic_shards(args.variant, root, max(64, args.steps * args.batch * 2), fhw)
    real = synthetic_shards("wan2.1-t2v-1.3b", root, 24, (21, 60, 104), text_len=226)

    step_s, consumed = step_rate(args, folder, small)
    rows = []
    for workers in (0, 2):
        rows.append((f"loader, {args.latent} samples, {workers} workers", loader_rate(small, workers, args.batches)))
    for workers in (0, 2):
        rows.append((f"loader, 21x60x104 samples (480x832x81), {workers} workers", loader_rate(real, workers, 40)))
    print(f"\nloader headroom: training step {args.variant} latent {args.latent} batch {args.batch}: "
          f"{step_s:.4f} s/step = {consumed:.2f} samples/s consumed")
    print(f"  {'':<58}{'samples/s':>11}{'x step':>10}")
    for name, rate in rows:
        print(f"  {name:<58}{rate:>11.1f}{rate / consumed:>10.1f}")
    best_small = max(r for n, r in rows[:2])
    print(f"  goal >= 50x at the measured step: {'met' if best_small / consumed >= 50 else 'NOT met'} ({best_small / consumed:.1f}x)")


if __name__ == "__main__":
    main()
