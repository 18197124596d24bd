"""The tiny models' VAE is trained so that decode inverts encode (what lets the demo show learning)."""

from __future__ import annotations

import torch
from wan_tune.media.synthetic import moving_shape
from diffusers import AutoencoderKLWan

from wan_tune.models.tiny_vae import CONFIG, cache_path, tiny_vae


def test_tiny_vae_reconstructs_unseen_clips_frame_by_frame():
    vae = tiny_vae()  # trained once per session (per machine for users), then read from the cache
    assert cache_path().is_file()
    clip = torch.from_numpy(moving_shape(9, 64, 96, "ring", "green", seed=12345)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(clip).latent_dist.mode()
        back = vae.decode(z).sample
        torch.manual_seed(0)
        untrained = AutoencoderKLWan(**CONFIG).eval()
        noise = untrained.decode(untrained.encode(clip).latent_dist.mode()).sample
    assert z.shape == (1, 16, 3, 8, 12)  # Wan2.1's compression: 4x in time, 8x in space, 16 channels
    mse = (back - clip).pow(2).mean().item()
    print(f"reconstruction MSE {mse:.4f} (untrained: {(noise - clip).pow(2).mean().item():.4f})")
    assert mse < 0.06 and mse < 0.25 * (noise - clip).pow(2).mean().item()
    # Later frames decode from their own latent frame: the shape has moved, and so has its reconstruction.
    assert (back[:, :, 8] - clip[:, :, 8]).abs().mean() < (back[:, :, 8] - clip[:, :, 0]).abs().mean()
