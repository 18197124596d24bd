"""Wan2.2-Animate (#38, first part): the variants, the tiny model, and loading it from each layout
users hold; training it is refused in one line until prep and training land."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import transformer_inputs
from diffusers import WanAnimatePipeline, WanAnimateTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from wan_tune.models import get_variant
from wan_tune.models.keymap import state_dict_to_original
from wan_tune.models.loading import ModelLoadError, load_transformer, resolve_source
from wan_tune.models.tiny import save_tiny_pipeline
from wan_tune.models.variants import pipeline_class, transformer_class

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def animate_folder(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("animate") / "tiny-animate", "tiny-animate", seed=0)


def test_the_animate_variants_are_diffusers_animate_models():
    real, tiny = get_variant("wan2.2-animate-14b"), get_variant("tiny-animate")
    assert real.animate and tiny.animate and not get_variant("wan2.1-i2v-14b-480p").animate
    assert transformer_class(real) is WanAnimateTransformer3DModel and pipeline_class(tiny) is WanAnimatePipeline
    assert (real.kind, real.shard_task(), real.hub_id) == ("Animate", "animate", "Wan-AI/Wan2.2-Animate-14B-Diffusers")
    # diffusers' conversion script ("Wan2.2-Animate-14B"): the I2V 14B's blocks and these
    assert {k: real.transformer[k] for k in ("in_channels", "image_dim", "added_kv_proj_dim", "num_layers",
                                             "motion_encoder_size", "inject_face_latents_blocks")} == \
        {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120, "num_layers": 40,
         "motion_encoder_size": 512, "inject_face_latents_blocks": 5}
    assert (real.flow_shift, real.frames, real.fps) == (5.0, 77, 30)


@pytest.mark.parametrize("name", ["wan2.2-animate-14b", "tiny-animate"])
def test_original_keys_round_trip_through_diffusers_converter(name):
    """The original layout of Animate's own weights (renamed, its activation biases as [1, C, 1, 1],
    each face adapter's key and value fused) is what diffusers' single-file converter reads back."""
    variant = get_variant(name)
    with torch.device("meta") if not variant.tiny else torch.device("cpu"):
        model = transformer_class(variant)(**variant.transformer)
    ours = state_dict_to_original(model.state_dict())
    assert "face_adapter.fuser_blocks.0.linear1_kv.weight" in ours and "motion_encoder.enc.net_app.convs.8.weight" in ours
    assert ours["motion_encoder.enc.net_app.convs.0.1.bias"].shape[::2] == (1, 1)
    back = convert_wan_transformer_to_diffusers(dict(ours))
    assert sorted(back) == sorted(model.state_dict())
    if variant.tiny:
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_folder_and_single_file_load_the_saved_animate_model(animate_folder, tmp_path):
    from wan_tune.models.tiny import build_tiny_pipeline

    saved = build_tiny_pipeline("tiny-animate", seed=0).transformer
    from_folder = load_transformer(resolve_source("tiny-animate", path=str(animate_folder)))
    file = tmp_path / "animate_original.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict_to_original(saved.state_dict()).items()}, file)
    from_file = load_transformer(resolve_source("tiny-animate", path=str(animate_folder), transformer_file=str(file)))
    inputs = transformer_inputs("tiny-animate")
    with torch.no_grad():
        want = saved(**inputs, return_dict=False)[0]
        for model in (from_folder, from_file):
            assert isinstance(model, WanAnimateTransformer3DModel)
            assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
            assert torch.equal(model(**inputs, return_dict=False)[0], want)
    assert want.shape == (1, 16, 3, 8, 12)  # the reference frame's slot, then the clip's frames
    # an I2V folder named as the Animate variant is refused, naming what differs
    from wan_tune.models.tiny import save_tiny_pipeline as save

    i2v = save(tmp_path / "i2v", "tiny-i2v")
    with pytest.raises(ModelLoadError, match="motion_encoder_dim"):
        load_transformer(resolve_source("tiny-animate", path=str(i2v)))


def test_training_an_animate_variant_is_refused_in_one_line(capsys):
    from wan_tune.cli import main

    assert main(["check", str(ROOT / "recipes" / "demo-tiny.yaml"), "model.variant=tiny-animate"]) == 2
    err = capsys.readouterr().err
    assert "model.variant: tiny-animate: training Wan2.2-Animate is not built yet" in err
