"""Plan rung: FSDP2 (`launch/accelerate/fsdp2.yaml`): the load of a sharded model.

FSDP2 runs load the transformer into each rank's shards, never whole on any rank.

A normal load gives every process the whole model in host RAM before FSDP2 cuts it into shards:
eight ranks of a 14B full fine-tune (fp32) would hold 8 x 57 GB on one node. Here:

1. `empty_transformer`: every rank builds the model with its weights allocated and never written.
   The pages of an untouched allocation are not in memory (the kernel maps them on first write),
   so this costs no RAM; each weight still has its own storage, which accelerate's FSDP2 prepare
   needs (it matches the optimizer's parameters to the sharded ones by storage address: the meta
   device, where every address is 0, would pair them wrongly). The LoRA is added on top as in a
   normal load, from the same seed, so its initial values are the normal ones.
2. accelerate's prepare shards it (reading an untouched page costs nothing either).
3. `fill_shards`: each rank reads, from the memory-mapped safetensors files, only the rows of each
   weight its shard holds (FSDP2 splits dim 0), and writes them into the shard. The pages of a
   file are shared by the processes of a node (the page cache), and each rank touches only its own.

accelerate's `fsdp_cpu_ram_efficient_loading` has rank 0 load the whole model and broadcast it,
which still keeps a whole copy (and a shard) on rank 0; this keeps about one copy per node in all
(tests/test_sharded.py measures it on the 1.3B architecture).
"""

from __future__ import annotations

import torch

from ..memory.fp8_base import _meta_model, stored_weights, weight_files
from ..models.loading import ModelLoadError, ModelSource, check_transformer_config, load_dtypes
from ..models.spec import is_adapter_parameter


def empty_transformer(source: ModelSource, dtype: torch.dtype, expert: str = "transformer"):
    """The transformer of `source` with every weight allocated in the dtype a normal load gives it
    (`dtype`; fp32 for the model's `_keep_in_fp32_modules`) and never written: `fill_shards`
    puts the values in after sharding. Buffers (the RoPE tables) are computed as usual."""
    config = dict(check_transformer_config(source, expert))
    model = _meta_model(config)  # built as from_pretrained builds it: the same RNG draws before the LoRA
    dtypes = load_dtypes(model, dtype)
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        empty = torch.empty(p.shape, dtype=dtypes[name])  # no page is touched until the shard is filled
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(empty, requires_grad=False)
    return model.eval()


def fill_shards(model: torch.nn.Module, source: ModelSource, expert: str = "transformer") -> int:
    """Read each base weight's rows of this rank's shard from `source`'s files into `model` (after
    FSDP2 sharding; a parameter that is not a DTensor is read whole). LoRA weights keep their
    values. Returns the bytes written on this rank."""
    # peft keeps a wrapped layer's own weight under `<layer>.base_layer.weight`.
    targets = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if not is_adapter_parameter(n)}
    files, original = weight_files(source, expert)
    filled, written = set(), 0
    with torch.no_grad():
        for name, file, f, key in stored_weights(files, original):
            written += _fill_one(targets, name, f.get_slice(key), file)
            filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ModelLoadError(
            f"{', '.join(str(f) for f in files)}: {len(missing)} weight(s) of the {source.variant.name} transformer "
            f"are missing, e.g. {', '.join(missing[:3])}; the files are incomplete or of another model"
        )
    return written


def _fill_one(targets: dict, name: str, stored, file) -> int:
    if name not in targets:
        raise ModelLoadError(f"{file}: weight {name!r} is not part of this transformer (another variant's file?)")
    p = targets[name]
    shape = tuple(stored.get_shape())
    if shape != tuple(p.shape):
        raise ModelLoadError(f"{file}: {name} has shape {shape}, the model needs {tuple(p.shape)}")
    local, start = _local_rows(p)
    if local.numel():
        local.copy_(stored[start:start + local.shape[0]] if local.dim() else stored[:])
    return local.numel() * local.element_size()


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of `p` and the first row of the whole weight it holds."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return p.data, 0
    if any(not isinstance(pl, (Shard, Replicate)) or (isinstance(pl, Shard) and pl.dim != 0) for pl in p.placements):
        raise ModelLoadError(f"a weight is sharded as {p.placements}; streamed loading reads row shards (FSDP2's dim 0)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), (offset[0] if offset else 0)
