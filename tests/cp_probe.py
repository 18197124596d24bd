"""A child of tests/test_context_parallel.py, started by torchrun with 2 processes (gloo): a tiny
transformer's forward and backward under wan-tune's context parallelism against the same step in
one process, computed here first. Arguments: lora|full, the tiny variant (tiny, tiny-i2v: image
tokens beside the text, tiny-ti2v: a timestep per token), ulysses|ring. Prints one JSON line per rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def model(method: str, variant: str):
    """The tiny architecture, 6 blocks, checkpointed, LoRA (or every weight trained)."""
    from test_offload import six_block_model

    m = six_block_model(variant=variant)
    if method == "full":
        m.requires_grad_(True)
    return m


def main() -> None:
    from test_offload import step

    from wan_tune.parallel.context_parallel import Layout, enable

    method, variant, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_loss, ref_grads = step(model(method, variant), variant)  # one process's step, the same on both ranks
    m = model(method, variant)
    enable(m, Layout(world, rank, world, kind), torch.device("cpu"))
    seen = []
    # Inside block 0 (diffusers' split runs in the block's own forward): its attention's input.
    m.blocks[0].attn1.register_forward_pre_hook(lambda _mod, args: seen.append(args[0].shape[1]))
    loss, grads = step(m, variant)
    for g in grads.values():  # the group's gradient: each rank holds its tokens' share
        dist.all_reduce(g)
    worst = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()) for n in ref_grads)
    print(json.dumps({"rank": rank, "tokens": seen, "loss": float(loss), "ref_loss": float(ref_loss),
                      "grads": sorted(grads) == sorted(ref_grads), "worst": worst, "n": len(grads)}), flush=True)
    dist.barrier()  # both ranks done with every collective
    # Not destroy_process_group and the interpreter's exit: torch's teardown after diffusers'
    # functional collectives sometimes aborts ("terminate called without an active exception",
    # seen once in ~10 runs on a loaded machine), after the results above are printed.
    os._exit(0)


if __name__ == "__main__":
    main()
