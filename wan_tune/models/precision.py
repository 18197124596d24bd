"""The precision regime of a run, said once: what the base weights hold, what the step computes in,
and how a render reads the weights.

- Training: the frozen base in `model.dtype` (a full fine-tune keeps fp32 master weights), LoRA
  weights in fp32, the forward and backward under autocast in `train.mixed_precision`. A CPU runs
  the same regime as a GPU (torch's CPU autocast; slower, never different in kind), so the suite
  sees what a GPU run does.
- Renders (validation, anything that runs the live model as inference does): a LoRA reads the weights
  as diffusers and ComfyUI do, without autocast: the base computes in its own dtype, each LoRA layer
  casts its input to its own weights' dtype and its output back (peft's default, which training may
  switch off: `train.lora_fp32_inputs`, and fp8 storage always does). A full fine-tune's fp32 master
  weights are read under the run's autocast, as a bf16 copy of them would compute. A LoRA trained
  without autocast (`train.mixed_precision=no`) over a bf16 base casts as inference does, always.
- CUDA's autocast runs a list of ops in fp32 that CPU autocast runs in the low dtype (RMS norm,
  layer norm, softmax, ...): Wan's q/k RMS norms hand fp32 q and k to attention on a GPU and bf16 on
  a CPU. `cuda_autocast_emulated` makes CPU autocast do what CUDA's does for those ops, so a CPU run
  meets what a GPU run meets (tests; WAN_TUNE_CUDA_AUTOCAST=1 turns it on in launched processes).
"""

from __future__ import annotations

import contextlib
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
EMULATE_ENV = "WAN_TUNE_CUDA_AUTOCAST"
# Ops of torch's CUDA autocast fp32 list (torch/testing/_internal/autocast_test_lists.py,
# AutocastTestLists.torch_fp32) that CPU autocast leaves in the low dtype and a Wan forward, loss or
# optimizer can reach. "name.overload" as torch.ops.aten names them.
CUDA_FP32_OPS = (
    "rms_norm.default", "layer_norm.default", "group_norm.default", "softmax.int", "log_softmax.int",
    "exp.default", "pow.Tensor_Scalar", "rsqrt.default", "sum.default", "sum.dim_IntList", "cumsum.default",
    "logsumexp.default", "norm.Scalar", "reciprocal.default",
)
_EMULATING: list = []  # the torch.library registration while the emulation is on


def on_cuda_fp32_list(name: str) -> bool:
    """Whether this torch's CUDA autocast has a kernel for `name` ("rms_norm.default"), one of
    `CUDA_FP32_OPS`: the list grows between releases. rms_norm joined it after torch 2.11 (on an
    H200 with torch 2.11, Wan's q/k norms returned bf16 under bf16 autocast; 2.13 returns fp32), so
    the emulation and the plan follow the torch that is installed, as a GPU with it would."""
    base, overload = name.split(".")
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            f"aten::{base}" + ("" if overload == "default" else f".{overload}"), "AutocastCUDA")
    except (AttributeError, RuntimeError):  # a private API: without it, assume the newest list
        return True


def base_dtype(recipe) -> torch.dtype:
    """The frozen weights' dtype: model.dtype, fp32 for a full fine-tune's master weights."""
    return torch.float32 if recipe.adapter.method == "full" else DTYPES[recipe.model.dtype]


def describe(recipe) -> str:
    """The regime for the start line: 'base bf16, autocast bf16, fp8 storage'."""
    words = [f"base {'fp32 (master weights)' if recipe.adapter.method == 'full' else recipe.model.dtype}",
             f"autocast {recipe.train.mixed_precision}" if recipe.train.mixed_precision != "no" else "no autocast"]
    if recipe.train.fp8_base and recipe.adapter.method != "full":
        words.append("fp8 storage")
    if _EMULATING:
        words.append("CUDA's fp32 autocast ops emulated")
    return ", ".join(words)


