"""Wan 2.2 on tiny random-init models: TI2V-5B-shaped (48-channel Wan2.2 VAE, one timestep per
token) and A14B-shaped (two experts split at the boundary). What wan-tune feeds the transformer
at training time is compared with what the diffusers pipeline itself feeds it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from launching import PLAIN

from wan_tune.models.keymap import state_dict_to_original
from wan_tune.models.loading import ModelLoadError, load_transformer, resolve_source
from wan_tune.models.spec import transformer_inputs
from wan_tune.models.variants import get_variant

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from wan_tune.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny22")
    return {v: save_tiny_pipeline(root / v, v, seed=0) for v in ("tiny-ti2v", "tiny-a14b", "tiny-a14b-i2v")}


def record_calls(pipe, expert: str, calls: list):
    """Keep (expert, kwargs, output) of every forward of one of the pipeline's transformers."""
    module = getattr(pipe, expert)

    def hook(_module, _args, kwargs, output):
        calls.append((expert, {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    return module.register_forward_hook(hook, with_kwargs=True)


def run_pipeline(pipe, latents: torch.Tensor, text: torch.Tensor, steps: int):
    pipe.set_progress_bar_config(disable=True)
    f, h, w = latents.shape[2:]
    return pipe(prompt_embeds=text, guidance_scale=1.0, num_inference_steps=steps, latents=latents,
                num_frames=(f - 1) * 4 + 1, height=h * pipe.vae_scale_factor_spatial, width=w * pipe.vae_scale_factor_spatial,
                output_type="latent")


def test_ti2v_training_inputs_are_what_the_pipeline_feeds(folders):
    from diffusers import WanPipeline

    variant = get_variant("tiny-ti2v")
    pipe = WanPipeline.from_pretrained(folders["tiny-ti2v"])
    assert pipe.config.expand_timesteps and pipe.vae.config.z_dim == 48 and pipe.vae_scale_factor_spatial == 16
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 48, 3, 4, 6, generator=g)
    text = torch.randn(1, 7, variant.transformer["text_dim"], generator=g)
    calls = []
    handle = record_calls(pipe, "transformer", calls)
    run_pipeline(pipe, x_t, text, steps=2)
    handle.remove()
    _, fed, out = calls[0]
    # The step's noise level as the pipeline states it (UniPC rounds timesteps to integers, so
    # its sigma table is 1e-3 off the timestep it feeds).
    sigma = fed["timestep"][0, 0] / 1000
    ours = transformer_inputs(variant, {"text": text}, x_t, sigma.view(1), torch.float32)
    assert ours["timestep"].shape == fed["timestep"].shape == (1, 3 * 2 * 3)  # one per token
    torch.testing.assert_close(ours["timestep"], fed["timestep"])
    torch.testing.assert_close(ours["hidden_states"], fed["hidden_states"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**ours)[0], out)


def test_a14b_sigmas_go_to_the_expert_the_pipeline_uses(folders, tmp_path):
    from diffusers import WanPipeline

    # A copy whose pipeline config moves the boundary: the folder's value is the one that counts.
    folder = tmp_path / "a14b"
    shutil.copytree(folders["tiny-a14b"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["boundary_ratio"] = 0.95
    (folder / "model_index.json").write_text(json.dumps(index))
    variant = get_variant("tiny-a14b")
    source = resolve_source(variant, path=str(folder))
    assert variant.boundary_ratio == 0.875 and source.boundary_ratio == 0.95

    pipe = WanPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x_t, text = torch.randn(1, 16, 3, 8, 12, generator=g), torch.randn(1, 7, variant.transformer["text_dim"], generator=g)
    calls = []
    handles = [record_calls(pipe, e, calls) for e in variant.experts]
    run_pipeline(pipe, x_t, text, steps=12)
    for h in handles:
        h.remove()
    used = [(expert, float(kw["timestep"][0]) / 1000) for expert, kw, _ in calls]
    assert {e for e, _ in used} == {"transformer", "transformer_2"}  # the schedule crosses the boundary
    for expert, sigma in used:
        assert variant.expert_for(sigma, source.boundary_ratio) == expert, (expert, sigma)
    # Each expert loads on its own, from the folder; its output is what the pipeline got.
    expert, kw, out = calls[-1]
    model = load_transformer(source, expert=expert)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw)[0], out)


def test_a14b_experts_load_from_one_original_file_each(folders, tmp_path):
    from safetensors.torch import save_file

    folder = folders["tiny-a14b"]
    files = {}
    for expert in ("transformer", "transformer_2"):
        sd = load_transformer(resolve_source("tiny-a14b", path=str(folder)), expert=expert).state_dict()
        files[expert] = tmp_path / f"{expert}.safetensors"  # ComfyUI holds each expert as one original-key file
        save_file({k: v.contiguous() for k, v in state_dict_to_original(sd).items()}, files[expert])
    source = resolve_source("tiny-a14b", path=str(folder), transformer_file=str(files["transformer"]),
                            transformer_2_file=str(files["transformer_2"]))
    for expert in ("transformer", "transformer_2"):
        want = load_transformer(resolve_source("tiny-a14b", path=str(folder)), expert=expert).state_dict()
        got = load_transformer(source, expert=expert).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    high = load_transformer(source, expert="transformer").state_dict()
    assert not torch.equal(high["blocks.0.attn1.to_q.weight"], want["blocks.0.attn1.to_q.weight"])  # two different experts

    # A one-transformer variant pointed at a two-expert folder (their configs are identical) is refused.
    with pytest.raises(ModelLoadError, match="two experts"):
        load_transformer(resolve_source("tiny", path=str(folder)))
    with pytest.raises(ModelLoadError, match="transformer_2_file: tiny has one transformer"):
        resolve_source("tiny", path=str(folder), transformer_2_file=str(files["transformer_2"]))


def test_ti2v_preps_48_channel_latents_and_trains(folders, tmp_path):
    from data_prep.prep import run_prep
    from wan_tune.media.synthetic import make_clips
    from safetensors.torch import load_file

    from wan_tune.config import ConfigError, load_recipe
    from wan_tune.training.loop import train

    clips = make_clips(tmp_path / "clips", 2, frames=20, height=96, width=128, fps=24)[0].parent
    base = [*PLAIN, f"model.path={folders['tiny-ti2v']}", f"data.source={clips}", f"data.shards={tmp_path / 'shards'}",
            "data.shard_dtype=fp32", f"run.output_dir={tmp_path / 'runs'}", "train.steps=20", "checkpoint.every=1000"]
    with pytest.raises(ConfigError, match="multiples of 32"):  # 16x VAE, 2x2 patches
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-ti2v", "data.resolutions=[[48,64]]", *base])
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-ti2v", *base])
    run_prep(recipe, progress=False, say=lambda *_: None)
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["variant"] == "tiny-ti2v" and meta["vae"]["z_dim"] == 48 and len(meta["vae"]["latents_mean"]) == 48
    first = load_file(next((tmp_path / "shards" / "data").glob("*.safetensors")))
    latents = [t for k, t in first.items() if k.endswith("latents")]
    assert latents and all(t.shape[:2] == (48, 3) for t in latents)  # 9 frames -> 3, 64x96 -> 4x6
    summary = train(recipe, progress=False, say=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])



def test_routing_follows_the_schedule_and_keeps_each_expert_on_its_side():
    from wan_tune.config import load_recipe
    from wan_tune.training.experts import make_trainee, route, sigma_bounds, sigma_sampler

    variant = get_variant("tiny-a14b")
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-a14b"])  # shift 3
    draw = sigma_sampler(recipe, recipe.timesteps.shift)
    trainees = [make_trainee(variant, e, 0.875, None, None, None) for e in variant.experts]
    picks = [route(trainees, variant, 0.875, 0, step, lambda g: draw(1, g, 0.0, 1.0)) for step in range(2000)]
    # shift 3 puts sigma >= 0.875 where u >= 0.875 / (3 - 2 * 0.875) = 0.7: 30% of steps train high noise.
    share = sum(p.label == "high_noise" for p in picks) / len(picks)
    assert 0.26 < share < 0.34
    assert picks == [route(trainees, variant, 0.875, 0, step, lambda g: draw(1, g, 0.0, 1.0)) for step in range(2000)]
    for tr in trainees:
        lo, hi = sigma_bounds(tr, 0.0, 1.0)
        sigmas = draw(500, torch.Generator().manual_seed(1), lo, hi)
        assert (sigmas >= 0.875).all() if tr.label == "high_noise" else (sigmas < 0.875).all()
    with pytest.raises(ValueError, match="high_noise expert denoises sigmas in"):
        sigma_bounds(trainees[0], 0.0, 0.5)


@pytest.fixture(scope="module")
def a14b_shards(folders, tmp_path_factory):
    from data_prep.prep import run_prep
    from wan_tune.media.synthetic import make_clips

    from wan_tune.config import load_recipe

    root = tmp_path_factory.mktemp("a14b")
    clips = make_clips(root / "clips", 2, frames=20, height=96, width=128, fps=16)[0].parent
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "model.variant=tiny-a14b", f"model.path={folders['tiny-a14b']}", f"data.source={clips}",
        f"data.shards={root / 'shards'}", "data.shard_dtype=fp32"])
    run_prep(recipe, progress=False, say=lambda *_: None)
    return root / "shards"


