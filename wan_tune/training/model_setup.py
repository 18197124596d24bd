"""The transformer as training holds it: loaded for the recipe (fp8 streamed, sharded-empty, or
plain), frozen except what it trains, its LoRA added in fp32, fp8 storage, the working-set
settings and block checkpointing (`wan_tune.memory`'s rungs) turned on.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import Recipe
from ..memory.activation_offload import block_checkpoint
from ..memory.fp8_base import FP8_SKIP
from ..memory.working_set import shrink_working_set
from ..models.loading import load_transformer, recipe_source
from ..models.precision import DTYPES, base_dtype, cast_lora_inputs, set_lora_input_casting
from ..models.spec import lora_config
from ..models.token_routing import make_router
from ..models.variants import Variant, get_variant
from .init_from import init_file, start_from


def load_for_training(recipe: Recipe, expert: str = "transformer", empty: bool = False, fresh: bool = False):
    """The transformer (`expert`: Wan2.2 A14B's `transformer_2` is the low-noise one), frozen
    except what the recipe trains, ready for accelerate.prepare. `empty`: the base weights are
    allocated, not read (FSDP2: `sharded_load.fill_shards` reads each rank's rows after sharding).
    `fresh`: no checkpoint will be resumed, so adapter.init_from's LoRA is put in."""
    variant = get_variant(recipe.model.variant)
    source = recipe_source(recipe)
    # A full fine-tune keeps fp32 master weights (autocast does the low precision); a LoRA keeps
    # the frozen base in model.dtype, on a CPU too: slower there, but the same regime as a GPU's.
    dtype = base_dtype(recipe)
    if recipe.train.fp8_base and recipe.adapter.method != "full":
        from ..memory.fp8_base import load_transformer_fp8

        model = load_transformer_fp8(source, dtype, expert, FP8_SKIP)  # never whole in full precision
    elif empty:
        from ..parallel.sharded_load import empty_transformer

        model = empty_transformer(source, dtype, expert)
    else:
        model = load_transformer(source, dtype, expert)
    return adapt(model, recipe, variant, dtype, init_file(recipe, variant, expert) if fresh else None)


def load_frozen(recipe: Recipe, expert: str):
    """A Wan2.2 expert the run does not train, for validation renders: in model.dtype, stored in fp8
    with train.fp8_base as the trained one is (~14 GB instead of ~27 GB for an A14B expert)."""
    source, dtype = recipe_source(recipe), DTYPES[recipe.model.dtype]
    if not recipe.train.fp8_base:
        return load_transformer(source, dtype, expert).eval().requires_grad_(False)
    from diffusers.hooks import apply_layerwise_casting

    from ..memory.fp8_base import load_transformer_fp8

    model = load_transformer_fp8(source, dtype, expert, FP8_SKIP)
    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype, skip_modules_pattern=FP8_SKIP)
    return model.eval().requires_grad_(False)


def adapt(model, recipe: Recipe, variant: Variant, dtype: torch.dtype, init: Path | None = None, route: bool = True):
    """Freeze what the recipe does not train, add the LoRA (fp32 whatever the base dtype; `init`:
    started from that file's), store the frozen base in fp8 if asked, turn on gradient checkpointing, and
    install train.route_ratio's token routing (`route`: not on the planner's few-block stand-in)."""
    full = recipe.adapter.method == "full"
    model.requires_grad_(full)
    if not full:
        with _adapters_made_in(model, dtype):
            model.add_adapter(lora_config(recipe, variant))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
        if init is not None:
            a = recipe.adapter
            start_from(model, init, a.rank, a.alpha if a.alpha is not None else a.rank)
        if recipe.train.mixed_precision == "no":
            # Without autocast the cast is what lets a bf16 input meet the fp32 LoRA weights.
            cast_lora_inputs(model)
        elif not recipe.train.lora_fp32_inputs:
            # peft casts each LoRA input to its fp32 weights' dtype. Under autocast the matmul casts
            # it straight back to bf16, so the copy changes no result (without LoRA dropout), but it
            # lives in the forward and in each block's recompute: 4 bytes a value at 32k+ tokens.
            set_lora_input_casting(model, False)
        if recipe.train.fp8_base:
            from diffusers.hooks import apply_layerwise_casting

            # After add_adapter, never before: the other order casts the LoRA weights to fp8 too.
            apply_layerwise_casting(
                model, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype, skip_modules_pattern=FP8_SKIP
            )
            _return_freed_memory()
    shrink_working_set(model, recipe.train)
    model._token_router = make_router(model, recipe.train) if route else None  # idle outside a training step
    if recipe.train.gradient_checkpointing:  # None: diffusers' default, torch's non-reentrant checkpoint
        model.enable_gradient_checkpointing(block_checkpoint(model, recipe.train))
    model.train()
    return model


@contextmanager
def _adapters_made_in(model, dtype: torch.dtype):
    """peft makes an adapter in its base weight's dtype. A base already stored in fp8 (streamed
    loading) would quantise the LoRA's initial values, so while the adapters are made, each fp8
    weight shows a stand-in of the compute dtype and the weight's shape, one value broadcast over it
    (peft reads its dtype and device, LoHa / LoKr its shape): the adapters come out as they do over
    a full-precision base, same RNG draws, same values."""
    fp8 = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn]
    kept = [m.weight.data for m in fp8]
    for m in fp8:
        m.weight.data = torch.zeros(1, dtype=dtype, device=m.weight.device).expand(m.weight.shape)
    try:
        yield
    finally:
        for m, w in zip(fp8, kept):
            m.weight.data = w


def _return_freed_memory() -> None:
    """Hand the memory of the weights just cast to fp8 back to the OS. glibc keeps freed blocks
    in its heap, so without this the process kept the full-precision footprint (measured:
    5.73 GiB step peak against a 2.26 GiB floor for 1.3B). No-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
