"""Wan2.1 VACE (#25): prep stores the context diffusers' WanVACEPipeline builds, training feeds
the transformer what the pipeline feeds it (references only, control only, control + mask, all
three; and each input dropped equals the pipeline run without it), sidecars and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wan_tune.models.loading import resolve_source
from wan_tune.models.spec import transformer_inputs
from wan_tune.models.vace import vace_batch
from wan_tune.models.variants import get_variant

H, W, FRAMES = 64, 96, 9
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from wan_tune.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("vace") / "tiny-vace", "tiny-vace", seed=0)


@pytest.fixture(scope="module")
def inputs():
    """PIL frames of a control video, a binary mask and two references (one of another aspect)."""
    from wan_tune.media.synthetic import grey_control, moving_shape, right_half_mask

    video = moving_shape(FRAMES, H, W, "circle", "red", seed=3)
    control = [Image.fromarray(f) for f in grey_control(video)]
    mask = [Image.fromarray(f) for f in right_half_mask(FRAMES, H, W)]
    refs = [Image.fromarray(moving_shape(1, 48, 48, "square", "green", seed=4)[0]),
            Image.fromarray(moving_shape(1, H, W, "ring", "blue", seed=5)[0])]
    return control, mask, refs


def _pipeline_call(pipe, text, x_t, scale, **given):
    """What WanVACEPipeline hands its transformer at the first step, and the output there."""
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda _m, _a, kwargs, out: calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                                                  out[0].clone())), with_kwargs=True)
    try:
        pipe(prompt_embeds=text, guidance_scale=1.0, num_inference_steps=2, latents=x_t, num_frames=FRAMES, height=H,
             width=W, output_type="latent", conditioning_scale=scale, **given)
    finally:
        handle.remove()
    return calls[0]


CASES = {
    "references": dict(reference_images=True),
    "control": dict(video=True),
    "control+mask": dict(video=True, mask=True),
    "all": dict(video=True, mask=True, reference_images=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vace_inputs_are_what_the_pipeline_feeds_its_transformer(folder, inputs, case):
    from diffusers import WanVACEPipeline

    from data_prep.encode import Encoders

    variant = get_variant("tiny-vace")
    control, mask, refs = inputs
    given = {k: v for k, v in zip(("video", "mask", "reference_images"), inputs) if CASES[case].get(k)}
    encoders = Encoders(resolve_source(variant, path=str(folder)), i2v=False)
    stored = encoders.vace_condition(FRAMES, H, W, given.get("video"), given.get("mask"), given.get("reference_images", ()))
    r = len(given.get("reference_images", ()))
    assert stored["vace_context"].shape == (96, r + 3, 8, 12) and stored["vace_blank"].shape == (16, 3, 8, 12)

    pipe = WanVACEPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 16, r + 3, 8, 12, generator=g)  # the pipeline denoises the references' frames too
    text = torch.randn(1, 7, variant.transformer["text_dim"], generator=g)
    fed, out = _pipeline_call(pipe, text, x_t, 0.7, **given)

    clip_latents = torch.randn(1, 16, 3, 8, 12, generator=g)
    batch = vace_batch({"text": text, "latents": clip_latents, "vace_context": stored["vace_context"][None],
                        "vace_blank": stored["vace_blank"][None]}, scale=0.7)
    assert batch["latents"].shape == x_t.shape
    torch.testing.assert_close(batch["latents"][:, :, r:], clip_latents)  # references first, then the clip
    ours = transformer_inputs(variant, batch, x_t, fed["timestep"] / 1000, torch.float32)
    torch.testing.assert_close(ours["control_hidden_states"], fed["control_hidden_states"])
    torch.testing.assert_close(ours["control_hidden_states_scale"], fed["control_hidden_states_scale"])
    torch.testing.assert_close(ours["hidden_states"], fed["hidden_states"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**{**ours, "timestep": fed["timestep"]})[0], out)
    if r:  # the references' target frames are their own latents: the context's first 16 channels there
        torch.testing.assert_close(batch["latents"][:, :, :r], stored["vace_context"][None, :16, :r])


def test_dropped_inputs_are_the_pipeline_runs_without_them(folder, inputs):
    """`vace.drop_control` / `drop_reference`: the context equals the pipeline's without that input."""
    from diffusers import WanVACEPipeline

    from data_prep.encode import Encoders

    variant = get_variant("tiny-vace")
    control, mask, refs = inputs
    encoders = Encoders(resolve_source(variant, path=str(folder)), i2v=False)
    full = encoders.vace_condition(FRAMES, H, W, control, mask, refs)
    batch = {"text": torch.zeros(1, 7, 32), "latents": torch.zeros(1, 16, 3, 8, 12),
             "vace_context": full["vace_context"][None], "vace_blank": full["vace_blank"][None]}
    pipe = WanVACEPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))

    refs_only = _pipeline_call(pipe, text, torch.randn(1, 16, 5, 8, 12), 1.0, reference_images=refs)[0]
    no_control = vace_batch(batch, drop_control=True)
    torch.testing.assert_close(no_control["vace_context"], refs_only["control_hidden_states"])
    assert no_control["latents"].shape[2] == 5

    control_only = _pipeline_call(pipe, text, torch.randn(1, 16, 3, 8, 12), 1.0, video=control, mask=mask)[0]
    no_refs = vace_batch(batch, drop_reference=True)
    torch.testing.assert_close(no_refs["vace_context"], control_only["control_hidden_states"])
    assert no_refs["latents"].shape[2] == 3

    nothing = _pipeline_call(pipe, text, torch.randn(1, 16, 3, 8, 12), 1.0)[0]
    bare = vace_batch(batch, drop_reference=True, drop_control=True)
    torch.testing.assert_close(bare["vace_context"], nothing["control_hidden_states"])
    # The control really changes the context: dropping it is not a no-op.
    assert not torch.allclose(no_refs["vace_context"], bare["vace_context"])