def a14b_run(folders, shards, out: Path, *extra: str):
    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "model.variant=tiny-a14b", f"model.path={folders['tiny-a14b']}", f"data.shards={shards}",
        f"run.output_dir={out}", "checkpoint.every=4", "data.num_workers=0", *PLAIN, *extra])
    return train(recipe, progress=False, say=lambda *_: None)


def frames_of(video: Path) -> torch.Tensor:
    import decord

    reader = decord.VideoReader(str(video))
    return torch.from_numpy(reader.get_batch(range(len(reader))).asnumpy()).float()


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a14b_trains_both_experts_resumes_exactly_and_exports_one_file_each(folders, a14b_shards, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from wan_tune.export.run import export
    from wan_tune.sampling import SampleArgs, SampleError, sample

    straight = a14b_run(folders, a14b_shards, tmp_path / "straight", "train.steps=10", "validation.every=5",
                        "validation.prompts=[wtune a red circle]", "validation.frames=9", "validation.steps=4",
                        "validation.height=48", "validation.width=64")
    rows = records(straight["run_dir"])
    videos = sorted(p.relative_to(straight["run_dir"]).as_posix() for p in Path(straight["run_dir"]).glob("validation/step-*/*.mp4"))
    assert videos == ["validation/step-000005/00.mp4", "validation/step-000010/00.mp4"]  # both experts render
    assert {r["expert"] for r in rows} == {"high_noise", "low_noise"}
    assert all(r[f"loss/{r['expert']}"] == r["loss"] for r in rows)  # each expert's loss under its own name
    # One expert's frozen weights on the device at a time (the other's wait in host memory;
    # on a CPU as placeholders): the last forward was the validation's low-noise steps.
    held = {label: [p.numel() > 0 for p in m.parameters() if not p.requires_grad] for label, m in straight["models"].items()}
    assert all(held["low_noise"]) and not any(held["high_noise"])
    final = Path(straight["checkpoint"])
    assert {p.name for p in final.iterdir()} >= {"trainable.safetensors", "trainable.transformer_2.safetensors",
                                                  "optimizer.transformer_2.safetensors", "state.json"}
    high, low = (load_file(final / f) for f in ("trainable.safetensors", "trainable.transformer_2.safetensors"))
    assert not all(torch.equal(high[k], low[k]) for k in high)  # two adapters, each trained on its own steps

    # Stopped at step 4 and resumed: the same routing, losses and both experts' weights, bit for bit.
    a14b_run(folders, a14b_shards, tmp_path / "resumed", "train.steps=4")
    resumed = a14b_run(folders, a14b_shards, tmp_path / "resumed", "train.steps=10")
    assert [(r["expert"], r["loss"]) for r in records(resumed["run_dir"])] == [(r["expert"], r["loss"]) for r in rows]
    for f in ("trainable.safetensors", "trainable.transformer_2.safetensors"):
        a, b = load_file(final / f), load_file(Path(resumed["checkpoint"]) / f)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # One file per expert and format, named and labelled so they cannot be swapped; diffusers
    # loads the low-noise one into transformer_2 in the self-test.
    checks = export(final, formats=["comfyui", "kohya"], out=tmp_path / "export", say=lambda *_: None)
    assert len(checks) == 4 and all(c.ok for c in checks)
    files = sorted(p.name for p in (tmp_path / "export").glob("*.safetensors"))
    assert files == [f"demo-tiny-step000010-{e}-{fmt}.safetensors" for e in ("high_noise", "low_noise") for fmt in ("comfyui", "kohya")]
    for e in ("high_noise", "low_noise"):
        with safe_open(str(tmp_path / "export" / f"demo-tiny-step000010-{e}-comfyui.safetensors"), "pt") as fh:
            assert fh.metadata()["wan_tune.expert"] == e
    pair = [str(tmp_path / "export" / f"demo-tiny-step000010-{e}-comfyui.safetensors") for e in ("high_noise", "low_noise")]
    # Sampling takes the pair; each file goes to its expert. The strength is raised so that 10
    # tiny steps show in uint8 pixels; the low-noise file alone changes them too (so it did
    # reach transformer_2, which denoises the last steps).
    args = dict(base=str(folders["tiny-a14b"]), prompt="wtune a red circle", frames=9, steps=4, height=48, width=64,
                lora_scale=50.0)
    pixels = {}
    for name, loras in (("base", None), ("pair", pair), ("low", pair[1:])):
        video, _ = sample(SampleArgs(**args, lora=loras, out=str(tmp_path / f"{name}.mp4")), say=lambda *_: None)
        pixels[name] = frames_of(video)
    assert (pixels["pair"] - pixels["base"]).abs().mean() > 0.5
    assert (pixels["low"] - pixels["base"]).abs().mean() > 0.5
    # The low-noise expert's own guidance scale reaches the pipeline.
    video, _ = sample(SampleArgs(**args, guidance_scale_2=1.0, out=str(tmp_path / "g2.mp4")), say=lambda *_: None)
    assert (frames_of(video) - pixels["base"]).abs().mean() > 0.5
    with pytest.raises(SampleError, match="two files for the same expert"):
        sample(SampleArgs(**args, lora=[pair[0], pair[0]], out=str(tmp_path / "x.mp4")), say=lambda *_: None)


@pytest.mark.slow
def test_a14b_trains_on_two_processes_per_clip_like_one_process(folders, a14b_shards, tmp_path):
    """Context parallelism with two experts: the group routes each step to the same expert (its
    draw is seeded by the step), and both experts' weights end as one process's."""
    from launching import launch
    from safetensors.torch import load_file

    ref = a14b_run(folders, a14b_shards, tmp_path / "one", "train.steps=4")
    proc = launch("multi_cpu.yaml", folders, {"tiny-a14b": a14b_shards}, tmp_path / "cp", "train.context_parallel=2",
                  "checkpoint.every=4", variant="tiny-a14b")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es) (1 data-parallel x 2 context-parallel, ulysses)" in proc.stdout
    got, want = records(tmp_path / "cp" / "demo-tiny"), records(ref["run_dir"])
    assert [r["expert"] for r in got] == [r["expert"] for r in want] and len({r["expert"] for r in got}) == 2
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
    for f in ("trainable.safetensors", "trainable.transformer_2.safetensors"):
        a, b = load_file(tmp_path / "cp" / "demo-tiny" / "step-000004" / f), load_file(Path(ref["checkpoint"]) / f)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a), f


