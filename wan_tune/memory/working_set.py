"""Plan rungs: attention checkpoints (`train.attention_checkpointing`) and FFN chunks (`train.ffn_chunks`).

What one block's backward holds at once: the settings that shrink it without changing results.

With gradient checkpointing a block's backward first recomputes the whole block, keeping everything
each op saves for the backward, then runs the backward through it. At 720x1280x81 (75,600 tokens)
that is ~21 GiB for one 14B block: fp32 copies of the stream for the norms and the gated residuals
(1.4 GiB each), the fp32 copies the q/k RMS norms keep, q, k, v and the attention output, the FFN's
13,824-wide hidden layer. Two patches split that recompute into smaller ones (nested checkpoints,
which torch's non-reentrant checkpoint supports):

- `train.ffn_chunks` (`chunk_feed_forward`): the feed-forward on slices of tokens, each checkpointed.
- `train.attention_checkpointing` (`checkpoint_attention`): each attention layer checkpointed inside
  the block, so the block's recompute keeps only the layer's input, and the layer's own recompute
  (projections, q/k norms, rope) happens just before its backward. The attention kernel's outputs
  are kept from the block's recompute (selective checkpointing: torch's
  `create_selective_checkpoint_contexts`), so the quadratic part is not computed a third time.

Both recompute the same ops on the same inputs with the RNG state restored (LoRA dropout), so every
token's value is the same; the patches are on the instance, so module names (LoRA keys,
checkpoints) do not change. `checkpoint(fn, *args, context_fn=...)`: torch's non-reentrant
checkpoint unless given (the planner passes one that recomputes under its emulated kernels, see
plan/meta_step.py).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as torch_checkpoint

aten = torch.ops.aten
# The fused attention kernels SDPA dispatches to (CUDA flash, memory-efficient, cuDNN; the CPU flash
# kernel), whose outputs the attention checkpoint keeps. Others (the math path, flash-attn's own
# functions) are recomputed: correct, only slower.
ATTENTION_KERNELS = frozenset(
    op.default
    for op in (aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
               aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu)
)


def _torch_checkpoint(fn, *args, context_fn=None):
    # Two calls, not `context_fn=context_fn or noop_context_fn`: torch.compile traces a checkpoint
    # only when no context_fn is passed (dynamo: "checkpoint not implemented for ... context_fn").
    if context_fn is None:
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return torch_checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)


def shrink_working_set(model, train, checkpoint=None) -> None:
    """Apply the recipe's `train.ffn_chunks` and `train.attention_checkpointing` to every block, and
    with `train.gradient_checkpointing` checkpoint Wan2.2-Animate's face adapters too.
    A VACE model's VACE blocks get the FFN chunks; their attention is not checkpointed again (torch's
    checkpoint around them refuses checkpoints that only its recompute has)."""
    for block in getattr(model, "vace_blocks", ()):
        if train.ffn_chunks > 1:
            chunk_feed_forward(block.ffn, train.ffn_chunks, checkpoint)
    for block in model.blocks:
        if train.ffn_chunks > 1:
            chunk_feed_forward(block.ffn, train.ffn_chunks, checkpoint)
        if train.attention_checkpointing:
            checkpoint_attention(block.attn1, checkpoint)
            checkpoint_attention(block.attn2, checkpoint)
    if train.gradient_checkpointing:
        for adapter in getattr(model, "face_adapter", ()):
            checkpoint_face_adapter(adapter, checkpoint)


def checkpoint_face_adapter(adapter: torch.nn.Module, checkpoint=None) -> None:
    """Checkpoint a Wan2.2-Animate face adapter with the blocks (diffusers checkpoints the blocks
    only): it keeps its input, not its fp32 norm, queries, attention and projections. The 14B at
    480x832x77 keeps 2.2 GiB per adapter otherwise, 17.6 GiB for its 8 beside 12.8 GiB for the 40
    checkpointed blocks (`wan-tune plan`). Cost: its forward runs once more in the backward."""
    whole = getattr(adapter, "_unchecked_forward", adapter.forward)
    adapter._unchecked_forward = whole
    checkpoint = checkpoint or _torch_checkpoint

    def forward(*args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return whole(*args, **kwargs)
        return checkpoint(functools.partial(whole, **kwargs), *args)

    adapter.forward = forward


def chunk_feed_forward(ffn: torch.nn.Module, chunks: int, checkpoint=None) -> None:
    """Run a block's feed-forward on `chunks` slices of its tokens, each under its own checkpoint
    when autograd records: the hidden layer (13,824 wide on the 14B, ~2.7x the block's width) then
    exists for one slice at a time, in the forward, in the block's recompute and in its backward,
    never for all 32k-75k tokens. The FFN is per token, so each token's output is computed as
    before; weight gradients add the slices' sums one after another (another order of the same
    sum). Cost: the FFN's forward runs once more in the backward."""
    whole = getattr(ffn, "_unchunked_forward", ffn.forward)
    ffn._unchunked_forward = whole
    checkpoint = checkpoint or _torch_checkpoint

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        parts = hidden_states.chunk(chunks, dim=1)
        grad = torch.is_grad_enabled()
        return torch.cat([checkpoint(whole, part) if grad else whole(part) for part in parts], dim=1)

    ffn.forward = forward


def _keep_attention_kernels(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in ATTENTION_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_attention(attn: torch.nn.Module, checkpoint=None) -> None:
    """Checkpoint an attention layer (WanAttention) again inside its checkpointed block, keeping its
    attention kernel's outputs: the block's recompute then leaves the layer's input and the
    kernel's output (and log-sum-exp) instead of q, k, v, their fp32 norm copies and the
    projections' inputs. Cost: the q/k/v/out projections, norms and rope run once more in the
    backward. Needs the block checkpointed (train.gradient_checkpointing)."""
    whole = getattr(attn, "_unchecked_forward", attn.forward)
    attn._unchecked_forward = whole
    checkpoint = checkpoint or _torch_checkpoint
    context = functools.partial(create_selective_checkpoint_contexts, _keep_attention_kernels)

    def forward(*args, **kwargs) -> torch.Tensor:
        # Only in the block's recompute, which runs inside the backward. In the block's first
        # forward the outer checkpoint already drops what the layer saves, while the kept kernel
        # outputs would stay alive for every block until its backward.
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() == -1:
            return whole(*args, **kwargs)
        return checkpoint(functools.partial(whole, **kwargs), *args, context_fn=context)

    attn.forward = forward
