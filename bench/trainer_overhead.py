"""Trainer overhead: wan-tune's full training step against a minimal hand-written diffusers + peft
loop on the same model, LoRA config and batches. Goal: <= 1.05x.

    python bench/trainer_overhead.py                                   # tiny model
    python bench/trainer_overhead.py --variant wan2.1-t2v-1.3b --latent 1x32x32 --rank 32 --steps 4

wan-tune's step is everything `train()` does per step (loader, sigma/noise draws, forward,
backward, clipping, optimizer, scheduler, loss reduction, metrics line); its time comes from
metrics.jsonl. The reference is the bare loop: forward, MSE, backward, clip, AdamW step, on
batches already in memory. Runs alternate wan-tune / reference for `--rounds` rounds in this one
process; the first step of each run is warm-up and not counted. fp32 on CPU (bf16 is slow here).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_folder, synthetic_shards, workdir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe_for(args, folder: Path, shards_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()):
    from wan_tune.config import load_recipe

    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.variant={args.variant}", f"model.path={folder}", "model.dtype=fp32", f"data.shards={shards_dir}",
        "data.num_workers=0", "data.holdout=0", "validation.every=0", f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", "train.caption_dropout=0", f"adapter.rank={args.rank}",
        f"adapter.alpha={args.rank}", "adapter.targets=[attention,ffn]", "checkpoint.every=1000000",
        "tracking.backend=none", "timesteps.sampling=uniform", f"run.output_dir={run_dir}", "run.name=bench", *extra,
    ])


def wan_tune_steps(recipe) -> list[float]:
    from wan_tune.training.loop import train

    summary = train(recipe, resume="never", progress=False, say=lambda *_: None)
    del summary
    lines = (Path(recipe.run.output_dir) / "bench" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step_time"] for line in lines][-recipe.train.steps:][1:]


def reference_steps(recipe, folder: Path) -> list[float]:
    from diffusers import WanTransformer3DModel

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.data.sampler import BucketBatchSampler
    from wan_tune.models.spec import lora_config
    from wan_tune.models.variants import get_variant

    variant = get_variant(recipe.model.variant)
    dataset = ShardDataset(recipe.data.shards)
    order = iter(BucketBatchSampler(dataset.buckets, recipe.train.batch_size, recipe.run.seed))
    batches = [to_device(collate([dataset[i] for i in next(order)]), "cpu", torch.float32, 512) for _ in range(recipe.train.steps)]
    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
    model.requires_grad_(False)
    model.add_adapter(lora_config(recipe, variant))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.train.lr, betas=tuple(recipe.train.betas), weight_decay=recipe.train.weight_decay)
    model.train()
    g = torch.Generator().manual_seed(0)
    times = []
    for batch in batches:
        t = time.perf_counter()
        x0 = batch["latents"]
        sigma = torch.rand(x0.shape[0], generator=g)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                     encoder_hidden_states=batch["text"], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    del model, opt
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--latent", default="3x8x12", help="latent F'xH'xW' per sample")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    root = workdir()
    folder = model_folder(args.variant, root)
    shards_dir = synthetic_shards(args.variant, root, args.steps * args.batch * 2, fhw)
    recipe = recipe_for(args, folder, shards_dir, root / "runs")

    ours, ref = [], []
    for r in range(args.rounds):
        ours += wan_tune_steps(recipe)
        gc.collect()
        ref += reference_steps(recipe, folder)
        gc.collect()
        print(f"round {r + 1}/{args.rounds}: wan-tune {statistics.median(ours):.4f} s/step, "
              f"reference {statistics.median(ref):.4f} s/step", flush=True)
    m_ours, m_ref = statistics.median(ours), statistics.median(ref)
    print(f"\ntrainer overhead: {args.variant}, latent {args.latent}, batch {args.batch}, LoRA r{args.rank} attention+ffn, "
          f"fp32 CPU, {torch.get_num_threads()} threads, {len(ours)} + {len(ref)} timed steps")
    print(f"  {'':<34}{'s/step (median)':>16}{'ratio':>8}")
    print(f"  {'minimal diffusers + peft loop':<34}{m_ref:>16.4f}{1.0:>8.3f}")
    print(f"  {'wan-tune train() step':<34}{m_ours:>16.4f}{m_ours / m_ref:>8.3f}")
    print(f"  goal <= 1.05x: {'met' if m_ours / m_ref <= 1.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
