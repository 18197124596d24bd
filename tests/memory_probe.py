"""Measured host memory of a real CPU training step, for checking `wan-tune plan` against.

`measure(...)` runs a child process that does what bench/memory.py's child does: load the model
with wan-tune's `load_for_training` from a folder of random weights (bench/common.py), run one
step of the trainer's own step code (`predict`, flow-matching loss, backward, AdamW) with
gradient checkpointing, one with checkpointing and activation offload, one with checkpointing and
FFN chunks, one with checkpointing and attention checkpoints, and one without (a LoRA's
AdamW state, made at the first step, is small against the weights), and sample its RSS every 2 ms (bench/common.py's PeakRss,
reset between the phases). Two things make the RSS count
the step's tensors rather than the C library's bookkeeping, as a GPU's memory would:

- glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_): by default glibc raises it after large
  frees and then keeps freed tensors in its heap. Loading alone left ~1.9 GiB of the 1.3B's
  bf16 -> fp32 conversion there (5.4 GiB of weights, 7.3 GiB resident), which the step then lives in.
- before the baseline is taken, one step of the tiny model runs with the same settings, so modules
  imported and kernels paged in on first use (~0.1 GiB with checkpointing) are not counted as the
  step's memory.

Reported, in bytes above the RSS just before the model loads: the load's peak and the peak of
each phase's step (weights, trainable state and activations together).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# glibc's default threshold, fixed (setting it turns off the dynamic raise): every allocation from
# 128 KiB up gets its own mapping, returned to the OS when the tensor is freed.
MMAP_THRESHOLD = 128 * 1024


PHASES = ("checkpointing", "activation_offload", "ffn_chunks", "attention_checkpointing", "no_checkpointing")
FFN_CHUNKS = 4


def recipe_overrides(latent: tuple[int, int, int], phase: str) -> list[str]:
    """Recipe overrides whose largest bucket has exactly the `latent` F'xH'xW' (Wan2.1 VAE: 4x time,
    8x space), with a phase's memory settings."""
    f, h, w = latent
    return [f"data.frames=[{(f - 1) * 4 + 1}]", f"data.resolutions=[[{h * 8},{w * 8}]]",
            f"train.gradient_checkpointing={'false' if phase == 'no_checkpointing' else 'true'}",
            f"train.activation_offload={'true' if phase == 'activation_offload' else 'false'}",
            f"train.ffn_chunks={FFN_CHUNKS if phase == 'ffn_chunks' else 0}",
            f"train.attention_checkpointing={'true' if phase == 'attention_checkpointing' else 'false'}"]


def recipe(variant: str, latent: tuple[int, int, int], phase: str, rank: int = 32):
    """The recipe the child trains: bench's benchmark recipe on random weights and synthetic shards."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import model_folder, synthetic_shards, workdir
    from trainer_overhead import recipe_for

    root = workdir()
    folder, shards_dir = model_folder(variant, root), synthetic_shards(variant, root, 2, latent)
    return recipe_for(argparse.Namespace(variant=variant, steps=2, batch=1, rank=rank), folder, shards_dir,
                      root / "runs-plan", tuple(recipe_overrides(latent, phase)))


def measure(variant: str, latent: tuple[int, int, int], timeout: float = 900) -> dict:
    """{'load': bytes, 'steps': {phase: bytes}} above the RSS before the model, from one child
    process: the model loads once and trains in each phase of PHASES, in that order."""
    cmd = [sys.executable, __file__, variant, "x".join(map(str, latent))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load": r["load"], "steps": {phase: r[phase] for phase in PHASES}}


def _steps(recipe, n: int):
    """Load `recipe`'s model; at each further `next`, run `n` of the trainer's steps on its first
    sample, with gradient checkpointing on, then with activation offload too, then with FFN chunks
    instead, then with attention checkpoints instead, then without checkpointing (the largest peak last, so nothing a phase leaves behind can raise the next's)."""
    import torch
    from common import run_steps

    from wan_tune.data.dataset import ShardDataset, collate, to_device
    from wan_tune.training.model_setup import load_for_training
    from wan_tune.models.variants import get_variant

    batch = to_device(collate([ShardDataset(recipe.data.shards)[0]]), "cpu", torch.float32, recipe.data.max_text_tokens)
    model = load_for_training(recipe)
    variant = get_variant(recipe.model.variant)
    yield  # loaded
    from wan_tune.memory.activation_offload import ActivationOffload, BlockCheckpoint
    from wan_tune.memory.working_set import checkpoint_attention, chunk_feed_forward

    model.enable_gradient_checkpointing()
    run_steps(model, variant, batch, n, model.dtype)
    yield  # stepped with checkpointing
    offload = ActivationOffload(model)
    model.enable_gradient_checkpointing(offload)
    run_steps(model, variant, batch, n, model.dtype)
    del offload
    model.enable_gradient_checkpointing()  # the host buffers go with the offload
    yield  # stepped with activation offload
    for block in model.blocks:
        chunk_feed_forward(block.ffn, FFN_CHUNKS)
    run_steps(model, variant, batch, n, model.dtype)
    for block in model.blocks:
        block.ffn.forward = block.ffn._unchunked_forward
    yield  # stepped with FFN chunks
    for block in model.blocks:
        checkpoint_attention(block.attn1)
        checkpoint_attention(block.attn2)
    model.enable_gradient_checkpointing(BlockCheckpoint(model))
    run_steps(model, variant, batch, n, model.dtype)
    for block in model.blocks:
        block.attn1.forward, block.attn2.forward = block.attn1._unchecked_forward, block.attn2._unchecked_forward
    model.enable_gradient_checkpointing()
    yield  # stepped with attention checkpoints
    model.disable_gradient_checkpointing()
    run_steps(model, variant, batch, n, model.dtype)
    yield  # stepped without


def _child() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("latent")
    args = ap.parse_args()
    latent = tuple(int(x) for x in args.latent.split("x"))
    for _ in _steps(recipe("tiny", (1, 8, 8), "checkpointing"), 1):  # warm-up: first-use costs of every path
        pass
    measured = recipe(args.variant, latent, "checkpointing")
    from common import PeakRss, rss_bytes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_bytes()
    peak = PeakRss()
    phases = _steps(measured, 1)  # one step a phase: the AdamW state of a LoRA is small against the weights
    next(phases)
    load = peak.reset()
    steps = {}
    for phase in PHASES:
        next(phases)
        steps[phase] = (peak.stop() if phase == PHASES[-1] else peak.reset()) - before
    print(json.dumps({"load": load - before, **steps}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child()
