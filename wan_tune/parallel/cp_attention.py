"""What context-parallel attention hands its kernels (`train.context_parallel`, Ulysses or ring).

One dtype for q, k and v. Under CUDA autocast, Wan's q/k RMS norms run in fp32 (the norm is on CUDA's
fp32 list) while v comes out of a bf16 linear: SDPA called directly casts all three back to bf16
(it is on autocast's low-precision list), but diffusers' context-parallel templates move and save
them first, as they come. Ring attention then concatenates K and V into one fp32 buffer (twice the
bytes round the ring) and hands torch's flash backward fp32 q/k beside a bf16 v, which it refuses
("FlashAttention only support fp16 and bf16 data type"); Ulysses all-to-alls fp32 q/k (twice the
bytes). So every context-parallel attention call here casts q, k and v to autocast's dtype where
autocast is on (else to v's) before diffusers' template runs: what SDPA's own autocast would have
done, before the communication instead of after it. A CPU run shows the same failure with
`models/precision.py`'s emulation of CUDA's fp32 list.

The ring's kernel. diffusers' ring attention (`TemplatedRingAttention`) merges each rank's partial
attentions by their log-sum-exp, so it needs a backend whose kernel returns it: on a GPU diffusers'
own `_native_flash` (torch's flash kernel, bf16/fp16) does. Its default `native` backend does not
(SDPA returns no log-sum-exp), and diffusers has no such kernel for the CPU, where the tests run
with gloo. torch does: `_scaled_dot_product_flash_attention_for_cpu` and its backward. So on a CPU
tensor the `_native_flash` entry of diffusers' backend registry runs diffusers' own ring template
over that kernel; every other call goes to diffusers' function (attention without context
parallelism unchanged). Nothing else in diffusers is touched.
"""

from __future__ import annotations

import torch

RING_BACKEND = "_native_flash"
ULYSSES_BACKEND = "native"


def use_ring_kernel(model: torch.nn.Module) -> None:
    """Set `model`'s attention to the backend ring attention runs on, on a GPU and on a CPU."""
    register_cp_kernels()
    model.set_attention_backend(RING_BACKEND)


def one_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in autocast's dtype where autocast is on for their device, else in v's."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))


def register_cp_kernels() -> None:
    """Wrap diffusers' `native` (Ulysses) and `_native_flash` (ring) backends: context-parallel calls
    get q, k, v in one dtype, and ring calls on CPU tensors torch's CPU flash kernel (idempotent)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for backend in (ULYSSES_BACKEND, RING_BACKEND):
        name = AttentionBackendName(backend)
        diffusers_fn = _AttentionBackendRegistry._backends[name]
        if not getattr(diffusers_fn, "wan_tune", False):
            _AttentionBackendRegistry._backends[name] = _wrapped(diffusers_fn, ring=backend == RING_BACKEND)


def _wrapped(diffusers_fn, ring: bool):
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, _parallel_config=None):
        if _parallel_config is None:
            return diffusers_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                                _parallel_config)
        query, key, value = one_dtype(query, key, value)
        if not ring or query.device.type != "cpu":
            return diffusers_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                                _parallel_config)
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        if attn_mask is not None:
            raise ValueError("ring attention takes no attention mask")
        return _templated_context_parallel_attention(
            query, key, value, None, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=_cpu_forward, backward_op=_cpu_backward, _parallel_config=_parallel_config)

    attention.wan_tune = True
    return attention


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