def test_a14b_trains_one_expert_without_loading_the_other(folders, a14b_shards, tmp_path):
    summary = a14b_run(folders, a14b_shards, tmp_path, "train.steps=4", "model.experts=[low_noise]")
    assert list(summary["models"]) == ["low_noise"]
    assert {r["expert"] for r in records(summary["run_dir"])} == {"low_noise"}
    assert sorted(p.name for p in Path(summary["checkpoint"]).glob("trainable*")) == ["trainable.transformer_2.safetensors"]


def test_a14b_i2v_prep_conditioning_is_what_the_pipeline_feeds_and_trains(folders, tmp_path):
    """Wan2.2 I2V: noisy latents ++ mask ++ first-frame latents, and no CLIP tokens at all."""
    from data_prep.encode import Encoders
    from data_prep.prep import run_prep
    from wan_tune.media.synthetic import make_clips, still_image
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    variant = get_variant("tiny-a14b-i2v")
    source = resolve_source(variant, path=str(folders["tiny-a14b-i2v"]))
    encoders = Encoders(source, i2v=True)
    first = Image.open(still_image(tmp_path / "first.png", 64, 96)).convert("RGB")
    stored = encoders.image_condition(first, 9)
    assert set(stored) == {"condition"} and stored["condition"].shape == (20, 3, 8, 12)

    pipe = WanImageToVideoPipeline.from_pretrained(folders["tiny-a14b-i2v"])
    assert pipe.image_encoder is None and pipe.config.boundary_ratio == 0.9
    g = torch.Generator().manual_seed(0)
    x_t, text = torch.randn(1, 16, 3, 8, 12, generator=g), torch.randn(1, 7, variant.transformer["text_dim"], generator=g)
    calls = []
    handles = [record_calls(pipe, e, calls) for e in variant.experts]
    pipe.set_progress_bar_config(disable=True)
    pipe(image=first, prompt_embeds=text, guidance_scale=1.0, num_inference_steps=2, latents=x_t, num_frames=9,
         height=64, width=96, output_type="latent")
    for h in handles:
        h.remove()
    expert, fed, out = calls[0]
    sigma = fed["timestep"] / 1000
    ours = transformer_inputs(variant, {"text": text, "condition": stored["condition"][None]}, x_t, sigma, torch.float32)
    assert fed["encoder_hidden_states_image"] is None and ours["encoder_hidden_states_image"] is None
    torch.testing.assert_close(ours["hidden_states"], fed["hidden_states"])
    # The pipeline passes UniPC's integer timestep; training passes sigma * 1000 as a float.
    torch.testing.assert_close(ours["timestep"], fed["timestep"], check_dtype=False)
    with torch.no_grad():
        torch.testing.assert_close(getattr(pipe, expert)(**ours)[0], out)

    clips = make_clips(tmp_path / "clips", 2, frames=20, height=96, width=128, fps=16)[0].parent
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "model.variant=tiny-a14b-i2v", f"model.path={folders['tiny-a14b-i2v']}", f"data.source={clips}",
        f"data.shards={tmp_path / 'shards'}", "data.shard_dtype=fp32", f"run.output_dir={tmp_path / 'runs'}",
        "train.steps=6", "checkpoint.every=1000", "data.num_workers=0", *PLAIN])
    run_prep(recipe, progress=False, say=lambda *_: None)
    summary = train(recipe, progress=False, say=lambda *_: None)
    assert sorted(summary["models"]) == ["high_noise", "low_noise"]
    assert all(math.isfinite(r["loss"]) for r in records(summary["run_dir"]))


