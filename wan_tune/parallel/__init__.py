"""Spreading over many GPUs: the rungs of `wan-tune plan`'s ladder past one card.

| rung (plan) | launch / recipe key | module |
|---|---|---|
| ZeRO-2 / ZeRO-3 / FSDP2 (sharded weights, gathers, mixed precision) | `launch/accelerate/*.yaml` | `sharding` |
| a sharded model loaded without a whole copy per rank | FSDP2 launches | `sharded_load` |
| context parallelism (Ulysses, ring) | `train.context_parallel`, `train.context_parallel_kind` | `context_parallel`, `cp_attention` |

`process_group` is the process group for whichever way wan-tune was started (python, accelerate launch).
"""
