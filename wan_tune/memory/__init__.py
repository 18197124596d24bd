"""Fitting one GPU: one module per rung of `wan-tune plan`'s ladder, in its order.

| rung (plan) | recipe key | module |
|---|---|---|
| checkpointing (blocks; attention) | `train.gradient_checkpointing`, `train.attention_checkpointing` | `activation_offload` (BlockCheckpoint), `working_set` |
| fp8 base | `train.fp8_base` | `fp8_base` |
| activation offload | `train.activation_offload` | `activation_offload` |
| FFN chunks | `train.ffn_chunks` | `working_set` |
| block offload (and the idle A14B expert) | `train.offload=blocks`, `train.offload_keep` | `block_offload` |

`host_arena` is the pinned host memory that activation and block offload share. Spreading over
several GPUs (ZeRO, FSDP2, context parallelism) is `wan_tune.parallel`'s.
"""