def set_lora_input_casting(model: torch.nn.Module, enabled: bool) -> None:
    """Turn peft's cast of each LoRA layer's input to its weights' dtype on or off."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled


def cast_lora_inputs(model: torch.nn.Module) -> list:
    """Cast the input of every LoRA down-projection (peft's `lora_A`) to its weights' dtype, as peft
    does by default, and however the layer is set: diffusers' layerwise casting (fp8 storage) wraps
    each LoRA layer's forward in peft's `disable_input_dtype_casting`, so the setting alone does not
    hold there. peft casts the layer's output back to the base's dtype. Returns the hook handles."""
    from peft.tuners.lora import LoraLayer

    def cast(module, args):
        return (args[0].to(module.weight.dtype), *args[1:])

    return [a.register_forward_pre_hook(cast) for m in model.modules() if isinstance(m, LoraLayer)
            for a in m.lora_A.values()]


def drop_autocast_wrapper(model: torch.nn.Module) -> None:
    """Undo accelerate's wrapping of a prepared model's forward in its autocast (`prepare` keeps the
    forward it replaced as `_original_forward`). The trainer enters autocast itself where it computes
    (the step, the held-out loss); renders must be free to read the weights without it. Not
    accelerate's `unwrap_model(keep_fp32_wrapper=False)`: it unwraps every `__wrapped__` it finds,
    diffusers' own decorators and hooks on the forward too."""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        model.forward = original


@contextlib.contextmanager
def as_inference(models, lora: bool, device_type: str, autocast: torch.dtype | None):
    """Run `models` as inference reads their weights (see the module docstring): a LoRA without
    autocast, peft's input casts on; a full fine-tune under the run's autocast."""
    if not lora:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            yield
        return
    handles = [h for m in models for h in cast_lora_inputs(m)]
    layers = [layer for m in models for layer in cast_lycoris_inputs(m)]
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        for h in handles:
            h.remove()
        for layer in layers:  # the class's own method again
            del layer._get_delta_activations


def cast_lycoris_inputs(model: torch.nn.Module) -> list:
    """What `cast_lora_inputs` does for peft's LoHa / LoKr layers, which have no `lora_A` to hook:
    each applies its fp32 whole-size update to the layer's input, cast to the update's dtype here
    (peft's own cast is off after training under autocast, and fp8 storage wraps it off too).
    Without autocast a bf16 input met the fp32 update: the first validation render died (CPU
    regime test). Returns the layers patched (their instance attribute is removed to undo)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    patched = []
    for layer in model.modules():
        if isinstance(layer, LycorisLayer):
            # the dtype of its adapter's weights (hada_* / lokr_*), not of the base layer's
            dtype = next(p.dtype for n, p in layer.named_parameters() if n.split(".")[0] in layer.adapter_layer_names)

            def cast(adapter_name, x, *args, _own=layer._get_delta_activations, _dtype=dtype, **kwargs):
                return _own(adapter_name, x.to(_dtype), *args, **kwargs)

            layer._get_delta_activations = cast
            patched.append(layer)
    return patched


@contextlib.contextmanager
def cuda_autocast_emulated():
    """CPU autocast runs `CUDA_FP32_OPS` in fp32 inside this context, as CUDA autocast does (a
    context already inside one changes nothing). A kernel for each op under the AutocastCPU
    dispatch key casts the op's bf16 / fp16 tensors to fp32 and calls the op below autocast: what
    CUDA's fp32 policy does, so it holds in the backward's recomputes too (it is the dispatcher's,
    not a Python mode)."""
    fresh = not _EMULATING
    if fresh:
        _EMULATING.append(_register_fp32_kernels())
    try:
        yield
    finally:
        if fresh:
            _EMULATING.pop()._destroy()


def _register_fp32_kernels():
    from torch.utils._pytree import tree_map

    lib = torch.library.Library("aten", "IMPL")
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t

    def kernel_for(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(below):
                args, kwargs = tree_map(up, (args, kwargs))
                return op(*args, **kwargs)

        return kernel

    for name in filter(on_cuda_fp32_list, CUDA_FP32_OPS):
        base, overload = name.split(".")
        lib.impl(name if overload != "default" else base, kernel_for(getattr(getattr(torch.ops.aten, base), overload)),
                 "AutocastCPU")
    return lib


def emulate_if_asked() -> None:
    """WAN_TUNE_CUDA_AUTOCAST=1 (a test mode; a GPU does it by itself): the emulation for the rest of
    this process (a launched training process)."""
    if os.environ.get(EMULATE_ENV) == "1" and not _EMULATING:
        _EMULATING.append(_register_fp32_kernels())