def _bad_inputs(clips: Path) -> None:
    """Beside the good clips: a control too short, a grey mask, a sliver of a reference, an orphan."""
    from wan_tune.media.synthetic import grey_control, moving_shape, right_half_mask, write_video

    write_video(clips / "clip_001.control.mp4", grey_control(moving_shape(6, 96, 128, seed=1)), 16)
    write_video(clips / "clip_002.mask.mp4", right_half_mask(20, 96, 128) // 2, 16)  # mid grey: not a mask
    Image.new("RGB", (400, 20), "white").save(clips / "clip_003.ref.png")
    Image.new("RGB", (64, 64), "white").save(clips / "ghost.ref.png")


def test_vace_chain_preps_trains_the_vace_blocks_exports_and_samples(folder, tmp_path):
    import json

    from launching import PLAIN
    from safetensors.torch import load_file

    from data_prep.prep import run_prep
    from wan_tune.config import ConfigError, load_recipe
    from wan_tune.export.run import export
    from wan_tune.sampling import SampleArgs, SampleError, sample
    from wan_tune.media.synthetic import make_clips
    from wan_tune.training.loop import train

    clips = make_clips(tmp_path / "clips", 5, frames=20, height=96, width=128, fps=16, vace=True)[0].parent
    for sidecar in clips.glob("clip_004.*.*"):  # one clip with no VACE inputs: it trains on the grey context
        sidecar.unlink()
    _bad_inputs(clips)
    base = [f"model.path={folder}", f"data.source={clips}", f"data.shards={tmp_path / 'shards'}", "data.shard_dtype=fp32",
            f"run.output_dir={tmp_path / 'runs'}", "checkpoint.every=1000", "data.num_workers=0", "data.resolutions=[[64,96]]",
            "model.variant=tiny-vace", "data.max_clips_per_video=1", "train.batch_size=1"]
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        *base, "train.steps=4", *PLAIN, "validation.every=4", "validation.steps=2", "validation.frames=9",
        "adapter.targets=[vace_blocks]", "vace.drop_reference=0.5", "vace.drop_control=0.5", "export.format=comfyui"])
    summary = run_prep(recipe, progress=False, say=lambda *_: None)
    reasons = dict(summary["skips"])
    assert "control video clip_001.control.mp4 has 6 frames, the clip 20" in reasons["clip_001.mp4"]
    assert "mask clip_002.mask.mp4 is not black and white" in reasons["clip_002.mp4"]
    assert "reference image clip_003.ref.png is 400x20" in reasons["clip_003.mp4"]
    assert "without a clip named ghost" in reasons["ghost.ref.png"]
    assert summary["samples"] == 2  # clip_000 (all three inputs) and clip_004 (none)
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["task"] == "vace"

    result = train(recipe, progress=False, say=lambda *_: None)
    run = Path(result["run_dir"])
    trained = load_file(Path(result["checkpoint"]) / "trainable.safetensors")
    assert trained and all(k.startswith("vace_blocks.") for k in trained)  # adapter.targets=[vace_blocks] alone
    sheet = Image.open(run / "validation" / "step-000004" / "00.png")  # control, mask, references, base, step 4
    assert sheet.height > 4 * 64

    checks = export(result["checkpoint"], formats=["comfyui", "diffusers"], out=tmp_path / "export", merge=True,
                    say=lambda *_: None)
    # The two adapters, and the merged whole model in both layouts (diffusers folder, original single file).
    assert len(checks) == 4 and all(c.ok for c in checks), checks
    comfy = load_file(next((tmp_path / "export").glob("*-comfyui.safetensors")))
    assert "diffusion_model.vace_blocks.0.before_proj.lora_down.weight" in comfy  # ComfyUI's VACE key layout
    with pytest.raises(ConfigError, match="kohya cannot carry adapters outside the transformer blocks"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*base, "adapter.targets=[vace_blocks]", "export.format=kohya"])
    # export.format=all (the demo's): the formats that hold the adapter, kohya named and left out (#34);
    # the workflow, the card's snippet and sample line carry the run's vace.conditioning_scale.
    copy = Path(result["checkpoint"]).parent / "step-000004"
    (copy / "recipe.yaml").write_text((copy / "recipe.yaml").read_text().replace("format: comfyui", "format: all")
                                      .replace("conditioning_scale: 1.0", "conditioning_scale: 0.7"))
    said = []
    assert all(c.ok for c in export(copy, out=tmp_path / "all", say=said.append))
    assert any(s.startswith("left out the kohya format") for s in said), said
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "all").glob("*.safetensors")) == [
        "comfyui.safetensors", "diffusers.safetensors"]
    graph = json.loads(next((tmp_path / "all").glob("*-comfyui-workflow.json")).read_text())
    assert [n["inputs"]["strength"] for n in graph.values() if n["class_type"] == "WanVaceToVideo"] == [0.7]
    card = (tmp_path / "all" / "README.md").read_text()
    assert "conditioning_scale=0.7" in card and "--conditioning-scale 0.7" in card

    args = dict(base=str(folder), prompt="wtune a red circle", frames=9, steps=2, height=64, width=96,
                reference_image=[str(clips / "clip_000.ref.png")], control_video=str(clips / "clip_000.control.mp4"),
                mask_video=str(clips / "clip_000.mask.mp4"))
    renders = {}
    for name, lora in (("base", None), ("lora", str(next((tmp_path / "export").glob("*-comfyui.safetensors"))))):
        video, _ = sample(SampleArgs(**args, lora=lora, out=str(tmp_path / f"{name}.mp4")), say=lambda *_: None)
        renders[name] = np.asarray(Image.open(Path(video).with_suffix(".png")), dtype=np.float32)
    assert np.abs(renders["lora"] - renders["base"]).mean() > 0  # the VACE-block LoRA took effect
    with pytest.raises(SampleError, match="--mask-video masks a control video"):
        sample(SampleArgs(**{**args, "control_video": None}, out=str(tmp_path / "x.mp4")), say=lambda *_: None)
    with pytest.raises(SampleError, match="control video clip_001.control.mp4 has 6 frames"):
        sample(SampleArgs(**{**args, "control_video": str(clips / "clip_001.control.mp4")}, out=str(tmp_path / "x.mp4")),
               say=lambda *_: None)


