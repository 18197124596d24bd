"""VACE in training: the context a step feeds, and what its clip's latents become (and, in
`training_batch`, Animate's: models/animate.py).

`WanVACEPipeline` denoises the reference images' frames together with the clip (its noise has
R more latent frames; it cuts them off before decoding), so the latents a VACE step denoises are
the references' latents followed by the clip's: the first 16 channels of the context's first R
frames are exactly those latents (`prepare_video_latents` puts them there, zeros beside them).

Dropping inputs for a step (`vace.drop_reference`, `vace.drop_control`) builds the context the
pipeline builds without them: no reference frames; or the grey video's latents (`vace_blank`,
stored by prep) with an all-ones mask in place of the control and its mask.
"""

from __future__ import annotations

import torch

VIDEO_CHANNELS = 32  # inactive + reactive latents; the 64 mask channels follow


def references_in(batch: dict) -> int:
    return batch["vace_context"].shape[2] - batch["latents"].shape[2]


def vace_batch(batch: dict, drop_reference: bool = False, drop_control: bool = False, scale: float = 1.0) -> dict:
    """The batch a VACE step trains on: `latents` = references ++ clip, the context (with the
    dropped inputs taken out), and `vace_scale`, the hint weight."""
    context, refs = batch["vace_context"], references_in(batch)
    if drop_control:
        blank = batch["vace_blank"].to(context.dtype)
        clip = torch.cat([blank, blank, torch.ones_like(context[:, VIDEO_CHANNELS:, refs:])], dim=1)
        context = torch.cat([context[:, :, :refs], clip], dim=2)
    if drop_reference:
        context, refs = context[:, :, refs:], 0
    z = batch["latents"].shape[1]
    latents = torch.cat([context[:, :z, :refs].to(batch["latents"].dtype), batch["latents"]], dim=2)
    return {**batch, "latents": latents, "vace_context": context, "vace_scale": scale}


def training_batch(variant, recipe, batch: dict, gen: torch.Generator | None = None) -> dict:
    """`batch` as the variant trains on it: VACE's context and latents (dropout drawn from `gen`,
    one draw per micro-batch: its clips share a shape); Animate's latents with the reference's
    slot before them; other variants' batches as they are."""
    if variant.animate:
        from .animate import animate_batch

        draw = torch.rand(1, generator=gen) if gen is not None else torch.ones(1)
        return animate_batch(batch, bool(draw[0] < recipe.animate.drop_face))
    if not variant.vace:
        return batch
    v = recipe.vace
    draws = torch.rand(2, generator=gen) if gen is not None else torch.ones(2)
    return vace_batch(batch, bool(draws[0] < v.drop_reference), bool(draws[1] < v.drop_control), v.conditioning_scale)


def control_inputs(variant, batch: dict, dtype: torch.dtype) -> dict:
    """The VACE transformer's extra forward arguments: the context and one hint weight per VACE layer."""
    context, weight = batch["vace_context"], float(batch.get("vace_scale", 1.0))
    # 1.0: None, the model's own default (ones, one per VACE layer its config has).
    scale = None if weight == 1.0 else torch.full((len(variant.transformer["vace_layers"]),), weight, device=context.device, dtype=dtype)
    return {"control_hidden_states": context.to(dtype), "control_hidden_states_scale": scale}