def test_ti2v_image_conditioning_is_what_the_pipeline_feeds_and_trains(folders, tmp_path):
    """TI2V-5B with a first frame: the image's latent replaces the first latent frame, its tokens
    get timestep 0, and the loss leaves that frame out (it is given, not denoised)."""
    from data_prep.encode import Encoders
    from data_prep.prep import run_prep
    from wan_tune.media.synthetic import make_clips, still_image
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from wan_tune.config import load_recipe
    from wan_tune.training import flow_matching as fm
    from wan_tune.training.loop import train

    variant = get_variant("tiny-ti2v")
    encoders = Encoders(resolve_source(variant, path=str(folders["tiny-ti2v"])), i2v=True)
    first = Image.open(still_image(tmp_path / "first.png", 64, 96)).convert("RGB")
    stored = encoders.image_condition(first, 9)
    assert set(stored) == {"condition"} and stored["condition"].shape == (48, 1, 4, 6)

    pipe = WanImageToVideoPipeline.from_pretrained(folders["tiny-ti2v"])
    assert pipe.config.expand_timesteps
    g = torch.Generator().manual_seed(0)
    x_t, text = torch.randn(1, 48, 3, 4, 6, generator=g), torch.randn(1, 7, variant.transformer["text_dim"], generator=g)
    calls = []
    handle = record_calls(pipe, "transformer", calls)
    pipe.set_progress_bar_config(disable=True)
    pipe(image=first, prompt_embeds=text, guidance_scale=1.0, num_inference_steps=2, latents=x_t, num_frames=9,
         height=64, width=96, output_type="latent")
    handle.remove()
    _, fed, out = calls[0]
    sigma = fed["timestep"][:, -1] / 1000  # the last token is not in the first frame
    ours = transformer_inputs(variant, {"text": text, "condition": stored["condition"][None]}, x_t, sigma, torch.float32)
    assert (fed["timestep"][0, :6] == 0).all() and (fed["timestep"][0, 6:] > 0).all()  # 2x3 first-frame tokens
    torch.testing.assert_close(ours["timestep"], fed["timestep"])
    torch.testing.assert_close(ours["hidden_states"], fed["hidden_states"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**ours)[0], out)
        pred, target = fm.predict(pipe.transformer, variant, {"latents": x_t, "text": text, "condition": stored["condition"][None]},
                                  sigma, torch.randn_like(x_t), torch.float32)
    assert pred.shape == target.shape == (1, 48, 2, 4, 6)  # the loss covers the frames after the image

    clips = make_clips(tmp_path / "clips", 2, frames=20, height=96, width=128, fps=24)[0].parent
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "model.variant=tiny-ti2v", f"model.path={folders['tiny-ti2v']}", "data.task=i2v", f"data.source={clips}",
        f"data.shards={tmp_path / 'shards'}", "data.shard_dtype=fp32", f"run.output_dir={tmp_path / 'runs'}",
        "train.steps=4", "checkpoint.every=1000", "data.num_workers=0", *PLAIN, "validation.every=4",
        "validation.prompts=[wtune a red circle]", f"validation.images=[{tmp_path / 'first.png'}]", "validation.frames=9",
        "validation.steps=2", "validation.height=64", "validation.width=96"])
    run_prep(recipe, progress=False, say=lambda *_: None)
    assert json.loads((tmp_path / "shards" / "meta.json").read_text())["task"] == "i2v"
    summary = train(recipe, progress=False, say=lambda *_: None)
    assert all(math.isfinite(r["loss"]) for r in records(summary["run_dir"]))
    assert (Path(summary["run_dir"]) / "validation" / "step-000004" / "00.mp4").is_file()