def test_vace_inputs_given_to_a_plain_model_are_named_and_a_vace_folder_is_not_t2v(folder, tmp_path, tiny_folders):
    from data_prep.prep import run_prep
    from wan_tune.config import load_recipe
    from wan_tune.models.loading import ModelLoadError, load_transformer
    from wan_tune.media.synthetic import make_clips

    clips = make_clips(tmp_path / "clips", 1, frames=20, height=96, width=128, fps=16, vace=True)[0].parent
    said = []
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.source={clips}", f"data.shards={tmp_path / 'shards'}",
        "data.resolutions=[[64,96]]", "validation.every=0"])
    summary = run_prep(recipe, progress=False, say=said.append)
    assert any("1 clip(s) come with VACE inputs" in s and "is not a VACE model" in s for s in said)
    assert summary["samples"] >= 1 and not summary["skips"]  # the clip trains; its sidecars are no footage, no skip
    with pytest.raises(ModelLoadError, match="vace_layers: variant 'tiny' has None"):
        load_transformer(resolve_source("tiny", path=str(folder)))


def test_vace_loads_from_an_original_single_file_and_refuses_one_for_t2v(folder, tiny_folders, tmp_path):
    from safetensors.torch import save_file

    from wan_tune.models.keymap import state_dict_to_original
    from wan_tune.models.loading import ModelLoadError, load_transformer

    want = load_transformer(resolve_source("tiny-vace", path=str(folder))).state_dict()
    single = tmp_path / "wan2.1_vace_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state_dict_to_original(want).items()}, single)
    got = load_transformer(resolve_source("tiny-vace", path=str(folder), transformer_file=str(single))).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ModelLoadError, match="'vace_blocks': 2.*'vace_blocks': 0"):
        load_transformer(resolve_source("tiny", path=str(tiny_folders["tiny"]), transformer_file=str(single)))


