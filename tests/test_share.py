"""Sharing what was trained (#26): the ComfyUI workflow is a graph of stock nodes that links up
(every node, input and link type as ComfyUI defines them), and the model card says what the run
did, with a diffusers snippet that runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from comfyui_nodes import check_graph

from wan_tune.export.comfyui_workflow import MODEL_FILES, Render, switch_step, workflow
from wan_tune.models.variants import VARIANTS, expert_label

ROOT = Path(__file__).resolve().parents[1]
RENDER = Render(prompt="mybrand a product turns", negative="", width=832, height=480, frames=33, steps=20, cfg=5.0,
                shift=3.0, fps=16)


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_workflow_of_every_variant_links_up_from_stock_nodes(name):
    variant = VARIANTS[name]
    loras = {e: f"my-brand-{expert_label(variant, e)}-comfyui.safetensors" for e in variant.experts}
    graph = workflow(variant, loras, RENDER)
    assert check_graph(graph) == []
    by_class: dict[str, list[dict]] = {}
    for node in graph.values():
        by_class.setdefault(node["class_type"], []).append(node["inputs"])
    # Each expert's own file, with its own LoRA on it; the recipe's size, frames and shift.
    assert [u["unet_name"] for u in by_class["UNETLoader"]] == list(MODEL_FILES[name][0])
    assert sorted(lo["lora_name"] for lo in by_class["LoraLoaderModelOnly"]) == sorted(loras.values())
    assert {s["shift"] for s in by_class["ModelSamplingSD3"]} == {3.0}
    latent = next(n for c in ("EmptyHunyuanLatentVideo", "WanImageToVideo", "WanFirstLastFrameToVideo", "WanVaceToVideo",
                              "Wan22ImageToVideoLatent", "WanAnimateToVideo") for n in by_class.get(c, []))
    assert (latent["width"], latent["height"], latent["length"]) == (832, 480, 33)
    expected = {"T2V": "EmptyHunyuanLatentVideo", "I2V": "WanImageToVideo", "FLF2V": "WanFirstLastFrameToVideo",
                "VACE": "WanVaceToVideo", "Animate": "WanAnimateToVideo"}[variant.kind]
    if variant.expand_timesteps:
        expected = "Wan22ImageToVideoLatent"
    assert expected in by_class
    if variant.clip_image_tokens:
        assert by_class["CLIPVisionLoader"][0]["clip_name"] == "clip_vision_h.safetensors"
    if variant.two_experts:  # the high-noise sampler hands over at the boundary, with its noise left in
        high, low = by_class["KSamplerAdvanced"]
        assert high["end_at_step"] == low["start_at_step"] == switch_step(20, 3.0, variant.boundary_ratio)
        assert (high["return_with_leftover_noise"], low["add_noise"]) == ("enable", "disable")


@pytest.mark.parametrize("replace", [False, True])
def test_animate_workflow_feeds_wan_animate_to_video(replace):
    """Wan2.2-Animate: the character (image and its CLIP), pose and face videos into WanAnimateToVideo
    (replacement: the background video and the person's mask too); the reference's latent frame is
    trimmed by the node's own trim_latent output before decoding."""
    from dataclasses import replace as with_

    graph = workflow(VARIANTS["wan2.2-animate-14b"], {"transformer": "mascot-comfyui.safetensors"},
                     with_(RENDER, frames=77, replace=replace))
    assert check_graph(graph) == []
    node_id, animate = next((k, n["inputs"]) for k, n in graph.items() if n["class_type"] == "WanAnimateToVideo")
    files = {n["inputs"]["file"] for n in graph.values() if n["class_type"] == "LoadVideo"}
    assert files == {"pose.mp4", "face.mp4"} | ({"background.mp4", "mask.mp4"} if replace else set())
    assert ("background_video" in animate and "character_mask" in animate) == replace
    assert animate["length"] == 77 and animate["video_frame_offset"] == 0
    trim = next(n["inputs"] for n in graph.values() if n["class_type"] == "TrimVideoLatent")
    assert trim["trim_amount"] == [node_id, 3]


def test_a_broken_graph_is_caught():
    """The checker itself: a renamed input, a wrong link type and a dangling node are each named."""
    graph = workflow(VARIANTS["wan2.1-t2v-1.3b"], {"transformer": "a.safetensors"}, RENDER)
    broken = json.loads(json.dumps(graph))
    sampler = next(n for n in broken.values() if n["class_type"] == "KSampler")
    sampler["inputs"]["latent"] = sampler["inputs"].pop("latent_image")
    sampler["inputs"]["positive"] = ["2", 0]  # the VAE loader
    broken["99"] = {"class_type": "VAELoader", "inputs": {"vae_name": "x"}}
    problems = check_graph(broken)
    assert any("required input latent_image missing" in p for p in problems)
    assert any("takes CONDITIONING, linked to a VAE" in p for p in problems)
    assert any("99 VAELoader feeds nothing" in p for p in problems)


def test_switch_step_follows_the_shifted_schedule():
    # shift 1: sigma = t; 0.875 of 20 steps: steps 0-2 at sigma >= 0.875, step 3 at 0.85.
    assert switch_step(20, 1.0, 0.875) == 3
    # A larger shift keeps sigmas high for longer: the hand-over comes later.
    assert switch_step(20, 12.0, 0.875) > switch_step(20, 3.0, 0.875) > 3


@pytest.fixture(scope="module")
def exported(tiny_shards, tiny_folders, tmp_path_factory):
    """A tiny T2V LoRA trained 4 steps with validation and a held-out clip, exported in every format."""
    from launching import PLAIN

    from wan_tune.config import load_recipe
    from wan_tune.export.run import export
    from wan_tune.training.loop import train

    tmp = tmp_path_factory.mktemp("share")
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        *PLAIN, f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp / 'runs'}",
        "train.steps=4", "checkpoint.every=2", "validation.every=2", "validation.steps=2", "data.num_workers=0",
        "data.holdout=0.25"])
    result = train(recipe, progress=False, say=lambda *_: None)
    out = tmp / "export"
    checks = export(result["checkpoint"], formats=["comfyui", "diffusers", "kohya"], out=out, say=lambda *_: None)
    assert all(c.ok for c in checks)
    return recipe, Path(result["run_dir"]), out


