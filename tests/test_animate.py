"""Wan2.2-Animate (#38, first part): the variants, the tiny model, loading it from each layout users
hold, its conditioning as the pipeline makes it, its sidecars, and prep; training is refused in one
line until the step lands."""

from __future__ import annotations

import json
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




def _frames(n: int, size: tuple[int, int], seed: int):
    """`n` random RGB frames (PIL) of `size` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_the_training_call_equals_the_pipelines_transformer_call(animate_folder, mode):
    """Conditioning encoded once through the pipeline's own methods, laid beside the noisy latents
    as a training step lays them: the transformer's inputs equal what WanAnimatePipeline hands it
    (captured by a forward hook) at the same latents and step, in animation and replacement."""
    from wan_tune.models.animate import clean_latents, encode_conditions, transformer_kwargs

    pipe = WanAnimatePipeline.from_pretrained(animate_folder)
    image, pose, face = _frames(1, (96, 64), 0)[0], _frames(9, (96, 64), 1), _frames(9, (40, 40), 2)
    extra = dict(background_video=_frames(9, (96, 64), 3), mask_video=_frames(9, (96, 64), 4)) if mode == "replace" else {}
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    pipe(image=image, pose_video=pose, face_video=face, prompt="a red ball", height=64, width=96, segment_frame_length=9,
         num_inference_steps=1, mode=mode, output_type="latent", generator=torch.Generator().manual_seed(0), **extra)
    hook.remove()
    (call,) = seen
    stored = encode_conditions(pipe, image, pose, face, 64, 96, mode, extra.get("background_video"), extra.get("mask_video"))
    batch = {k: v[None] for k, v in stored.items()}
    noisy = call["hidden_states"][:, :16]
    ours = transformer_kwargs(noisy, batch, pipe.transformer.dtype)
    assert ours.keys() <= call.keys()
    for key, value in ours.items():
        assert value.shape == call[key].shape and torch.equal(value, call[key]), key
    assert stored["face"].shape == (3, 9, 512, 512) and stored["pose"].shape == (16, 3, 8, 12)
    # the clean target: the reference's latent in the slot the pipeline drops, then the clip's frames
    clip = torch.randn(1, 16, 3, 8, 12)
    target = clean_latents(clip, batch["reference"])
    assert target.shape == (1, 16, 4, 8, 12) and torch.equal(target[:, :, 1:], clip)
    assert torch.equal(target[:, :, :1], batch["reference"][:, 4:])


def test_animate_sidecars_are_found_never_trained_as_footage_and_checked(tmp_path):
    """clip.pose.mp4 / clip.face.mp4 / clip.bg.mp4 beside a clip are its Animate inputs (a folder's
    sidecars or a manifest's columns), never clips; a missing, short, misshapen one is a report reason."""
    import numpy as np

    from wan_tune.media.animate_inputs import check_animate_inputs
    from wan_tune.media.footage import SkipClip, probe
    from wan_tune.media.vace_inputs import VaceInputs, from_record, split_sidecars
    from wan_tune.media.video_io import write_video

    def video(name, frames, h, w):
        return write_video(tmp_path / name, np.zeros((frames, h, w, 3), np.uint8) + 128, fps=16)

    clip = video("dance.mp4", 9, 64, 96)
    pose, face, bg, mask = video("dance.pose.mp4", 9, 32, 48), video("dance.face.mp4", 9, 64, 64), \
        video("dance.bg.mp4", 9, 64, 96), video("dance.mask.mp4", 9, 64, 96)
    footage, inputs, orphans = split_sidecars([clip, pose, face, bg, mask, tmp_path / "solo.face.mp4"])
    assert footage == [clip] and [o.name for o, _ in orphans] == ["solo.face.mp4"]
    given = inputs[clip]
    assert (given.pose, given.face, given.background, given.mask) == tuple(map(str, (pose, face, bg, mask)))
    assert VaceInputs.from_json(given.to_json()) == given
    assert from_record({"pose": "dance.pose.mp4", "face": "dance.face.mp4"}, tmp_path).pose == str(pose)
    info = probe(str(clip), False)
    check_animate_inputs(given, info, "replace")  # all present, one frame per clip frame, the clip's aspect
    with pytest.raises(SkipClip, match=r"needs a background and a mask video per clip.*clip.bg.mp4, clip.mask.mp4"):
        check_animate_inputs(VaceInputs(pose=str(pose), face=str(face)), info, "replace")
    with pytest.raises(SkipClip, match="needs a face video"):
        check_animate_inputs(VaceInputs(pose=str(pose)), info)
    short = video("short.pose.mp4", 5, 64, 96)
    with pytest.raises(SkipClip, match="has 5 frames, the clip 9"):
        check_animate_inputs(VaceInputs(pose=str(short), face=str(face)), info)
    wide_face = video("wide.face.mp4", 9, 64, 96)
    with pytest.raises(SkipClip, match="must be square"):
        check_animate_inputs(VaceInputs(pose=str(pose), face=str(wide_face)), info)
    tall_pose = video("tall.pose.mp4", 9, 96, 64)
    with pytest.raises(SkipClip, match="must have the clip's shape"):
        check_animate_inputs(VaceInputs(pose=str(tall_pose), face=str(face)), info)


def test_prep_and_a_training_step_feed_the_transformer_what_the_pipeline_does(animate_folder, tiny_folders, tmp_path):
    """`wan-tune prep` for tiny-animate: each clip's pose and face sidecars (and its first frame as the
    reference) stored as the pipeline's own methods make them, the face as 8-bit frames; a clip
    without a face video is a report row. A training step on those shards hands the transformer what
    WanAnimatePipeline hands it at the same noisy latents and timestep (both captured by hooks); a
    short run trains the LoRA and exports it."""
    import numpy as np
    import pandas as pd
    from PIL import Image
    from safetensors.torch import load_file

    from data_prep.buckets import resize_crop
    from data_prep.prep import run_prep
    from wan_tune.config import load_recipe
    from wan_tune.data.dataset import ShardDataset, collate
    from wan_tune.media.footage import Window, pictures, read_frames
    from wan_tune.media.synthetic import grey_control, make_clips
    from wan_tune.media.video_io import write_video
    from wan_tune.models.animate import encode_conditions, face_pixels
    from wan_tune.models.vace import training_batch
    from wan_tune.training import flow_matching as fm
    from wan_tune.training.loop import train

    clips = make_clips(tmp_path / "clips", 3, frames=20, height=96, width=128, fps=16)
    for i, clip in enumerate(clips):
        video = read_frames(str(clip), Window(0, tuple(range(20)), 0.0, 20 / 16), False)
        write_video(clip.with_suffix(".pose.mp4"), grey_control(video), 16)
        if i < 2:
            write_video(clip.with_suffix(".face.mp4"), np.ascontiguousarray(video[:, 16:80, 32:96]), 16)
    recipe_overrides = [
        "model.variant=tiny-animate", f"model.path={animate_folder}", f"data.source={clips[0].parent}",
        f"data.shards={tmp_path / 'shards'}", "data.shard_dtype=fp32", "data.frames=[9]", "data.resolutions=[[64,96]]",
        "data.max_clips_per_video=1", "data.holdout=0", f"run.output_dir={tmp_path / 'runs'}", "validation.every=0",
        "train.steps=3", "checkpoint.every=3", "data.num_workers=0", "train.batch_size=1", "animate.drop_face=0.5",
        "adapter.targets=[attention,ffn,face_adapters]"]
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", recipe_overrides)
    summary = run_prep(recipe, progress=False, say=lambda *_: None)
    assert summary["samples"] == 2
    assert "needs a face video per clip" in dict(summary["skips"])["clip_002.mp4"]
    index = pd.read_parquet(next((tmp_path / "shards" / "index").glob("*.parquet")))
    row = index[index.source == "clip_000.mp4"].iloc[0]
    stored = {k.split("/", 1)[1]: v for k, v in load_file(tmp_path / "shards" / row.file).items() if k.startswith(row.id)}
    assert stored["face"].dtype == torch.uint8 and stored["face"].shape == (3, 9, 512, 512)
    # the same window through WanAnimatePipeline's own methods
    window = Window(0, tuple(range(9)), 0.0, 9 / 16)
    cut = lambda path: pictures(resize_crop(read_frames(str(path), window, False), (64, 96)))  # noqa: E731
    pipe = WanAnimatePipeline.from_pretrained(animate_folder)
    face = [Image.fromarray(f) for f in read_frames(str(clips[0].with_suffix(".face.mp4")), window, False)]
    image, pose = cut(clips[0])[0], cut(clips[0].with_suffix(".pose.mp4"))
    want = encode_conditions(pipe, image, pose, face, 64, 96)
    for key, value in want.items():
        assert torch.allclose(stored[key].float(), value.float(), atol=1e-5), key
    assert torch.equal(face_pixels(stored["face"]), face_pixels(want["face"]))

    # a training step's call against the pipeline's, at the pipeline's first timestep and our noisy latents
    variant = get_variant("tiny-animate")
    dataset = ShardDataset(tmp_path / "shards")
    batch = training_batch(variant, recipe, collate([dataset[dataset.ids.index(row.id)]]))
    assert batch["latents"].shape == (1, 16, 4, 8, 12)  # the reference's slot, then the clip's 3 latent frames
    pipe.scheduler.set_timesteps(1)
    sigma = pipe.scheduler.timesteps[:1] / 1000
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    x_t = fm.noisy_latents(batch["latents"], noise, sigma)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    pipe(image=image, pose_video=pose, face_video=face, prompt=row.caption, height=64, width=96, segment_frame_length=9,
         num_inference_steps=1, latents=x_t.clone(), output_type="latent")
    fm.predict(pipe.transformer, variant, {**batch, "text": calls[0]["encoder_hidden_states"]}, sigma, noise, torch.float32)
    hook.remove()
    ours, theirs = calls[1], calls[0]
    for key in ("hidden_states", "pose_hidden_states", "face_pixel_values", "encoder_hidden_states_image"):
        assert torch.allclose(ours[key], theirs[key], atol=1e-4), key
    assert torch.allclose(ours["timestep"].float(), theirs["timestep"].float())  # the scheduler hands integers

    run = train(recipe, progress=False, say=lambda *_: None)
    losses = [r["loss"] for r in map(json.loads, (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # the GPU's regime (bf16 weights, bf16 autocast, CUDA's fp32 ops emulated): the motion encoder's
    # fp32 QR, the face encoder's 8-bit pixels made bf16, the face adapters under autocast
    from wan_tune.models.precision import cuda_autocast_emulated

    # and a validation render at step 3 (the first GPU run of a LoRA died at its first render: audits)
    regime = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*recipe_overrides, "model.dtype=bf16",
                                                                "train.mixed_precision=bf16", "run.name=regime",
                                                                "validation.every=3", "validation.steps=2"])
    with cuda_autocast_emulated():
        bf16 = train(regime, progress=False, say=lambda *_: None)
    from wan_tune.training.overview import LABEL_HEIGHT

    rendered = Path(bf16["run_dir"]) / "validation" / "step-000003"
    assert len(read_frames(str(rendered / "00.mp4"), Window(0, tuple(range(9)), 0.0, 9 / 16), False)) == 9
    # reference, pose, face above the base render and step 3's
    assert Image.open(rendered / "00.png").height == 5 * (LABEL_HEIGHT + 64)
    _validation_takes_a_clips_inputs(regime, tmp_path, cut)
    bf16_losses = [r["loss"] for r in map(json.loads, (Path(bf16["run_dir"]) / "metrics.jsonl")
                                          .read_text().splitlines()) if "loss" in r]
    assert len(bf16_losses) == 3 and all(torch.isfinite(torch.tensor(bf16_losses)))
    assert bf16_losses == pytest.approx(losses, rel=0.05)  # bf16 rounding, not another computation
    from wan_tune.export.run import export

    checks = export(run["checkpoint"], out=tmp_path / "export", say=lambda *_: None)
    assert checks and all(c.ok for c in checks), checks  # every format's file loads back into the Animate model
    assert {Path(c.file).name.rsplit("-", 1)[1] for c in checks} >= {"diffusers.safetensors", "comfyui.safetensors"}
    comfy = load_file(next((tmp_path / "export").glob("*-comfyui.safetensors")))  # the face adapters' too, fused k/v
    assert "diffusion_model.face_adapter.fuser_blocks.0.linear1_kv.lora_down.weight" in comfy
    _card_snippet_and_workflow_render(tmp_path / "export", clips[0])
    from wan_tune.sampling import SampleArgs, SampleError, sample

    with pytest.raises(SampleError, match="give --reference-image, --pose-video, --face-video"):
        sample(SampleArgs(base=str(animate_folder), prompt="a red ball", out=str(tmp_path / "render.mp4")), say=lambda *_: None)
    with pytest.raises(SampleError, match="--pose-video: for Wan2.2-Animate models"):
        sample(SampleArgs(base=str(tiny_folders["tiny"]), prompt="x", pose_video="p.mp4", out=str(tmp_path / "r.mp4")),
               say=lambda *_: None)
    # a performance longer than a segment: 17 frames as two segments of 9 (the second starts on the first's last frame)
    said, long = [], dict(base=str(animate_folder), prompt="a red ball", reference_image=[str(tmp_path / "export" / "reference.png")],
                          pose_video=str(clips[0].with_suffix(".pose.mp4")), face_video=str(clips[0].with_suffix(".face.mp4")),
                          lora=str(next((tmp_path / "export").glob("*-comfyui.safetensors"))), steps=2, guidance_scale=1.0,
                          height=64, width=96, out=str(tmp_path / "long.mp4"))
    with pytest.raises(SampleError, match="--segment-frames must be 4k\\+1"):
        sample(SampleArgs(**long, frames=17, segment_frames=8), say=said.append)
    video, _ = sample(SampleArgs(**long, frames=17, segment_frames=9), say=said.append)
    assert "sampling 17 frames in 2 segments of 9 at 96x64" in said[-1]
    from wan_tune.media.footage import probe

    assert probe(str(video), False).frames == 17
    from wan_tune.cli import main

    assert main(["check", str(ROOT / "recipes" / "demo-tiny.yaml"), "model.variant=tiny-animate",
                 "validation.references=['a.png;b.png']"]) == 2  # one character per prompt


def _card_snippet_and_workflow_render(out: Path, clip: Path):
    """The export's ComfyUI workflow feeds WanAnimateToVideo, and the card names what goes in ComfyUI's
    input/ folder; the card's diffusers code, run as written beside a reference, pose and face video,
    renders with the LoRA through WanAnimatePipeline."""
    import os
    import re
    import shutil

    from comfyui_nodes import check_graph

    graph = json.loads(next(out.glob("*-comfyui-workflow.json")).read_text())
    assert check_graph(graph) == [] and any(n["class_type"] == "WanAnimateToVideo" for n in graph.values())
    card = (out / "README.md").read_text()
    assert "`reference.png`, `pose.mp4`, `face.mp4` in `ComfyUI/input/`" in card
    assert "--reference-image reference.png --pose-video pose.mp4 --face-video face.mp4" in card
    for name, source in (("pose.mp4", clip.with_suffix(".pose.mp4")), ("face.mp4", clip.with_suffix(".face.mp4"))):
        shutil.copy(source, out / name)
    from PIL import Image

    Image.new("RGB", (96, 64), (200, 30, 30)).save(out / "reference.png")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "segment_frame_length=9" in code and "pose_video=pose, face_video=face" in code
    here = os.getcwd()
    os.chdir(out)
    try:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the card's own snippet is what is under test)
    finally:
        os.chdir(here)
    assert (out / "sample.mp4").stat().st_size > 0


def _validation_takes_a_clips_inputs(recipe, tmp_path, cut):
    """The validator's WanAnimatePipeline call: the first clip's pose and face at its window (as prep cut
    them), its first frame as the character, unless validation.references gives one (a mascot)."""
    import numpy as np
    from PIL import Image

    from wan_tune.config import load_recipe
    from wan_tune.data.shards import ShardReader
    from wan_tune.training.clip_inputs import window_pictures
    from wan_tune.training.validation import Validator

    row = ShardReader(recipe.data.shards).row(0)
    clip = Path(recipe.data.source) / row["source"]
    validator = Validator(recipe, torch.device("cpu"), torch.float32)
    call = validator._call_args(0, *validator.embeds[0])
    assert call["segment_frame_length"] == 9 and "num_frames" not in call
    assert np.array_equal(np.stack([np.asarray(f) for f in call["pose_video"]]),
                          np.stack([np.asarray(f) for f in cut(clip.with_suffix(".pose.mp4"))]))
    assert call["face_video"][0].size == (512, 512)  # the motion encoder's square, as the pipeline takes it
    assert np.array_equal(np.asarray(call["image"]), np.asarray(window_pictures(recipe, row)[0]))
    mascot = tmp_path / "mascot.png"
    Image.new("RGB", (40, 60), (200, 30, 30)).save(mascot)
    given = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [f"{k}={v}" for k, v in [
        ("model.variant", "tiny-animate"), ("model.path", recipe.model.path), ("data.source", recipe.data.source),
        ("data.shards", recipe.data.shards), ("validation.references", f"['{mascot}']"), ("validation.every", 1)]])
    image = Validator(given, torch.device("cpu"), torch.float32)._call_args(0, None, None)["image"]
    assert image.size == (40, 60) and image.getpixel((0, 0)) == (200, 30, 30)


def test_a_dropped_face_is_the_pipelines_unconditional_face():
    """animate.drop_face: the blanked face video is what WanAnimatePipeline's unconditional branch
    feeds (`face * 0 - 1`), from the stored 8-bit frames as from float ones; the latents gain the
    reference's slot either way."""
    from wan_tune.models.animate import animate_batch, face_pixels

    face = torch.randint(0, 256, (1, 3, 5, 8, 8), dtype=torch.uint8)
    batch = {"latents": torch.randn(1, 16, 2, 4, 6), "reference": torch.randn(1, 20, 1, 4, 6), "face": face}
    kept, dropped = animate_batch(batch), animate_batch(batch, drop_face=True)
    assert torch.equal(kept["face"], face) and kept["latents"].shape == (1, 16, 3, 4, 6)
    uncond = face_pixels(face) * 0 - 1
    assert torch.equal(face_pixels(dropped["face"]), uncond)
    assert torch.equal(face_pixels(animate_batch({**batch, "face": face_pixels(face)}, True)["face"]), uncond)


@pytest.mark.slow
def test_the_demo_runs_the_animate_chain(tmp_path, monkeypatch, capsys):
    """`wan-tune demo model.variant=tiny-animate`: clips with generated pose and face videos, prep,
    training with a validation render (the character, pose and face above the base and the step's
    render), export with its ComfyUI workflow, and a sample of the character (a clip's first frame)
    performing a clip's pose and face videos, shown above the render."""
    from wan_tune.cli import main
    from wan_tune.data.shards import ShardReader

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--clips", "2", "model.variant=tiny-animate", "train.steps=4", "checkpoint.every=4",
                 "validation.every=4"]) == 0
    out = capsys.readouterr().out
    assert "with pose and face videos" in out and "sampling 9 frames at 96x64" in out
    clips = tmp_path / "data" / "demo" / "clips"
    assert {p.name for p in clips.glob("clip_000.*")} >= {"clip_000.pose.mp4", "clip_000.face.mp4"}
    reader = ShardReader(tmp_path / "data" / "demo" / "shards")
    assert len(reader) == 4 and reader.tensors(0)["face"].shape[-2:] == (512, 512)
    exported = list((tmp_path / "checkpoints").rglob("export/*-diffusers.safetensors"))
    assert exported and "demo summary" in out
    import decord
    from PIL import Image

    from wan_tune.training.overview import LABEL_HEIGHT

    run = exported[0].parents[2]
    assert len(decord.VideoReader(str(run / "sample.mp4"))) == 9
    assert Image.open(run / "sample.png").height == 4 * (LABEL_HEIGHT + 64)  # reference, pose, face, then the sample
    assert Image.open(run / "validation" / "step-000004" / "00.png").height == 5 * (LABEL_HEIGHT + 64)
    assert list(exported[0].parent.glob("*-comfyui-workflow.json")) and "ComfyUI workflow" in out


