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


def step_flops(model, tokens: int, full: bool, text_tokens: int = 512) -> float:
    """Matmul FLOPs of one step. Linears that read the text (the text embedder, cross-attention
    k/v, and the I2V image k/v, counted at the text length) run on `text_tokens`, the rest on the
    video tokens; attention adds 4*S*S*D (self) and 4*S*T*D (cross) per block. A LoRA step is ~2x
    the forward (backward to activations only; frozen weights get no gradient), full fine-tuning ~3x."""
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    text_side = ("text_embedder", "attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj")
    video = text = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default")):
            if "time_embedder" in name or "time_proj" in name or "image_embedder" in name:
                continue  # once per sample (or per image): negligible
            if any(t in name for t in text_side):
                text += m.in_features * m.out_features
            else:
                video += m.in_features * m.out_features
    forward = 2 * (video * tokens + text * text_tokens) + cfg.num_layers * (4 * tokens**2 * dim + 4 * tokens * text_tokens * dim)
    return (3 if full else 2) * forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="wan2.1-t2v-1.3b")
    ap.add_argument("--latent", default="1x32x32")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend (after one warm-up)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    args = ap.parse_args()

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.models.spec import load_for_training, tokens_per_sample, trainable_parameters
    from wan_tune.models.variants import get_variant
    from wan_tune.training import flow_matching as fm

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    root = workdir()
    fhw = tuple(int(x) for x in args.latent.split("x"))
    folder = model_folder(args.variant, root)
    shards_dir = synthetic_shards(args.variant, root, 4, fhw)
    extra = ("model.dtype=bf16", "train.mixed_precision=bf16") if gpu else ()
    extra += (f"train.gradient_checkpointing={'true' if args.checkpointing else 'false'}",)
    recipe = recipe_for(argparse.Namespace(variant=args.variant, steps=2, batch=1, rank=args.rank), folder, shards_dir,
                        root / "runs-step", extra)
    model = load_for_training(recipe, use_cpu=not gpu).to(device)
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
    for backend in BACKENDS:
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
        except Exception as err:  # backend not installed / not supported on this device
            rows.append((backend, None, f"unavailable ({type(err).__name__})"))
            continue
        s = statistics.median(times)
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else "see bench/memory.py"
        rows.append((backend, s, mem))

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nLoRA r{args.rank} step: {args.variant}, latent {args.latent} = {tokens} tokens, {str(dtype).split('.')[-1]}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {where}")
    print(f"  matmul peak measured here: {peak / 1e12:.2f} TFLOP/s; step = {flops / 1e12:.2f} TFLOP")
    print(f"  {'attention backend':<18}{'s/step':>10}{'tokens/s':>11}{'MFU':>8}  peak memory")
    for backend, s, mem in rows:
        if s is None:
            print(f"  {backend:<18}{'':>10}{'':>11}{'':>8}  {mem}")
        else:
            print(f"  {backend:<18}{s:>10.3f}{tokens / s:>11.1f}{flops / s / peak:>8.1%}  {mem}")
    if not gpu:
        print("  GPU rows (1.3B LoRA at 480x832x81 on a GPU): not measured (no GPU on this machine)")


if __name__ == "__main__":
    main()
