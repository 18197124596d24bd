"""Plan rungs: ZeRO-2 / ZeRO-3 / FSDP2 (`launch/accelerate/zero*.yaml`, `fsdp2.yaml`).

Weights that live in pieces across ranks: DeepSpeed ZeRO-3 and PyTorch FSDP2.

At real sizes every large parameter is partitioned: under ZeRO-3 a rank's `param.data` is an
empty tensor (its slice sits in `param.ds_tensor`), under FSDP2 a parameter is a DTensor whose
local part is one shard. Anything that reads weights (checkpoints, the weight digest) must
gather them first. Here the trainable weights are gathered one module at a time, so no rank ever
holds more than one module's full weights beyond its own shards, and only rank 0 keeps copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator

import torch

from ..training.errors import CheckpointError


def sharding(accelerator) -> str | None:
    """'zero3', 'fsdp2', or None when every rank holds whole parameters (single process, DDP, ZeRO-1/2)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        return "zero3"
    if accelerator.distributed_type.name == "FSDP":
        return "fsdp2" if accelerator.state.fsdp_plugin.fsdp_version == 2 else "fsdp1"
    return None


def fsdp_on_cpu(accelerator) -> None:
    """Turn FSDP on for a multi-process CPU launch of an FSDP config.

    accelerate only turns FSDP on for accelerator devices and silently falls back to DDP on
    CPU, but torch's FSDP2 runs on CPU with gloo. With this, the FSDP configs under launch/
    are exercised by the CPU tests the same way they run on GPUs (accelerate's own
    `_prepare_fsdp2` does the wrapping; only the device check is skipped)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or accelerator.distributed_type.name == "FSDP":
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launch config, as accelerate would
    if plugin.fsdp_version != 2:
        raise RuntimeError("FSDP on CPU is supported with fsdp_version: 2 only (launch/accelerate/fsdp2_cpu.yaml)")
    if accelerator.mixed_precision != "no":  # accelerate's own policy for the run's precision, as on a GPU
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    # accelerate copies PartialState's shared state into every later AcceleratorState(): keep
    # the two in step, as AcceleratorState.__init__ itself does.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def fsdp2_precision(accelerator, mixed_precision: str) -> None:
    """FSDP2's mixed precision as the trainer needs it: weights gathered in the autocast dtype,
    gradients reduced in fp32 (as DDP reduces them), and the forward's inputs left as they are.
    accelerate's policy (`param_dtype=reduce_dtype=output_dtype=bf16`, torch's default
    `cast_forward_inputs=True`) casts every fully-sharded module's floating inputs to bf16: the
    transformer's timestep (sigma * 1000, rounded to multiples of 4 above 512 before the sinusoidal
    embedding, where inference feeds fp32) and each block's RoPE cos/sin tables. Autocast does the
    compute dtypes, as under DDP."""
    if accelerator.distributed_type.name != "FSDP" or mixed_precision == "no":
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ..models.precision import AUTOCAST

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=AUTOCAST[mixed_precision], reduce_dtype=torch.float32, cast_forward_inputs=False)


def reshard(model) -> None:
    """FSDP2 leaves the root module's weights gathered after a forward without a backward (it expects
    the backward next): after a render or a held-out score, shard them again, or the next checkpoint
    or digest meets whole weights where it expects shards. No-op for a model without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def unpartitioned_loading(accelerator):
    """A context in which models load whole. Under a ZeRO-3 config accelerate registers it with
    transformers, which then partitions every model it loads (zero.Init), whatever
    `zero3_init_flag` says; the validation pipeline's encoders run outside the DeepSpeed
    engine, where nothing would gather their weights back."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter, however it is stored on this rank."""
    ds_shape = getattr(p, "ds_shape", None)  # ZeRO-3: `p.shape` is the empty placeholder's
    return torch.Size(ds_shape) if ds_shape is not None else p.shape  # a DTensor's shape is global


def local_share(model) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model): how much sharding saves here."""
    local = total = 0
    for p in model.parameters():
        n = full_shape(p).numel()
        total += n
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            local += p.to_local().numel()
        else:
            local += n
    return local, total


def iter_full_trainable(accelerator, model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every trainable parameter, on every rank, one module at a time.

    Collective: every rank must iterate to the end (the gathers are collectives). A yielded
    tensor is valid until the next one is requested. Each is checked against the parameter's
    whole shape on every rank alike, so a weight that was not gathered raises on all ranks
    together instead of reaching a file (or hanging the other ranks)."""

    kind = sharding(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    for prefix, module in unwrapped.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        with _gathered(kind, [p for _, p in params]), torch.no_grad():
            for n, p in params:
                name = f"{prefix}.{n}" if prefix else n
                full = _whole(p) if kind == "fsdp2" else p.detach()
                if full.shape != full_shape(p):
                    raise CheckpointError(
                        f"{name}: got a tensor of shape {tuple(full.shape)} for a parameter of shape "
                        f"{tuple(full_shape(p))} (a sharded weight that was not gathered); nothing was written"
                    )
                yield name, full


def _whole(p) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor. `full_tensor()` may hand back an
    AsyncCollectiveTensor, whose storage safetensors cannot address: wait for it."""
    full = p.full_tensor()
    return full.wait() if hasattr(full, "wait") else full


def _gathered(kind: str | None, params: list[torch.Tensor]):
    if kind == "zero3":
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    if kind == "fsdp1":
        raise RuntimeError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config")
    return contextlib.nullcontext()


def gather_trainable(accelerator, model) -> dict[str, torch.Tensor]:
    """Whole trainable weights as fp32 CPU copies on rank 0 ({} on the others). Collective."""
    main = accelerator.is_main_process
    out = {}
    for name, full in iter_full_trainable(accelerator, model):
        if main:  # a copy: under ZeRO-3 the gathered storage is released after the module
            out[name] = full.to("cpu", torch.float32, copy=True)
    return out


def weights_digest(accelerator, model) -> str:
    """sha256 over the whole trainable weights, computed on every rank (collective): ranks that
    agree hold the same model, and it equals the digest of a one-process run of the same weights."""
    h = hashlib.sha256()
    for name, full in iter_full_trainable(accelerator, model):  # streamed: one module in memory at a time
        h.update(name.encode())
        h.update(full.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fsdp2_optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state keyed by parameter name, on rank 0 ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def fsdp2_load(model, optimizer, weights: dict, optim_state: dict) -> None:
    """Load whole weights and optimizer state (read on rank 0 only; `{}` elsewhere) into the
    shards of every rank. Collective. Independent of the world size that wrote them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