def test_token_routing_and_context_parallelism_are_refused_for_animate(capsys):
    """The face adapters add their output to the tokens between blocks, per frame and in order:
    routing (which reorders tokens inside its span) and context parallelism (diffusers' Animate
    transformer has no _cp_plan) are refused in one line each."""
    from wan_tune.cli import main

    recipe = str(ROOT / "recipes" / "wan2.2-animate-14b-lora.yaml")
    assert main(["check", recipe, "train.route_ratio=0.5"]) == 2
    assert "train.route_ratio: wan2.2-animate-14b adds its face adapters' output" in capsys.readouterr().err
    assert main(["check", recipe, "train.context_parallel=2"]) == 2
    assert "diffusers 0.42 cannot split wan2.2-animate-14b (Animate) across processes" in capsys.readouterr().err


def test_face_adapters_are_checkpointed_with_the_blocks():
    """train.gradient_checkpointing checkpoints Wan2.2-Animate's face adapters too (diffusers checkpoints
    the blocks only): the same output and LoRA gradients as without their checkpoints, and less kept for
    the backward (the adapter's input only)."""
    from wan_tune.config import load_recipe
    from wan_tune.plan.meta_step import build_model

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-animate", "train.gradient_checkpointing=true"])
    variant = get_variant("tiny-animate")
    torch.manual_seed(0)
    model = build_model(recipe, variant, 2, torch.float32, device="cpu", face_every=None)
    assert all(a.forward is not a._unchecked_forward for a in model.face_adapter)
    inputs = transformer_inputs("tiny-animate")

    weights = {p.untyped_storage()._cdata for p in model.parameters()}

    def step():
        model.zero_grad()
        kept = {}

        def pack(t):  # what autograd keeps for the backward in the forward (activations, not weights)
            if t.untyped_storage()._cdata not in weights and torch._C._current_graph_task_id() == -1:
                kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs, return_dict=False)[0]
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(kept.values())

    checked = step()
    for adapter in model.face_adapter:
        adapter.forward = adapter._unchecked_forward
    plain = step()
    assert torch.equal(checked[0], plain[0])
    assert all(torch.allclose(checked[1][n], plain[1][n], atol=1e-6) for n in plain[1])
    assert checked[2] < plain[2]


