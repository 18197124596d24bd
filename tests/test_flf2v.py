"""Wan2.1 FLF2V (first and last frame to video, #25): prep stores what diffusers'
WanImageToVideoPipeline(image=..., last_image=...) feeds its transformer, and the chain runs on
the tiny FLF2V model: prep, training with validation renders, export with its self-test, sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from launching import PLAIN

from wan_tune.models.loading import resolve_source
from wan_tune.models.spec import transformer_inputs
from wan_tune.models.variants import get_variant

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from wan_tune.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("flf2v") / "tiny-flf2v", "tiny-flf2v", seed=0)


def test_flf2v_inputs_are_what_the_pipeline_feeds_its_transformer(folder, tmp_path):
    """Mask and condition latents of both frames, the CLIP tokens of both (stored as one [2 x N, D]
    row, handed over as the pipeline's [2, N, D]), the same transformer output."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from data_prep.encode import Encoders
    from wan_tune.media.synthetic import still_image

    variant = get_variant("tiny-flf2v")
    encoders = Encoders(resolve_source(variant, path=str(folder)), i2v=True)
    first = Image.open(still_image(tmp_path / "first.png", 64, 96, "green", seed=1)).convert("RGB")
    last = Image.open(still_image(tmp_path / "last.png", 64, 96, "red", seed=2)).convert("RGB")
    stored = encoders.image_condition(first, 9, last)
    assert stored["condition"].shape == (20, 3, 8, 12) and stored["image_embeds"].shape == (10, 32)
    mask = stored["condition"][:4]  # 4 channels: the 4 pixel frames of each latent frame (the first: all 4 are frame 0)
    assert mask[:, 0].eq(1).all() and mask[:, 1].eq(0).all()
    assert mask[3, 2].eq(1).all() and mask[:3, 2].eq(0).all()  # pixel frame 8, the last, is given
    without_last = encoders.image_condition(first, 9)
    assert without_last["condition"][:4, 2].eq(0).all()  # I2V would leave the last frame free

    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x_t, text = torch.randn(1, 16, 3, 8, 12, generator=g), torch.randn(1, 7, variant.transformer["text_dim"], generator=g)
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, out: calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                                                  out[0].clone())), with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(image=first, last_image=last, prompt_embeds=text, guidance_scale=1.0, num_inference_steps=2, latents=x_t,
         num_frames=9, height=64, width=96, output_type="latent")
    handle.remove()
    fed, out = calls[0]
    batch = {"text": text, "condition": stored["condition"][None], "image_embeds": stored["image_embeds"][None]}
    ours = transformer_inputs(variant, batch, x_t, fed["timestep"] / 1000, torch.float32)
    torch.testing.assert_close(ours["hidden_states"], fed["hidden_states"])
    torch.testing.assert_close(ours["encoder_hidden_states_image"], fed["encoder_hidden_states_image"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**{**ours, "timestep": fed["timestep"]})[0], out)


def test_flf2v_chain_preps_trains_exports_and_samples(folder, tmp_path):
    from data_prep.prep import run_prep
    from safetensors.torch import load_file

    from wan_tune.config import ConfigError, load_recipe
    from wan_tune.export.run import export
    from wan_tune.sampling import SampleArgs, SampleError, sample
    from wan_tune.media.synthetic import make_clips
    from wan_tune.training.errors import TrainingError
    from wan_tune.training.loop import train

    clips = make_clips(tmp_path / "clips", 2, frames=20, height=96, width=128, fps=16)[0].parent
    base = [f"model.path={folder}", f"data.source={clips}", f"data.shards={tmp_path / 'shards'}",
            "data.shard_dtype=fp32", f"run.output_dir={tmp_path / 'runs'}", "checkpoint.every=1000", "data.num_workers=0"]
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-flf2v", *base, "train.steps=4",
                                                              *PLAIN, "validation.every=4", "validation.steps=2"])
    run_prep(recipe, progress=False, say=lambda *_: None)
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["task"] == "flf2v"
    summary = train(recipe, progress=False, say=lambda *_: None)
    run = Path(summary["run_dir"])
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert (run / "validation" / "step-000004" / "00.mp4").is_file()  # rendered from a clip's first and last frames
    assert any("pos_embed" in k or "add_k_proj" in k for k in load_file(Path(summary["checkpoint"]) / "trainable.safetensors"))

    checks = export(summary["checkpoint"], formats=["comfyui", "diffusers", "kohya"], out=tmp_path / "export", say=lambda *_: None)
    assert len(checks) == 3 and all(c.ok for c in checks), checks  # kohya too: diffusers loads it in the self-test
    lora = str(next((tmp_path / "export").glob("*-comfyui.safetensors")))
    args = dict(base=str(folder), lora=lora, prompt="wtune a red circle", frames=9, steps=2, height=64, width=96)
    first, last = run / "validation" / "first.png", run / "validation" / "last.png"
    from PIL import Image

    Image.new("RGB", (96, 64), "green").save(first)
    Image.new("RGB", (96, 64), "red").save(last)
    video, _ = sample(SampleArgs(**args, image=str(first), last_image=str(last), out=str(tmp_path / "s.mp4")), say=lambda *_: None)
    assert Path(video).is_file()
    with pytest.raises(SampleError, match="give the last frame with --last-image"):
        sample(SampleArgs(**args, image=str(first), out=str(tmp_path / "x.mp4")), say=lambda *_: None)

    # First-frame (I2V) shards do not train an FLF2V model, and the other way round.
    with pytest.raises(TrainingError, match="holds flf2v data; tiny-i2v trains on i2v data"):
        from wan_tune.models.tiny import save_tiny_pipeline

        i2v = save_tiny_pipeline(tmp_path / "tiny-i2v", "tiny-i2v", seed=0)
        train(load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-i2v", *base, f"model.path={i2v}",
                                                                 "train.steps=1", *PLAIN]), progress=False, say=lambda *_: None)
    with pytest.raises(ConfigError, match="validation.last_images"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-flf2v", "validation.images=[a.png]"])


def test_flf2v_loads_from_an_original_single_file(folder, tmp_path):
    """The position embedding of the two images' tokens has an original (Wan/ComfyUI) name too."""
    from safetensors.torch import save_file

    from wan_tune.models.keymap import state_dict_to_original, to_diffusers
    from wan_tune.models.loading import load_transformer

    assert to_diffusers("img_emb.emb_pos") == "condition_embedder.image_embedder.pos_embed"
    want = load_transformer(resolve_source("tiny-flf2v", path=str(folder))).state_dict()
    single = tmp_path / "wan2.1_flf2v_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state_dict_to_original(want).items()}, single)
    got = load_transformer(resolve_source("tiny-flf2v", path=str(folder), transformer_file=str(single))).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert want["condition_embedder.image_embedder.pos_embed"].shape == (1, 10, 32)