def test_wan22_vace_fun_a14b_trains_both_experts_and_exports_one_file_and_a_workflow_each(tmp_path):
    """tiny-vace-a14b: VACE context on two experts routed by sigma; one ComfyUI file per expert and a
    workflow that puts each on its own model node."""
    import json

    from comfyui_nodes import check_graph
    from launching import PLAIN

    from data_prep.prep import run_prep
    from wan_tune.config import load_recipe
    from wan_tune.export.run import export
    from wan_tune.models.tiny import save_tiny_pipeline
    from wan_tune.media.synthetic import make_clips
    from wan_tune.training.loop import train

    folder = save_tiny_pipeline(tmp_path / "tiny-vace-a14b", "tiny-vace-a14b", seed=0)
    clips = make_clips(tmp_path / "clips", 2, frames=20, height=96, width=128, fps=16, vace=True)[0].parent
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        *PLAIN, "model.variant=tiny-vace-a14b", f"model.path={folder}", f"data.source={clips}",
        f"data.shards={tmp_path / 'shards'}", "data.shard_dtype=fp32", f"run.output_dir={tmp_path / 'runs'}",
        "data.resolutions=[[64,96]]", "train.steps=6", "checkpoint.every=6", "data.num_workers=0", "export.format=comfyui",
        "adapter.targets=[attention,vace_blocks]"])
    run_prep(recipe, progress=False, say=lambda *_: None)
    result = train(recipe, progress=False, say=lambda *_: None)
    experts = [json.loads(line).get("expert") for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert {"high_noise", "low_noise"} <= set(experts)  # each step routed to the expert of its sigma
    checks = export(result["checkpoint"], out=tmp_path / "export", say=lambda *_: None)
    assert len(checks) == 2 and all(c.ok for c in checks)
    names = sorted(Path(c.file).name for c in checks)
    assert [n.rsplit("-", 2)[-2] for n in names] == ["high_noise", "low_noise"]
    (workflow_file,) = (tmp_path / "export").glob("*-comfyui-workflow.json")
    graph = json.loads(workflow_file.read_text())
    assert check_graph(graph) == []
    loras = {n["inputs"]["lora_name"] for n in graph.values() if n["class_type"] == "LoraLoaderModelOnly"}
    assert loras == set(names) and any(n["class_type"] == "WanVaceToVideo" for n in graph.values())


def test_sidecars_match_in_any_case_and_a_shared_name_is_reported():
    """#33: `clip_000.REF.png` / `clip_001.Control.mp4` trained as footage; a still `clip_002.png`
    beside `clip_002.mp4` took the clip's sidecars unreported."""
    from wan_tune.media.vace_inputs import split_sidecars

    d = Path("/footage")
    names = ["clip_000.mp4", "clip_000.REF.png", "clip_001.MP4", "clip_001.Control.mp4", "Clip_001.mask.mp4",
             "clip_002.mp4", "clip_002.png", "clip_002.ref.png"]
    footage, inputs, orphans = split_sidecars([d / n for n in names])
    assert sorted(p.name for p in footage) == ["clip_000.mp4", "clip_001.MP4", "clip_002.mp4", "clip_002.png"]
    assert inputs[d / "clip_000.mp4"].references == (str(d / "clip_000.REF.png"),)
    assert (inputs[d / "clip_001.MP4"].control, inputs[d / "clip_001.MP4"].mask) == (
        str(d / "clip_001.Control.mp4"), str(d / "Clip_001.mask.mp4"))
    assert d / "clip_002.mp4" not in inputs and d / "clip_002.png" not in inputs
    (orphan, why), = orphans
    assert orphan.name == "clip_002.ref.png" and "clip_002.mp4 and clip_002.png share the name clip_002" in why
