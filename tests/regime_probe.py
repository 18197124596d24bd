"""`accelerate launch ... -m regime_probe RECIPE [overrides]` (tests/test_gpu_regime.py): the trainer,
with hooks that print once per rank what Wan's time embedder and block 0's self-attention receive
(the timestep's dtype, the RoPE tables'), and FSDP2's mixed precision where the model has it:
`[probe] {...}`."""

from __future__ import annotations

import json


def watch(model) -> None:
    import torch
    import torch.distributed as dist

    seen: dict = {}

    def timestep(_module, args):
        if torch.is_grad_enabled():  # a training forward (renders feed the scheduler's timesteps)
            seen.setdefault("timestep", str(args[0].dtype))

    def rope(_module, args):
        if "rope" in seen or not torch.is_grad_enabled():
            return
        seen["rope"] = [str(t.dtype) for t in args[3]]  # WanAttention(hidden, None, None, rotary_emb)
        seen["rank"] = dist.get_rank() if dist.is_initialized() else 0
        if hasattr(model, "_get_fsdp_state"):
            policy = model._get_fsdp_state()._mp_policy
            seen.update(param_dtype=str(policy.param_dtype), reduce_dtype=str(policy.reduce_dtype))
        print(f"[probe] {json.dumps(seen)}", flush=True)

    # Children of the sharded modules: their inputs are what FSDP2's pre-forward hooks of the
    # transformer and of block 0 hand on.
    model.condition_embedder.register_forward_pre_hook(timestep)
    model.blocks[0].attn1.register_forward_pre_hook(rope)


def main() -> None:
    import wan_tune.training.run as run
    from wan_tune.train import _exit, main as train_main

    load = run.load_for_training

    def load_and_watch(*args, **kwargs):
        model = load(*args, **kwargs)
        watch(model)
        return model

    run.load_for_training = load_and_watch
    _exit(train_main())


if __name__ == "__main__":
    main()
