"""Plan rung: fp8 base (`train.fp8_base`).

Load a transformer straight into fp8 (`train.fp8_base`), one tensor at a time.

diffusers' `from_pretrained` materialises the whole model in the load dtype before anything can
cast it: a 14B in bf16 is 28.6 GB of host RAM, more than a 24 GB machine has, for weights that
end up as 14.3 GB of fp8. Here the module is built on the meta device, and each weight is read
from the memory-mapped safetensors file, cast to the dtype it will be stored in, and put in
place; the full-precision model never exists. The dtypes are the ones diffusers' layerwise
casting would give after a normal load (fp8 for the linear weights outside `skip`, fp32 for the
model's `_keep_in_fp32_modules`, the compute dtype for the rest), so both paths give the same
model, bit for bit (tested).
"""

from __future__ import annotations

import ctypes
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..models.keymap import UnmappedKeyError, to_diffusers
from ..models.loading import ModelLoadError, ModelSource, _check_single_file, check_transformer_config, load_dtypes

FP8 = torch.float8_e4m3fn
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI's single files

# Kept in their stored dtype under fp8 storage: small, precision-critical, or the adapters.
FP8_SKIP = ("patch_embedding", "condition_embedder", "norm", "lora_A", "lora_B", "proj_out", "scale_shift_table")


def _meta_model(config: dict):
    from accelerate import init_empty_weights

    from ..models.variants import transformer_class

    with init_empty_weights(include_buffers=False):  # buffers (the RoPE tables) are computed, not stored
        return transformer_class(config).from_config(config)


def stored_dtypes(config: dict, compute_dtype: torch.dtype, skip: tuple[str, ...]) -> dict[str, torch.dtype]:
    """The dtype each weight is kept in: what `apply_layerwise_casting` (fp8 storage) does to a
    model that `from_pretrained(torch_dtype=compute_dtype)` loaded, worked out on the meta device."""
    from diffusers.hooks import apply_layerwise_casting

    with torch.random.fork_rng(devices=[]):  # building draws from the RNG; the LoRA init after must not see it
        model = _meta_model(config)
    loaded = load_dtypes(model, compute_dtype)
    apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=compute_dtype, skip_modules_pattern=skip)
    return {name: FP8 if p.dtype == FP8 else loaded[name] for name, p in model.named_parameters()}


def weight_files(source: ModelSource, expert: str) -> tuple[list[Path], bool]:
    """The safetensors files of an expert's weights, and whether they use original (Wan) keys."""
    single = source.single_file(expert)
    if single is not None:
        _check_single_file(source, expert)
        return [single], True
    folder = source.folder / expert
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names], False
    file = folder / "diffusion_pytorch_model.safetensors"
    if not file.is_file():
        raise ModelLoadError(
            f"{folder} has no diffusion_pytorch_model.safetensors: train.fp8_base streams weights from safetensors "
            "files (convert the folder, or set train.fp8_base=false)"
        )
    return [file], False


def _groups(keys: list[str]) -> list[list[str]]:
    """Keys grouped by transformer block (and one group for the rest), in file order."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        parts = k.removeprefix(ORIGINAL_PREFIX).split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "blocks" else "", []).append(k)
    return list(groups.values())


def load_transformer_fp8(source: ModelSource, compute_dtype: torch.dtype, expert: str, skip: tuple[str, ...]):
    """A `WanTransformer3DModel` whose linear weights are fp8, read tensor by tensor: peak host
    memory is about the fp8 model plus one block's weights in the compute dtype."""
    config = dict(check_transformer_config(source, expert))
    dtypes = stored_dtypes(config, compute_dtype, skip)
    model = _meta_model(config)
    params = dict(model.named_parameters())
    files, original = weight_files(source, expert)
    with _large_allocations_mapped():
        _fill(model, params, files, original, dtypes, compute_dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(
            f"{', '.join(str(f) for f in files)}: {len(missing)} weight(s) of the {source.variant.name} transformer "
            f"are missing, e.g. {', '.join(missing[:3])}; the files are incomplete or of another model"
        )
    return model.eval()


@contextmanager
def _large_allocations_mapped():
    """Loading interleaves short-lived full-precision copies with the fp8 weights that stay.
    glibc serves allocations below its (self-raising, up to 32 MiB) mmap threshold from its heap,
    where the freed copies leave holes the process keeps: measured on the 1.3B, the load's peak
    RSS was 1.77x the weights it kept, 1.14x with every allocation above 128 KiB mapped on its
    own (returned to the OS when freed). The threshold is pinned at 128 KiB while loading, then
    set to 32 MiB (what glibc would raise it to), and freed heap is handed back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.malloc_trim(0)


def _fill(model, params: dict, files: list[Path], original: bool, dtypes: dict, compute_dtype: torch.dtype) -> None:
    for name, file, f, key in stored_weights(files, original):
        _put(model, params, name, f.get_tensor(key), dtypes, compute_dtype, file)


def stored_weights(files: list[Path], original: bool):
    """(the model's name of a weight, its file, the open file, its key there) for every weight in
    `files`, block by block: one open per block, since the pages of a mapped file that were read
    count as this process's memory until the file is closed."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({err})") from None
        for group in _groups(keys):
            with safe_open(str(file), framework="pt") as f:
                for key in group:
                    yield _name(key, original, file), file, f, key


def _name(key: str, original: bool, file: Path) -> str:
    if not original:
        return key
    try:
        return to_diffusers(key.removeprefix(ORIGINAL_PREFIX))
    except UnmappedKeyError:
        raise ModelLoadError(f"{file}: weight {key!r} is not part of a Wan transformer") from None


def _put(model, params: dict, name: str, tensor: torch.Tensor, dtypes: dict, compute_dtype: torch.dtype, file: Path) -> None:
    if name not in params:
        raise ModelLoadError(f"{file}: weight {name!r} is not part of this transformer (another variant's file?)")
    if tuple(tensor.shape) != tuple(params[name].shape):
        raise ModelLoadError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(params[name].shape)}")
    # Through the dtype a normal load would give it first, so the fp8 rounding is the same.
    loaded = torch.float32 if dtypes[name] == torch.float32 else compute_dtype
    value = tensor.to(loaded, copy=True).to(dtypes[name])  # copy: never a view of the mapped file
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