def test_two_expert_settings_are_refused_on_one_transformer():
    from wan_tune.config import ConfigError, load_recipe

    with pytest.raises(ConfigError) as info:
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.experts=[low_noise]", "validation.guidance_scale_2=3.0"])
    assert set(dict(info.value.problems)) == {"model.experts", "validation.guidance_scale_2"}
    r = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-a14b", "model.experts=[low_noise]",
                                                          "validation.guidance_scale_2=3.0"])
    assert (r.model.experts, r.validation.guidance_scale_2) == (["low_noise"], 3.0)


def test_a14b_high_noise_expert_learns_at_its_own_multiple(folders, a14b_shards, tmp_path):
    """train.lr_high_noise (#35): the high-noise expert's groups at that multiple of train.lr, the
    low-noise one's at train.lr; a resume that changes it applies the new multiple from there on."""
    a14b_run(folders, a14b_shards, tmp_path, "train.steps=2", "train.lr=1e-4", "train.lr_high_noise=0.25")
    said = []
    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "model.variant=tiny-a14b", f"model.path={folders['tiny-a14b']}", f"data.shards={a14b_shards}",
        f"run.output_dir={tmp_path}", "checkpoint.every=4", "data.num_workers=0", *PLAIN, "train.steps=4",
        "train.lr=1e-4", "train.lr_high_noise=0.5"])
    done = train(recipe, progress=False, say=said.append)
    final = Path(done["checkpoint"])
    high = json.loads((final / "optimizer.json").read_text())["param_groups"]
    low = json.loads((final / "optimizer.transformer_2.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in high] == [0.5e-4] and [g["initial_lr"] for g in low] == [1e-4]
    assert any("train.lr_high_noise 0.25 -> 0.5" in s for s in said), said


def test_a14b_shared_adapter_learns_from_both_experts_and_exports_twice(folders, a14b_shards, tmp_path):
    """model.expert_mode=shared (#35): one adapter, applied in both experts, trained on every step
    whichever expert it routes to (both appear), one optimizer; 4 straight == 2 + resume to 4; the
    export is one file per expert, the same weights; the plan counts one adapter."""
    from safetensors.torch import load_file

    from wan_tune.config import ConfigError, load_recipe
    from wan_tune.export.run import export
    from wan_tune.plan.memory import MemoryPlan, Setup

    straight = a14b_run(folders, a14b_shards, tmp_path / "a", "train.steps=6", "checkpoint.every=2",
                        "model.expert_mode=shared", "train.ema_decay=0.5")
    experts = [r["expert"] for r in records(straight["run_dir"]) if "loss" in r]
    assert set(experts) == {"high_noise", "low_noise"}
    models = straight["models"]
    high, low = (dict(m.named_parameters()) for m in (models["high_noise"], models["low_noise"]))
    shared = [n for n, p in high.items() if p.requires_grad]
    assert shared and all(low[n] is high[n] for n in shared)  # the very same Parameters
    final = Path(straight["checkpoint"])
    a, b = (load_file(final / f) for f in ("trainable.safetensors", "trainable.transformer_2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora_B." in k)  # it trained
    state = json.loads((final / "state.json").read_text())
    assert state["ema"]["transformer"]["updates"] == 6  # one average, stepped on every step

    a14b_run(folders, a14b_shards, tmp_path / "b", "train.steps=2", "checkpoint.every=2", "model.expert_mode=shared",
             "train.ema_decay=0.5")
    resumed = a14b_run(folders, a14b_shards, tmp_path / "b", "train.steps=6", "checkpoint.every=2",
                       "model.expert_mode=shared", "train.ema_decay=0.5")
    assert resumed["weights_sha256"] == straight["weights_sha256"]

    checks = export(final, formats=["comfyui"], out=tmp_path / "export", say=lambda *_: None)
    assert len(checks) == 2 and all(c.ok for c in checks)
    files = [load_file(tmp_path / "export" / f"demo-tiny-step000006-{e}-comfyui.safetensors") for e in ("high_noise", "low_noise")]
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])

    recipe = load_recipe(ROOT / "recipes" / "wan2.2-t2v-a14b-lora.yaml", ["model.expert_mode=shared"])
    separate = load_recipe(ROOT / "recipes" / "wan2.2-t2v-a14b-lora.yaml")
    rows = [{label: v for _, label, v in MemoryPlan(r, "gpu").breakdown(Setup.of(r)).rows} for r in (recipe, separate)]
    assert rows[0]["LoRA weights fp32"] * 2 == rows[1]["LoRA weights fp32"]
    with pytest.raises(ConfigError) as info:
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.variant=tiny-a14b", "model.expert_mode=shared",
                                                          "model.experts=[low_noise]", "train.lr_high_noise=2"])
    assert set(dict(info.value.problems)) == {"model.experts", "train.lr_high_noise"}
    with pytest.raises(ConfigError, match="model.expert_mode.*has one transformer"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["model.expert_mode=shared"])
