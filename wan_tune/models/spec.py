"""The narrow interface the trainer uses: the LoRA a recipe asks for, and a collated batch + noisy
latents + sigmas turned into the transformer's inputs (loading it for training, with the memory
settings, is training/model_setup.py's).

How Wan conditions (I2V: noisy latents ++ mask ++ condition latents, CLIP tokens as
`encoder_hidden_states_image`; timestep = sigma * 1000) is said here once, the way
`WanImageToVideoPipeline.__call__` feeds the transformer at inference.
"""

from __future__ import annotations

import torch

from ..config import Recipe
from .lora_targets import expand_targets
from .vace import control_inputs
from .variants import Variant

NUM_TRAIN_TIMESTEPS = 1000  # the Wan schedulers' num_train_timesteps: timestep = sigma * 1000


def lora_config(recipe: Recipe, variant: Variant):
    """peft's config for adapter.method: LoraConfig, or LyCORIS' LoHa / LoKr as peft builds them.
    Every one starts at a zero update: training starts exactly at the base model."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    a = recipe.adapter
    common = dict(r=a.rank, target_modules=expand_targets(a.targets, variant))
    alpha = a.alpha if a.alpha is not None else a.rank
    if a.method == "loha":
        return LoHaConfig(**common, alpha=alpha, module_dropout=a.dropout, init_weights=True)
    if a.method == "lokr":
        return LoKrConfig(**common, alpha=alpha, module_dropout=a.dropout, init_weights=True,
                          decompose_factor=a.lokr_factor, decompose_both=a.decompose_both)
    return LoraConfig(**common, lora_alpha=alpha, lora_dropout=a.dropout, init_lora_weights=True,  # B = 0
                      use_dora=a.method == "dora")  # DoRA's magnitudes start at the base rows' norms


def tokens_per_sample(variant: Variant, latent_shape) -> int:
    """Transformer sequence length of one latent [B, C, F, H, W] after patchify."""
    pt, ph, pw = variant.transformer["patch_size"]
    return (latent_shape[2] // pt) * (latent_shape[3] // ph) * (latent_shape[4] // pw)


ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")
"""Parts of peft's adapter parameter names (LoRA and DoRA, LoHa, LoKr): never in a base model's files."""


def is_adapter_parameter(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def timesteps_for(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * NUM_TRAIN_TIMESTEPS


def given_latent_frames(variant: Variant, batch: dict) -> int:
    """Leading latent frames the loss skips: TI2V-5B's image frame (given, not denoised), Animate's
    reference slot (denoised by the pipeline, then dropped before decoding: the reference stands in
    its condition channels, so predicting it back would only dilute the clip's loss)."""
    if variant.animate:
        return 1
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
    if variant.animate:  # WanAnimatePipeline: reference and segment condition, pose, face, CLIP tokens
        from .animate import transformer_kwargs

        return dict(transformer_kwargs(x_t, batch, dtype), timestep=timestep, encoder_hidden_states=batch["text"].to(dtype),
                    return_dict=False)
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
