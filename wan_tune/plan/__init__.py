"""`wan-tune plan`: per-GPU memory and FLOPs of a training step, predicted before anything loads.

For the recipe's largest bucket (biggest `data.resolutions` entry x largest `data.frames`, batch
`train.batch_size`; Wan2.1 VAE: latent 16 x ((F-1)/4+1) x H/8 x W/8, Wan2.2 TI2V-5B VAE: 48 x
((F-1)/4+1) x H/16 x W/16; tokens = F' x H'/2 x W'/2) the plan adds up one device's peak:

- base weights by dtype, from the transformer built on the meta device (no weight is read) in the
  dtypes the trainer loads it in: `model.dtype` (fp32 for a full fine-tune or on a CPU), fp32 for
  diffusers' `_keep_in_fp32_modules`, fp8 for the linear weights with `train.fp8_base` except
  `FP8_SKIP`;
- trainable state: LoRA (or, full fine-tune, all) weights fp32 + gradients fp32 + two AdamW moments
  (fp32; 8-bit with adamw8bit), plus DDP's gradient buckets across GPUs; under DeepSpeed ZeRO the
  layout of its mixed precision (16-bit weights and gradients, fp32 master weights and moments):
  stage 2 divides gradients and optimizer state by the GPU count, stage 3 the weights too (plus one
  block gathered whole, and DeepSpeed's default reduce buckets, 5e8 elements);
- activations, counted, not estimated: one training step (the trainer's own `adapt`, `predict`,
  loss and backward) runs on the meta device with the fused attention and autocast of the real
  device emulated (see `meta_step`), and the peak of live bytes over forward and backward is taken:
  what autograd keeps for the backward plus the backward's working set (gradients of activations,
  the recomputed block under gradient checkpointing, temporaries). A 2-block model is counted, and
  what the forward of block 1 keeps alive is added once per further block (blocks are identical;
  block 0 differs, its input needs no gradient; the peak comes in the backward, when all of it is
  still alive). Checked against whole-model counts and against measured CPU peaks
  (tests/test_plan.py);
- block offload (`train.offload=blocks`): only the non-block weights, `offload_keep` blocks and 3
  streamed blocks (running, prefetched, just finished) are on the GPU; the streamed blocks' pinned
  host copies are shown as host RAM;
- activation offload (`train.activation_offload`, with checkpointing): the block inputs checkpointing
  keeps (`block_saved`, one per block) wait in pinned host memory, all but 2 (the block recomputing
  and the one prefetched) off the GPU; the buffers (one per block) are shown as host RAM. On a CPU
  host and device are one memory: nothing leaves, and the 2 copies back come on top;
- FFN chunks (`train.ffn_chunks`), attention checkpoints (`train.attention_checkpointing`) and LoRA
  inputs left in the autocast dtype (`train.lora_fp32_inputs` false) are counted by the meta step
  itself: it runs the trainer's `adapt`, which sets them up (the nested checkpoints recompute under
  the emulated kernels too);
- Wan2.2 A14B training both experts: one expert's frozen weights on the GPU (the other's wait in
  host RAM), both experts' trainable state;
- the AdamW step's temporaries (torch's foreach step on a GPU makes one fp32 tensor of the trainable
  size; the CPU loop one per parameter), which never coexist with the activations.

Not counted, but kept free of the budget before anything "fits" (report.py's headroom, 1 GiB + 5%
of the card): the CUDA context, the caching allocator's fragmentation and cuBLAS / attention-kernel
workspaces. Not counted at all: `train.compile` (compiled blocks usually keep less) and
communication buffers other than ZeRO's reduce buckets. The CPU side (`device="cpu"`: the recipe's
dtypes under CPU autocast) is checked against measured peak RSS of real steps (tiny and 1.3B in
fp32, checkpointing on and off, with activation offload: within 5%, the test allows 15%); the GPU
side follows the same counts with CUDA's autocast (its fp32 list emulated: equal to a real CPU step
under models/precision.py's emulation), and stays unverified until it is measured on a GPU.
"""

from .flops import step_flops
from .memory import Breakdown, MemoryPlan, Setup, run_shape

__all__ = ["Breakdown", "MemoryPlan", "Setup", "run_shape", "step_flops"]
