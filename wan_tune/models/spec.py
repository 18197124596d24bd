"""The narrow interface the trainer uses: load the transformer for a recipe, adapt it (LoRA or
full), and turn a collated batch + noisy latents + sigmas into the transformer's inputs.

How Wan conditions (I2V: noisy latents ++ mask ++ condition latents, CLIP tokens as
`encoder_hidden_states_image`; timestep = sigma * 1000) is said here once, the way
`WanImageToVideoPipeline.__call__` feeds the transformer at inference.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import Recipe
from .loading import load_transformer, recipe_source
from .lora_targets import expand_targets
from .precision import DTYPES, base_dtype, cast_lora_inputs, set_lora_input_casting
from .vace import control_inputs
from .variants import Variant, get_variant
from .activation_offload import block_checkpoint
from .working_set import shrink_working_set

NUM_TRAIN_TIMESTEPS = 1000  # the Wan schedulers' num_train_timesteps: timestep = sigma * 1000
# Kept in their stored dtype under fp8 storage: small, precision-critical, or the adapters.
FP8_SKIP = ("patch_embedding", "condition_embedder", "norm", "lora_A", "lora_B", "proj_out", "scale_shift_table")


def lora_config(recipe: Recipe, variant: Variant):
    from peft import LoraConfig

    a = recipe.adapter
    return LoraConfig(
        r=a.rank,
        lora_alpha=a.alpha if a.alpha is not None else a.rank,
        lora_dropout=a.dropout,
        target_modules=expand_targets(a.targets, variant),
        init_lora_weights=True,  # B = 0: training starts exactly at the base model
    )


def load_for_training(recipe: Recipe, expert: str = "transformer", empty: bool = False):
    """The transformer (`expert`: Wan2.2 A14B's `transformer_2` is the low-noise one), frozen
    except what the recipe trains, ready for accelerate.prepare. `empty`: the base weights are
    allocated, not read (FSDP2: `sharded_load.fill_shards` reads each rank's rows after sharding)."""
    variant = get_variant(recipe.model.variant)
    source = recipe_source(recipe)
    # A full fine-tune keeps fp32 master weights (autocast does the low precision); a LoRA keeps
    # the frozen base in model.dtype, on a CPU too: slower there, but the same regime as a GPU's.
    dtype = base_dtype(recipe)
    if recipe.train.fp8_base and recipe.adapter.method != "full":
        from .streamed import load_transformer_fp8

        model = load_transformer_fp8(source, dtype, expert, FP8_SKIP)  # never whole in full precision
    elif empty:
        from .sharded_load import empty_transformer

        model = empty_transformer(source, dtype, expert)
    else:
        model = load_transformer(source, dtype, expert)
    return adapt(model, recipe, variant, dtype)


def load_frozen(recipe: Recipe, expert: str):
    """A Wan2.2 expert the run does not train, for validation renders: in model.dtype, stored in fp8
    with train.fp8_base as the trained one is (~14 GB instead of ~27 GB for an A14B expert)."""
    source, dtype = recipe_source(recipe), DTYPES[recipe.model.dtype]
    if not recipe.train.fp8_base:
        return load_transformer(source, dtype, expert).eval().requires_grad_(False)
    from diffusers.hooks import apply_layerwise_casting

    from .streamed import load_transformer_fp8

    model = load_transformer_fp8(source, dtype, expert, FP8_SKIP)
    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype, skip_modules_pattern=FP8_SKIP)
    return model.eval().requires_grad_(False)


def adapt(model, recipe: Recipe, variant: Variant, dtype: torch.dtype):
    """Freeze what the recipe does not train, add the LoRA (fp32 whatever the base dtype), store
    the frozen base in fp8 if asked, and turn on gradient checkpointing."""
    full = recipe.adapter.method == "full"
    model.requires_grad_(full)
    if not full:
        with _adapters_made_in(model, dtype):
            model.add_adapter(lora_config(recipe, variant))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
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
    if recipe.train.gradient_checkpointing:  # None: diffusers' default, torch's non-reentrant checkpoint
        model.enable_gradient_checkpointing(block_checkpoint(model, recipe.train))
    model.train()
    return model


@contextmanager
def _adapters_made_in(model, dtype: torch.dtype):
    """peft makes an adapter in its base weight's dtype. A base already stored in fp8 (streamed
    loading) would quantise the LoRA's initial values, so while the adapters are made, each fp8
    weight shows an empty stand-in of the compute dtype (peft reads only its dtype and device):
    the adapters come out as they do over a full-precision base, same RNG draws, same values."""
    fp8 = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn]
    kept = [m.weight.data for m in fp8]
    for m in fp8:
        m.weight.data = torch.empty(0, dtype=dtype, device=m.weight.device)
    try:
        yield
    finally:
        for m, w in zip(fp8, kept):
            m.weight.data = w


def tokens_per_sample(variant: Variant, latent_shape) -> int:
    """Transformer sequence length of one latent [B, C, F, H, W] after patchify."""
    pt, ph, pw = variant.transformer["patch_size"]
    return (latent_shape[2] // pt) * (latent_shape[3] // ph) * (latent_shape[4] // pw)


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


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def timesteps_for(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * NUM_TRAIN_TIMESTEPS


def given_latent_frames(variant: Variant, batch: dict) -> int:
    """Leading latent frames that are given, not denoised (TI2V-5B's image frame): the loss skips them."""
    return 1 if variant.expand_timesteps and "condition" in batch else 0


def transformer_inputs(
    variant: Variant, batch: dict, x_t: torch.Tensor, sigmas: torch.Tensor, dtype: torch.dtype
) -> dict:
    """Keyword arguments of the transformer's forward for noisy latents `x_t` at `sigmas`, as the
    variant's pipeline builds them at inference; tensors go in as `dtype`.

    Wan2.1 / Wan2.2 I2V: noisy latents ++ mask ++ condition latents (CLIP tokens beside the
    text for Wan2.1). Wan2.2 TI2V-5B (`expand_timesteps`): one timestep per token,
    [B, F' * H'/2 * W'/2]; with an image, its latent replaces the first latent frame and that
    frame's tokens get timestep 0 (the pipeline's first-frame mask).
    """
    timestep = timesteps_for(sigmas)
    if variant.expand_timesteps:
        mask = torch.ones_like(x_t[:, :1])  # [B, 1, F', H', W']: 0 where the image stands
        if "condition" in batch:
            mask[:, :, 0] = 0
        hidden = (1 - mask) * batch["condition"] + mask * x_t if "condition" in batch else x_t
        _, ph, pw = variant.transformer["patch_size"]
        timestep = (mask[:, 0, :, ::ph, ::pw] * timestep.view(-1, 1, 1, 1)).flatten(1)
    else:
        hidden = torch.cat([x_t, batch["condition"]], dim=1) if "condition" in batch else x_t
    image = batch.get("image_embeds")
    if image is not None and variant.last_frame:
        # FLF2V: [B, 2 x 257, D] stored, [2B, 257, D] as the pipeline hands them (its image
        # embedder puts each clip's pair back together before adding the position embedding).
        image = image.reshape(-1, image.shape[1] // 2, image.shape[2])
    inputs = dict(
        hidden_states=hidden.to(dtype),
        timestep=timestep,
        encoder_hidden_states=batch["text"].to(dtype),
        encoder_hidden_states_image=image.to(dtype) if image is not None else None,
        return_dict=False,
    )
    if variant.vace:  # WanVACEPipeline: the context as control_hidden_states, conditioning_scale per layer
        inputs.update(control_inputs(variant, batch, dtype))
    return inputs
