"""The tiny models' Wan2.1-layout VAE, trained briefly so that decode inverts encode.

A random VAE decodes anything to noise, so the demo could show that every stage runs but not that
the LoRA learned the look of its clips. This one is the same `AutoencoderKLWan` (8x spatial, 4x
temporal, 16 latent channels, at small widths), trained for under a minute on crops of frames of the
synthetic footage the demo and the tests generate (`wan_tune.media.synthetic`) and on random colour
fields: its reconstructions show the gradient and the moving shape, blurred, and a latent that is
not of the demo's style decodes to something else.

Only still frames are trained (a frame costs a ninth of a 9-frame clip). Video works because the
temporal parts are set by hand first: every causal 3D convolution sees only the current frame
(its two earlier temporal taps held at zero), the encoder's temporal downsampling keeps the later
frame and the decoder's upsampling repeats a frame. So a video is encoded frame by frame, one
latent frame per 4 pixel frames, and decoded back as held frames.

The weights are trained once per machine (fixed seeds) and cached
beside the tiny pipelines; the latent normalisation (`latents_mean` / `latents_std`) is measured on
the training frames, so the transformer sees latents of about unit variance, as with the real VAE.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
# 600: at 300 the reconstructions were good enough on one machine and not on another (float order
# differs between CPUs, and a short training ends wherever it is): the demo's renders then stayed
# flat. 600 reconstruct footage at MSE 0.036 (300: 0.048) and the demo's sheets show the look.
STEPS = 600
BATCH = 8
LR = 4e-3
SEED = 0
CROP = (32, 48)  # random crops of the 64x96 frames: a convolutional VAE learns the same, at a quarter of the cost


def _key() -> str:
    text = json.dumps({"config": CONFIG, "steps": STEPS, "batch": BATCH, "lr": LR, "seed": SEED, "crop": CROP, "v": 3})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path() -> Path:
    root = Path(os.environ.get("WAN_TUNE_HOME", Path.home() / ".cache" / "wan-tune"))
    return root / "models" / f"tiny-vae-{_key()}.safetensors"


_TRAINED: dict[str, Path] = {}
"""Weights this process trained or read, by key: another WAN_TUNE_HOME (a test's) copies them."""


def tiny_vae():
    """The trained tiny VAE (from the cache, or trained now: about 50 s on 2 cores, once)."""
    import shutil

    from diffusers import AutoencoderKLWan
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = cache_path()
    damage = _damage(path) if path.is_file() else None
    if damage:
        print(f"the cached tiny VAE {path} is damaged ({damage}): training it again", file=sys.stderr)
        path.unlink()
    if not path.is_file():
        known = _TRAINED.get(_key())
        if known is not None and known.is_file() and not _damage(known):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(known, path)
        else:
            _train_and_save(path)
    _TRAINED[_key()] = path
    with safe_open(str(path), "pt") as f:
        stats = json.loads(f.metadata()["latents"])
    vae = AutoencoderKLWan(**CONFIG, latents_mean=stats["mean"], latents_std=stats["std"])
    vae.load_state_dict(load_file(str(path)))
    return vae.eval()


def _damage(path: Path) -> str | None:
    """Why a cached VAE file cannot be used (None when it can): it must read and match its checksum."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..data.shards import checksum

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        json.loads(meta["latents"])
        tensors = load_file(str(path))
    except Exception as err:
        return str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    want = meta.get("checksum")
    return None if want is None or checksum(tensors) == want else "its tensors do not match their checksum"


def _frames() -> torch.Tensor:
    """Training images in [-1, 1], [N, 3, H, W]: frames of the synthetic footage (every shape and
    colour, every other frame) and as many smooth random colour fields. Without the latter the
    VAE would decode any latent into the demo's style, and the base model's renders would look
    learned too."""
    import numpy as np

    from ..media.synthetic import COLORS, SHAPES, moving_shape

    # At the demo's bucket size (64x96): the shapes' size against the frame is what the VAE learns to keep.
    clips = [moving_shape(9, 64, 96, SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)], seed=100 + i) for i in range(24)]
    style = torch.from_numpy(np.concatenate([c[::2] for c in clips])).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(SEED + 1)
    coarse = torch.rand(len(style) // 2, 3, 4, 6, generator=g) * 2 - 1
    fields = torch.nn.functional.interpolate(coarse, size=style.shape[2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    return torch.cat([style, fields])


def _frame_by_frame(vae) -> list[torch.nn.Module]:
    """Set the temporal parts as the module docstring says; returns the convolutions whose earlier taps must stay 0."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = set()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, WanResample) and hasattr(m, "time_conv"):
                w = m.time_conv.weight  # [out, in, 3, 1, 1]; tap 2 is the current frame
                w.zero_()
                m.time_conv.bias.zero_()
                eye = torch.eye(w.shape[1])
                w[: w.shape[1], :, 2, 0, 0] = eye  # downsampling: keep the later frame
                if m.mode == "upsample3d":  # upsampling: both output frames are the input frame
                    w[w.shape[1]:, :, 2, 0, 0] = eye
                m.time_conv.requires_grad_(False)
                time_convs.add(m.time_conv)
        current_only = [m for m in vae.modules()
                        if isinstance(m, WanCausalConv3d) and m.weight.shape[2] == 3 and m not in time_convs]
        for m in current_only:
            m.weight[:, :, :2].zero_()
    return current_only


def _train_and_save(path: Path) -> None:
    from diffusers import AutoencoderKLWan

    from ..data.atomic import save_tensors
    from ..data.progress import progress_bar
    from ..data.shards import checksum

    with torch.random.fork_rng(devices=[]):  # the tiny pipeline's own random init must not depend on the cache
        torch.manual_seed(SEED)
        vae = AutoencoderKLWan(**CONFIG)
        current_only = _frame_by_frame(vae)
        frames = _frames()
        g = torch.Generator().manual_seed(SEED)
        opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=LR)
        for _ in progress_bar(range(STEPS), desc="training the tiny VAE (once per machine)", unit="step"):
            idx = torch.randint(0, len(frames), (BATCH,), generator=g)
            top = int(torch.randint(0, (frames.shape[2] - CROP[0]) // 8 + 1, (1,), generator=g)) * 8
            left = int(torch.randint(0, (frames.shape[3] - CROP[1]) // 8 + 1, (1,), generator=g)) * 8
            batch = frames[idx, :, top : top + CROP[0], left : left + CROP[1]].unsqueeze(2)  # [B, 3, 1, h, w]: still frames
            loss = (vae.decode(vae.encode(batch).latent_dist.mode()).sample - batch).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in current_only:
                    m.weight[:, :, :2].zero_()
        with torch.no_grad():
            z = torch.cat([vae.encode(frames[i : i + 16].unsqueeze(2)).latent_dist.mode() for i in range(0, len(frames), 16)])
        stats = {"mean": z.mean(dim=(0, 2, 3, 4)).tolist(), "std": z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3).tolist()}
    tensors = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_tensors(path, tensors, {"latents": json.dumps(stats), "loss": f"{loss.item():.5f}", "checksum": checksum(tensors)})
