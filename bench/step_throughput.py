"""A 1.3B LoRA training step: s/step, tokens/s, MFU against the matmul peak measured in this same
command, peak memory, and diffusers' attention backends compared.

    python bench/step_throughput.py                          # CPU: reduced size (1x32x32 latent)
    python bench/step_throughput.py --latent 21x60x104       # GPU: 480x832x81 (32,760 tokens)

On a GPU the model runs in bf16 with fp32 LoRA weights, as `train()` sets it up; on a CPU in
fp32 (no fast bf16 here). FLOPs per step: see `step_flops` (LoRA: 2x the forward). The peak is
a large square matmul in the same dtype, timed here, so MFU is a ratio of two measurements on
this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_folder, synthetic_shards, workdir  # noqa: E402
from trainer_overhead import recipe_for  # noqa: E402

from wan_tune.plan.flops import step_flops  # noqa: E402  (wan-tune plan counts FLOPs with the same function)

BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash", "sage")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, t = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="wan2.1-t2v-1.3b")
    ap.add_argument("--latent", default="1x32x32")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend (after one warm-up)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--fp8", action="store_true", help="fp8 base weights (train.fp8_base=true)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (compile_repeated_blocks)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="attention backends to time, comma-separated")
    ap.add_argument("--docs", type=Path, help="put the table into this markdown file (bench/settings.py: put_in_docs)")
    args = ap.parse_args()

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.models.spec import tokens_per_sample, trainable_parameters
    from wan_tune.models.variants import get_variant
    from wan_tune.training import flow_matching as fm
    from wan_tune.training.model_setup import load_for_training

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    root = workdir()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    folder = model_folder(args.variant, root)
    shards_dir = synthetic_shards(args.variant, root, 4, fhw)
    extra = ("model.dtype=bf16", "train.mixed_precision=bf16") if gpu else ()
    extra += (f"train.gradient_checkpointing={'true' if args.checkpointing else 'false'}",)
    extra += ("train.fp8_base=true",) if args.fp8 else ()
    recipe = recipe_for(argparse.Namespace(variant=args.variant, steps=2, batch=1, rank=args.rank), folder, shards_dir,
                        root / "runs-step", extra)
    model = load_for_training(recipe).to(device)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=False, dynamic=False)
    dtype = model.dtype
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = to_device(collate([ShardDataset(shards_dir)[0]]), device, torch.float32, 512)
    variant = get_variant(args.variant)
    tokens = tokens_per_sample(variant, batch["latents"].shape)
    flops = step_flops(model, tokens, recipe.adapter.method == "full")
    peak = matmul_peak(device, dtype, 8192 if gpu else 2048)

    def one_step(g):
        sigmas = torch.rand(1, generator=g).to(device)
        noise = torch.randn(batch["latents"].shape, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            pred, target = fm.predict(model, variant, batch, sigmas, noise, dtype)
            loss = fm.flow_matching_loss(pred, target, torch.ones(1, device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    for backend in args.backends.split(","):
        try:
            model.set_attention_backend(backend)
            g = torch.Generator().manual_seed(0)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            one_step(g)  # warm-up (and the backend's availability check)
            times = []
            for _ in range(args.steps):
                sync(device)
                t = time.perf_counter()
                one_step(g)
                sync(device)
                times.append(time.perf_counter() - t)
        except Exception as err:  # backend not installed / not supported on this device, or out of memory
            opt.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.empty_cache()
            rows.append((backend, None, f"unavailable ({type(err).__name__})"))
            continue
        s = statistics.median(times)
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else "see bench/memory.py"
        rows.append((backend, s, mem))

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"LoRA r{args.rank} step: {args.variant}, latent {args.latent} = {tokens} tokens, {str(dtype).split('.')[-1]}, "
             f"checkpointing {'on' if args.checkpointing else 'off'}{', fp8 base' if args.fp8 else ''}"
             f"{', compiled blocks' if args.compile else ''}, {where}, torch {torch.__version__}",
             f"matmul peak measured here: {peak / 1e12:.2f} TFLOP/s; step = {flops / 1e12:.2f} TFLOP", "",
             "| attention backend | s/step | tokens/s | MFU | peak memory |", "|---|---|---|---|---|"]
    for backend, s, mem in rows:
        lines.append(f"| {backend} | | | | {mem} |" if s is None else
                     f"| {backend} | {s:.3f} | {tokens / s:.1f} | {flops / s / peak:.1%} | {mem} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.docs:
        from settings import put_in_docs

        put_in_docs(args.docs, f"backends {args.variant} {args.latent}", text)
    if not gpu:
        print("GPU rows (1.3B LoRA at 480x832x81 on a GPU): not measured (no GPU on this machine)")

if __name__ == "__main__":
    main()
