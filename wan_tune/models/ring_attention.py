"""The attention kernel ring attention runs on (`train.context_parallel_kind=ring`).

diffusers' ring attention (`TemplatedRingAttention`) merges each rank's partial attentions by
their log-sum-exp, so it needs a backend whose kernel returns it: on a GPU diffusers' own
`_native_flash` (torch's flash kernel, bf16/fp16: what autocast hands it) does. Its default
`native` backend does not (SDPA returns no log-sum-exp), and diffusers has no such kernel for the
CPU, where the tests run with gloo. torch does: `_scaled_dot_product_flash_attention_for_cpu` and
its backward. So on a CPU tensor the `_native_flash` entry of diffusers' backend registry runs
diffusers' own ring template over that kernel; every other call (a GPU tensor, attention without
context parallelism) goes to diffusers' function unchanged. Nothing else in diffusers is touched.
"""

from __future__ import annotations

import torch

BACKEND = "_native_flash"


def use_ring_kernel(model: torch.nn.Module) -> None:
    """Set `model`'s attention to the backend ring attention runs on, on a GPU and on a CPU."""
    _register_cpu_kernel()
    model.set_attention_backend(BACKEND)


def _register_cpu_kernel() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName(BACKEND)
    diffusers_fn = _AttentionBackendRegistry._backends[name]
    if getattr(diffusers_fn, "wan_tune_cpu", False):
        return

    def native_flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     return_lse=False, _parallel_config=None):
        if query.device.type != "cpu" or _parallel_config is None:
            return diffusers_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                                _parallel_config)
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        if attn_mask is not None:
            raise ValueError("ring attention takes no attention mask")
        return _templated_context_parallel_attention(
            query, key, value, None, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=_cpu_forward, backward_op=_cpu_backward, _parallel_config=_parallel_config)

    native_flash.wan_tune_cpu = True
    _AttentionBackendRegistry._backends[name] = native_flash


def _cpu_forward(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 return_lse=False, _save_ctx=True, _parallel_config=None):
    """torch's CPU flash kernel in diffusers' op layout: [B, S, H, D] in and out, lse [B, S, H]."""
    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    if _save_ctx:  # in model layout, so the ring's backward can pass each step's key/value instead
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    return (out, lse) if return_lse else out


def _cpu_backward(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    given = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
    # The ring's backward passes all five (it read the saved tensors itself). Under gradient
    # checkpointing saved tensors may be unpacked once only: read them only when something is missing.
    if any(v is None for v in given.values()):
        saved = dict(zip(given, ctx.saved_tensors))
        given = {n: saved[n] if v is None else v for n, v in given.items()}
    t = {n: v.transpose(1, 2).contiguous() for n, v in given.items()}
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2).contiguous(), t["query"], t["key"], t["value"], t["out"], t["lse"], ctx.dropout_p,
        ctx.is_causal, scale=ctx.scale)
    return tuple(g.transpose(1, 2).contiguous() for g in grads)
