"""A Wan2.1 14B LoRA training step on a small host: fp8 weights streamed from disk.

    python bench/big_model.py                          # wan2.1-t2v-14b, latent 1x8x8, LoRA r32
    python bench/big_model.py --variant wan2.1-t2v-1.3b

Writes random bf16 weights of the real architecture once (sharded safetensors, as the hub
publishes the 14B; one tensor in memory at a time), then, in a child process, loads them with
`train.fp8_base=true` through wan-tune's `load_for_training` and runs optimizer steps of the
trainer's step code (gradient checkpointing on, fp32 compute on a CPU). It prints the peak RSS
of loading and of the steps against the size of the fp8 weights: loading never holds the model
in full precision (bf16: 2x the fp8 size, fp32: 4x), so a 14B trains on a 24 GiB host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_random_folder(variant_name: str, root: Path, shard_bytes: int = 2 * 2**30) -> Path:
    """<root>/<variant>-streamed/transformer/: config + sharded bf16 safetensors of random weights."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from wan_tune.models.variants import get_variant

    folder = root / f"{variant_name}-streamed"
    out = folder / "transformer"
    index = out / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return folder
    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = WanTransformer3DModel(**get_variant(variant_name).transformer)
    model.save_config(out)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    total = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    print(f"writing random bf16 weights of {variant_name} ({total / 2**30:.1f} GiB) to {out} (once) ...", flush=True)
    g = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"diffusion_pytorch_model-{len(files) + 1:05d}.safetensors"
        save_file(shard, out / name)
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes:
        if "norm" in name and name.endswith("weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:  # small weights keep a random deep model's activations finite
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def child(args) -> None:
    import torch
    from common import PeakRss, rss_bytes, run_steps, synthetic_shards, workdir
    from trainer_overhead import recipe_for

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.models.spec import trainable_parameters
    from wan_tune.models.variants import get_variant
    from wan_tune.training.model_setup import load_for_training

    variant = get_variant(args.variant)
    root = workdir()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    shards_dir = synthetic_shards(args.variant, root, 2, fhw)
    recipe = recipe_for(argparse.Namespace(variant=args.variant, steps=args.steps, batch=1, rank=args.rank),
                        root / f"{args.variant}-streamed", shards_dir, root / "runs-big",
                        ("train.fp8_base=true", "train.gradient_checkpointing=true"))
    import diffusers.models.transformers.transformer_wan  # noqa: F401  libraries loaded before the baseline
    import peft  # noqa: F401

    before = rss_bytes()
    peak = PeakRss()
    t0 = time.perf_counter()
    model = load_for_training(recipe)
    load_s = time.perf_counter() - t0
    fp8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    other = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != torch.float8_e4m3fn and not p.requires_grad)
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    batch = to_device(collate([ShardDataset(shards_dir)[0]]), "cpu", torch.float32, 512)
    load_peak = peak.reset()
    losses, step_s = run_steps(model, variant, batch, args.steps, torch.float32)
    print(json.dumps({"before": before, "load_peak": load_peak, "step_peak": peak.stop(), "fp8": fp8, "other": other,
                      "trainable": trainable, "load_s": load_s, "step_s": step_s, "losses": losses,
                      "total_params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="wan2.1-t2v-14b")
    ap.add_argument("--latent", default="1x8x8")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from common import workdir

    write_random_folder(args.variant, workdir())
    cmd = [sys.executable, __file__, "--variant", args.variant, "--latent", args.latent, "--rank", str(args.rank),
           "--steps", str(args.steps), "--child"]
    # Every allocation above 128 KiB mapped on its own: on a CPU, diffusers' layerwise casting
    # reallocates each fp8 weight after every use, and glibc's heap keeps the holes that leaves
    # (measured on the 1.3B: step peak 3.31 GiB with glibc's defaults, 2.41 GiB with this). On a
    # GPU those casts happen in GPU memory; the host holds still weights.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"the training child failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    frozen = r["fp8"] + r["other"]
    print(f"\n{args.variant} LoRA r{args.rank}, fp8 base streamed from bf16 safetensors, latent {args.latent}, "
          f"gradient checkpointing, fp32 compute, CPU")
    print(f"  parameters {r['total_params'] / 1e9:.2f} B; fp8 weights {r['fp8'] / gib:.2f} GiB, other frozen "
          f"{r['other'] / gib:.2f} GiB, LoRA {r['trainable'] / 1e6:.1f} M params")
    print(f"  the same weights in bf16: {r['total_params'] * 2 / gib:.1f} GiB, in fp32: {r['total_params'] * 4 / gib:.1f} GiB")
    print(f"  {'':<10}{'peak RSS - base':>16}{'x frozen weights':>18}{'seconds':>9}")
    print(f"  {'load':<10}{(r['load_peak'] - r['before']) / gib:>13.2f} GiB{(r['load_peak'] - r['before']) / frozen:>18.2f}"
          f"{r['load_s']:>9.1f}")
    print(f"  {'step':<10}{(r['step_peak'] - r['before']) / gib:>13.2f} GiB{(r['step_peak'] - r['before']) / frozen:>18.2f}"
          f"{sum(r['step_s']) / len(r['step_s']):>9.1f}")
    print(f"  losses {', '.join(f'{x:.4f}' for x in r['losses'])}")


if __name__ == "__main__":
    main()
