"""Memory of a LoRA training step against the floor it cannot go below, and what gradient
checkpointing and fp8 base weights save, as numbers.

    python bench/memory.py                                 # real 1.3B architecture, latent 1x32x32
    python bench/memory.py --variant tiny --latent 3x8x12  # quick

Each configuration runs in its own process (peak RSS cannot be reset inside one). The child
loads the model with wan-tune's `load_for_training`, runs two steps of the trainer's own step
code (`predict`, flow-matching loss, backward, AdamW), samples its RSS every 2 ms, and counts the
bytes autograd saves for backward (unique storages, through saved_tensors_hooks). The floor is
weights + trainable state (param, grad, 2 AdamW moments, fp32) + those saved activations; the
ratio is (peak RSS of the steps - RSS before the model) / floor. `load` is the peak RSS while the
model loads (fp8: streamed straight into fp8), minus the same base. fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "baseline": ["train.gradient_checkpointing=false"],
    "gradient checkpointing": ["train.gradient_checkpointing=true"],
    "checkpointing + fp8 base": ["train.gradient_checkpointing=true", "train.fp8_base=true"],
}


def child(args) -> None:
    import torch
    from common import PeakRss, model_folder, rss_bytes, synthetic_shards, workdir
    from trainer_overhead import recipe_for

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.models.spec import trainable_parameters
    from wan_tune.models.variants import get_variant
    from wan_tune.training import flow_matching as fm
    from wan_tune.training.model_setup import load_for_training

    variant = get_variant(args.variant)
    root = workdir()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    folder = model_folder(args.variant, root)
    shards_dir = synthetic_shards(args.variant, root, 8, fhw)
    recipe = recipe_for(argparse.Namespace(variant=args.variant, steps=2, batch=1, rank=args.rank), folder, shards_dir,
                        root / "runs-mem", tuple(CONFIGS[args.child]))
    import diffusers.models.transformers.transformer_wan  # noqa: F401  libraries loaded before the baseline
    import peft  # noqa: F401

    before = rss_bytes()
    peak = PeakRss()
    model = load_for_training(recipe)
    params = list(trainable_parameters(model).values())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in params) * 4 * 4
    opt = torch.optim.AdamW(params, lr=1e-4)
    ds = ShardDataset(shards_dir)
    batch = to_device(collate([ds[0]]), "cpu", torch.float32, 512)

    load_peak = peak.reset()  # from here on: the steps' peak
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        return t

    g = torch.Generator().manual_seed(0)
    for step in range(2):
        sigmas, noise = torch.rand(1, generator=g), torch.randn(batch["latents"].shape, generator=g)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pred, target = fm.predict(model, variant, batch, sigmas, noise, model.dtype)
            loss = fm.flow_matching_loss(pred, target, torch.ones(1))
        if step == 0:
            param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
            activations = sum(n for ptr, n in saved.items() if ptr not in param_ptrs)  # weights are not activations
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"before": before, "load_peak": load_peak, "peak": peak.stop(), "weights": weights, "trainable": trainable, "activations": activations}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="wan2.1-t2v-1.3b")
    ap.add_argument("--latent", default="1x32x32")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    gib = 2**30
    rows = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--variant", args.variant, "--latent", args.latent, "--rank", str(args.rank), "--child", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nmemory of a LoRA r{args.rank} step: {args.variant}, latent {args.latent}, fp32 CPU (GiB)")
    print(f"  {'':<28}{'load':>7}{'peak-base':>10}{'weights':>9}{'train st':>9}{'activ.':>8}{'floor':>8}{'ratio':>7}")
    for name, r in rows.items():
        used = (r["peak"] - r["before"]) / gib
        floor = (r["weights"] + r["trainable"] + r["activations"]) / gib
        print(f"  {name:<28}{(r['load_peak'] - r['before']) / gib:>7.2f}{used:>10.2f}{r['weights'] / gib:>9.2f}"
              f"{r['trainable'] / gib:>9.2f}{r['activations'] / gib:>8.2f}{floor:>8.2f}{used / floor:>7.2f}")
    base = rows["baseline"]["peak"] - rows["baseline"]["before"]
    for name in list(CONFIGS)[1:]:
        r = rows[name]
        print(f"  {name}: peak {(r['peak'] - r['before']) / base:.2f}x of baseline, "
              f"activations {r['activations'] / max(rows['baseline']['activations'], 1):.2f}x")


if __name__ == "__main__":
    main()