def test_a_face_adapter_lora_is_one_fused_key_value_lora_in_comfyui(tmp_path):
    """adapter.targets=[face_adapters]: LoRAs on each face adapter's q, k, v, o. ComfyUI holds key and
    value as one layer (`linear1_kv`): the comfyui file gives it one pair whose update is the key's and
    the value's stacked (alpha/rank folded into up: outside the blocks), and q and o under their
    original names. Read back (the self-test), and loaded into diffusers by `wan-tune sample`'s path
    (split into its two layers), every update is the trained one, and `adapter.init_from` continues it
    at its own rank; kohya refuses it (outside the blocks)."""
    from safetensors.torch import save_file

    from wan_tune.config import load_recipe
    from wan_tune.export.adapters import (
        ExportError,
        adapter_from_trainable,
        comfyui_state_dict,
        kohya_state_dict,
        peft_from_original,
        read_original,
    )
    from wan_tune.export.selftest import check_adapter_file, check_original_file
    from wan_tune.plan.meta_step import build_model

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-animate", "adapter.targets=[face_adapters]",
                                                               "adapter.rank=4", "adapter.alpha=8"])
    variant = get_variant("tiny-animate")
    torch.manual_seed(0)
    model = build_model(recipe, variant, 2, torch.float32, device="cpu", face_every=None)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0] for n in trainable} == {f"face_adapter.{i}.{m}" for i in range(2)
                                                           for m in ("to_q", "to_k", "to_v", "to_out")}
    with torch.no_grad():
        for p in trainable.values():
            p.normal_()
    adapter = adapter_from_trainable({n: p.detach() for n, p in trainable.items()}, 4, 8.0, {})
    comfy = comfyui_state_dict(adapter)
    for i, block in enumerate(model.face_adapter):
        kv = f"diffusion_model.face_adapter.fuser_blocks.{i}.linear1_kv"
        down, up = comfy[f"{kv}.lora_down.weight"], comfy[f"{kv}.lora_up.weight"]
        assert f"{kv}.alpha" not in comfy and down.shape[0] == 8 and up.shape == (2 * variant.inner_dim, 8)
        want = torch.cat([block.to_k.get_delta_weight("default"), block.to_v.get_delta_weight("default")])
        assert torch.allclose(up @ down, want, atol=1e-5)
        q = f"diffusion_model.face_adapter.fuser_blocks.{i}.linear1_q"
        assert torch.allclose(comfy[f"{q}.lora_up.weight"] @ comfy[f"{q}.lora_down.weight"],
                              block.to_q.get_delta_weight("default"), atol=1e-5)
        assert f"diffusion_model.face_adapter.fuser_blocks.{i}.linear2.lora_up.weight" in comfy
    save_file(comfy, tmp_path / "comfy.safetensors")
    check = check_original_file(tmp_path / "comfy.safetensors", adapter, variant)
    assert check.ok and check.modules == 8, check
    save_file(peft_from_original(comfy), tmp_path / "split.safetensors")  # what `wan-tune sample` hands diffusers
    check = check_adapter_file(tmp_path / "split.safetensors", adapter, variant, fmt="diffusers")
    assert check.ok and check.modules == 8, check
    with pytest.raises(ExportError, match="outside the transformer blocks"):
        kohya_state_dict(adapter, True)
    # read back as the trained rank-4 pairs (the block-diagonal halves), so adapter.init_from continues it
    split = read_original(comfy)
    assert split["face_adapter.1.to_v"][0].shape[0] == 4
    assert torch.equal(split["face_adapter.1.to_v"][0], adapter.pairs["face_adapter.1.to_v"][0])
    from wan_tune.training.init_from import start_from

    torch.manual_seed(1)
    again = build_model(recipe, variant, 2, torch.float32, device="cpu", face_every=None)
    assert start_from(again, tmp_path / "comfy.safetensors", 4, 8.0) == 8
    for i, block in enumerate(again.face_adapter):
        for name in ("to_q", "to_k", "to_v", "to_out"):
            want = getattr(model.face_adapter[i], name).get_delta_weight("default")
            assert torch.allclose(getattr(block, name).get_delta_weight("default"), want, atol=1e-5), (i, name)
    from wan_tune.cli import main

    assert main(["check", str(ROOT / "recipes" / "demo-tiny.yaml"), "adapter.targets=[face_adapters]"]) == 2  # not Animate
