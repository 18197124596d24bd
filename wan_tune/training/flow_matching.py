"""Flow matching for Wan, as pure functions (DESIGN.md section 4).

x_t = (1 - sigma) * x0 + sigma * noise; the transformer predicts the velocity noise - x0 (how
the model is told sigma, and conditioned, is `models.spec`'s business). Everything random takes an explicit generator, so a step's draws
depend only on (seed, step, rank) and resume is exact without saving RNG state.
"""

from __future__ import annotations

import math

import torch

from ..models.spec import given_latent_frames, transformer_inputs


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma): s > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def auto_shift(native_shift: float, native_tokens: int, tokens: int) -> float:
    """`timesteps.shift: auto`: SD3's resolution-dependent shift (Esser et al. 2024, "Scaling Rectified
    Flow Transformers", sec. 5.3.2: a sequence m times as long keeps the same signal-to-noise at
    sqrt(m) times the shift), anchored at the model's own flow shift at its native size.
    (SimpleTuner's `flow_schedule_auto_shift` maps tokens to log-shift linearly, fitted to Flux's
    256..4096 image tokens; at Wan's 32,760 tokens of 480p x 81 frames it would give a shift of ~400.)"""
    return native_shift * math.sqrt(tokens / native_tokens)


def sample_sigmas(
    n: int,
    scheme: str,
    generator: torch.Generator,
    *,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigmoid_scale: float = 1.0,
    sigma_min: float = 0.0,
    sigma_max: float = 1.0,
) -> torch.Tensor:
    """`n` sigmas in (sigma_min, sigma_max) drawn by `scheme`.

    uniform: U(0,1); logit_normal: sigmoid(N(mean, std)); sigmoid: sigmoid(scale * N(0,1));
    shift: uniform, then shifted. The [min, max] range is applied last by an affine map, so the
    shape of the distribution is kept (Wan2.2 experts train one side of the boundary).
    """
    if scheme == "uniform":
        u = torch.rand(n, generator=generator)
    elif scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    elif scheme == "sigmoid":
        u = torch.sigmoid(torch.randn(n, generator=generator) * sigmoid_scale)
    elif scheme == "shift":
        u = shift_sigmas(torch.rand(n, generator=generator), shift)
    else:
        raise ValueError(f"unknown sigma sampling scheme {scheme!r}")
    # Keep clear of exactly 0 and 1: both are degenerate (no noise / no signal).
    u = u.clamp(1e-5, 1 - 1e-5)
    return sigma_min + (sigma_max - sigma_min) * u


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights, normalised to mean 1 over the batch so lr keeps its meaning."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        w = sigmas.clamp_min(1e-4) ** -2.0
    elif scheme == "cosmap":
        w = 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    else:
        raise ValueError(f"unknown loss weighting {scheme!r}")
    return w / w.mean()


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over elements of each sample, weighted mean over the batch; computed in fp32."""
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return (per_sample * weights.to(per_sample)).mean()


def predict(
    model, variant, batch: dict, sigmas: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype,
    mask_conditioned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(velocity prediction, flow-matching target) of `variant`'s transformer for a collated
    batch, over the latent frames that carry loss; inputs go in as `dtype`. TI2V's image frame is
    an input, never a prediction; `mask_conditioned` (train.loss_mask_conditioned_frames) also
    leaves out the latent frames an I2V / FLF2V clip is conditioned on (its first, and last)."""
    x0 = batch["latents"]
    pred = model(**transformer_inputs(variant, batch, noisy_latents(x0, noise, sigmas), sigmas, dtype))[0]
    first, end = given_latent_frames(variant, batch), pred.shape[2]
    if mask_conditioned and "condition" in batch:
        first = max(first, 1)
        end -= 1 if variant.last_frame else 0
    return pred[:, :, first:end], velocity_target(x0, noise)[:, :, first:end]
