"""Shared fixtures: tiny random-init Wan pipelines built locally, and an offline, sandboxed hub.

The environment is set before anything imports huggingface_hub, so no test can reach the
network or write into the user's caches.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="wan-tune-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SANDBOX / "hf")
# WAN_TUNE_TEST_HOME (a developer's, never CI's) keeps the tiny models and their trained VAE between runs.
os.environ["WAN_TUNE_HOME"] = os.environ.get("WAN_TUNE_TEST_HOME") or str(_SANDBOX / "wan-tune-home")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """{'tiny': folder, 'tiny-i2v': folder}: complete diffusers-format pipeline folders."""
    from wan_tune.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {v: save_tiny_pipeline(root / v, v, seed=0) for v in ("tiny", "tiny-i2v")}


def transformer_inputs(variant_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed inputs for a tiny transformer forward: 1 clip, 3 latent frames of 8x12."""
    from wan_tune.models.variants import get_variant

    v = get_variant(variant_name)
    g = torch.Generator().manual_seed(seed)
    cfg = v.transformer
    inputs = {
        "hidden_states": torch.randn(1, cfg["in_channels"], 3, 8, 12, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 7, cfg["text_dim"], generator=g),
    }
    if v.is_i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, cfg["image_dim"], generator=g)
    if v.animate:  # the pose video's latents (a frame fewer: none beside the reference), the face video's pixels
        size = cfg["motion_encoder_size"]
        inputs["pose_hidden_states"] = torch.randn(1, 16, 2, 8, 12, generator=g)
        inputs["face_pixel_values"] = torch.rand(1, 3, 5, size, size, generator=g) * 2 - 1  # 5 frames -> 2 latent
    if v.expand_timesteps:  # Wan2.2 TI2V: a timestep per token, 0 on the first frame's (the image's)
        per_frame = 8 * 12 // (cfg["patch_size"][1] * cfg["patch_size"][2])
        inputs["timestep"] = torch.cat([torch.zeros(per_frame), torch.full((2 * per_frame,), 500.0)])[None]
    return inputs


@pytest.fixture
def recipe_file(tmp_path):
    """Write YAML text to a recipe file and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def tiny_shards(tiny_folders, tmp_path_factory) -> dict[str, Path]:
    """Prepped shards (fp32) of 4 generated clips for each tiny variant: 9-frame windows, 64x96."""
    from data_prep.prep import run_prep
    from wan_tune.config import load_recipe
    from wan_tune.media.synthetic import make_clips

    root = tmp_path_factory.mktemp("shards")
    clips = make_clips(root / "clips", 4, frames=20, height=96, width=128, fps=16)[0].parent
    out = {}
    for variant in ("tiny", "tiny-i2v"):
        recipe = load_recipe(
            Path(__file__).resolve().parents[1] / "recipes" / "demo-tiny.yaml",
            [f"model.variant={variant}", f"model.path={tiny_folders[variant]}", f"data.source={clips}",
             f"data.shards={root / variant}", "data.shard_dtype=fp32", "data.frames=[9]", "validation.every=0"],
        )
        run_prep(recipe, progress=False, say=lambda *_: None)
        out[variant] = root / variant
    return out