def test_model_card_says_what_the_run_did(exported):
    from wan_tune.data.shards import ShardReader

    recipe, run, out = exported
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "diffusers" and front["license"] == "apache-2.0"
    assert {"wan", "lora", "text-to-video"} <= set(front["tags"]) and front["instance_prompt"] == "wtune"
    # The widget shows the exported validation videos, which are there.
    assert front["widget"] and all((out / w["output"]["url"]).is_file() for w in front["widget"])
    index = ShardReader(recipe.data.shards).index
    assert f"{index['source'].nunique()} clips, {len(index)} training windows" in text
    best = json.loads((run / "best.json").read_text())
    assert f"Best held-out loss: {best['heldout_loss']:.4f} at step {best['step']}" in text
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert f"Training loss at step 4: {last['loss']:.4f}" in text
    assert "![00](samples/00.png)" in text and (out / "samples" / "00.png").is_file()  # base vs LoRA sheet
    embedded = re.search(r"## Recipe\n\n```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(embedded)["train"]["steps"] == 4
    assert "-comfyui-workflow.json" in text and "wan-tune sample --base" in text
    # Published files name no path of this machine: the base, shards, footage, run folder are relative.
    root = str(out.parents[1])  # pytest's base folder, above every folder the run used
    assert root not in text and root not in (out / "recipe.yaml").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["shards"].startswith("../")


def test_model_card_diffusers_snippet_runs(exported, monkeypatch):
    """The card's diffusers code, run as written from the export folder, renders a video with the LoRA."""
    _, _, out = exported
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(out)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the card's own snippet is what is under test)
    assert (out / "sample.mp4").stat().st_size > 0
    os.remove(out / "sample.mp4")


def test_wandb_logs_the_best_checkpoint_and_the_export_as_model_artifacts(tiny_folders, tiny_shards, tmp_path, monkeypatch):
    """Offline W&B, read back from the run files: `best` logs the checkpoints that were the best when
    saved, with their held-out loss; the export is logged as its own model artifact."""
    from launching import PLAIN
    from wandb_log import records

    from wan_tune.config import load_recipe
    from wan_tune.export.run import export
    from wan_tune.training.loop import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path / 'runs'}",
        "train.steps=4", "checkpoint.every=2", "data.num_workers=0", *PLAIN, "data.holdout=0.25",
        "tracking.backend=wandb", "tracking.offline=true", "tracking.log_artifacts=best"])
    result = train(recipe, progress=False, say=lambda *_: None)
    run = Path(result["run_dir"])
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = [r.artifact for r in records(run_file) if r.WhichOneof("record_type") == "artifact"]
    scores = {json.loads(line)["step"]: json.loads(line)["heldout_loss"]
              for line in (run / "metrics.jsonl").read_text().splitlines() if "heldout_loss" in line}
    best = json.loads((run / "best.json").read_text())
    assert logged and all(a.type == "model" and a.name == "demo-tiny-adapter" for a in logged)
    meta = [json.loads(a.metadata) for a in logged]
    # Only checkpoints that were the best so far, each with its own held-out loss; the last of them is best.json's.
    assert all(m["heldout_loss"] == pytest.approx(scores[m["step"]]) for m in meta)
    assert [m["heldout_loss"] for m in meta] == sorted((m["heldout_loss"] for m in meta), reverse=True)
    assert meta[-1]["step"] == best["step"]
    assert {c.path for c in logged[-1].manifest.contents} >= {"trainable.safetensors", "recipe.yaml"}

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "client-notes.txt").write_text("another client's notes")  # in the folder, not the export's
    export(result["checkpoint"], formats=["comfyui"], out=tmp_path / "export", say=lambda *_: None)
    export_runs = [f for f in run.glob("wandb/offline-run-*/run-*.wandb") if f != run_file]
    (exported,) = [r.artifact for f in export_runs for r in records(f) if r.WhichOneof("record_type") == "artifact"]
    assert exported.name == "demo-tiny-export" and json.loads(exported.metadata)["step"] == 4
    contents = {c.path for c in exported.manifest.contents}
    assert contents >= {"README.md", "demo-tiny-step000004-comfyui.safetensors", "demo-tiny-step000004-comfyui-workflow.json",
                        "wan-tune-export.json"}
    assert "client-notes.txt" not in contents


def test_push_stops_before_any_work_offline_or_without_a_token(exported, monkeypatch, capsys):
    from wan_tune.cli import main

    _, run, out = exported
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["push", str(out), "my-studio/my-brand"]) == 1  # the tests run with HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(out / "no-token-here"))
    assert main(["push", str(out), "my-studio/my-brand"]) == 1
    assert "no Hugging Face token: run `hf auth login`" in capsys.readouterr().err
    assert main(["push", str(out), "not a repo id"]) == 1
    assert "is not a Hub repository id" in capsys.readouterr().err
    for bad, why in (("my-studio/brand.git", "may not end in '-', '.' or '.git'"), ("my-studio/x--y", "'--' and '..'")):
        assert main(["push", str(out), bad]) == 1
        assert why in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written or moved


class _Hub:
    """A stand-in for HfApi's three calls: records them, or fails the upload like a dropped connection."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        if self.fail:
            raise ConnectionError("Connection reset by peer")
        return None


def test_push_uploads_the_export_in_one_commit_and_a_failure_changes_nothing(exported, monkeypatch):
    """Push takes exactly the files the export wrote (its manifest), never other files in the
    folder; a failed upload leaves the folder as it was and says so."""
    from fnmatch import fnmatch

    from wan_tune.export.delivery import MANIFEST, read_manifest
    from wan_tune.export.push import PushError, push

    _, _, out = exported
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    strays = [out / "client-notes.txt", out / "someone-elses.safetensors", out / "samples" / "draft.mp4"]
    for stray in strays:
        stray.write_bytes(b"not the export's")
    hub = _Hub()
    try:
        push(out, "my-studio/my-brand", private=True, revision="v1", say=lambda *_: None, api=hub)
        assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
        upload = hub.calls[-1][2]
        assert upload["folder_path"] == str(out) and upload["revision"] == "v1" and hub.calls[0][2]["private"] is True
        taken = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                       and any(fnmatch(p.relative_to(out).as_posix(), pat) for pat in upload["allow_patterns"]))
        assert taken == sorted([MANIFEST, *read_manifest(out)["files"]])
        assert "README.md" in taken and "recipe.yaml" in taken and any(t.endswith("-comfyui-workflow.json") for t in taken)
        assert any(t.startswith("samples/") for t in taken) and sum(t.endswith(".safetensors") for t in taken) == 3
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        with pytest.raises(PushError, match="nothing was committed; the export in .* is kept as it is"):
            push(out, "my-studio/my-brand", say=lambda *_: None, api=_Hub(fail=True))
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        for stray in strays:
            stray.unlink()
