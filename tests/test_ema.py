"""train.ema_decay (#35): diffusers' EMAModel over the trainable weights, kept in each checkpoint
(ema.safetensors), resumed exactly, scored on the held-out clips beside the raw weights, followed
by best.json, and exported by default (export.weights / --weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launching import PLAIN
from safetensors.torch import load_file

from wan_tune.config import ConfigError, load_recipe
from wan_tune.export.adapters import ExportError
from wan_tune.export.run import export
from wan_tune.models.keymap import to_original
from wan_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "say": lambda *_: None}


def _recipe(tiny_folders, tiny_shards, out, *extra):
    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={out}",
        "data.num_workers=0", "train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=10", *PLAIN, *extra])


def test_the_average_follows_diffusers_recurrence_and_resumes_exactly(tiny_folders, tiny_shards, tmp_path):
    """The saved average equals the recurrence over the saved weights (decay 0 at the first update,
    then min(0.2, k / (9 + k)): capped from the third); 2 steps + a resume to 4 == 4 straight, the
    average bit for bit."""
    straight = train(_recipe(tiny_folders, tiny_shards, tmp_path / "a", "train.ema_decay=0.2"), **QUIET)
    run = Path(straight["run_dir"])
    weights = [load_file(str(run / f"step-{k:06d}" / "trainable.safetensors")) for k in range(1, 5)]
    average = dict(weights[0])
    for k, w in enumerate(weights[1:], start=2):
        d = min(0.2, k / (9 + k))
        average = {n: a - (1 - d) * (a - w[n]) for n, a in average.items()}
    saved = load_file(str(run / "step-000004" / "ema.safetensors"))
    assert saved.keys() == weights[-1].keys()
    for n, a in average.items():
        assert (saved[n] - a).abs().max() < 1e-6, n
    assert any((saved[n] - weights[-1][n]).abs().max() > 1e-6 for n in saved)  # not the raw weights
    state = json.loads((run / "step-000004" / "state.json").read_text())
    assert state["ema"] == {"transformer": {"updates": 4, "decay": 0.2}}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema_decay"] for r in logged if "loss" in r] == pytest.approx([0.0, 2 / 11, 0.2, 0.2])

    train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", "train.ema_decay=0.2", "train.steps=2"), **QUIET)
    resumed = train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", "train.ema_decay=0.2"), **QUIET)
    again = load_file(str(Path(resumed["checkpoint"]) / "ema.safetensors"))
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert all((again[n] == saved[n]).all() for n in saved)


def test_the_average_is_scored_beside_the_raw_weights_and_exported(tiny_folders, tiny_shards, tmp_path):
    """metrics.jsonl scores both; best.json follows the average's score; export writes the average
    by default (the file's matrices are the average's), --weights raw the raw ones; the card says which."""
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, "train.ema_decay=0.5", "data.holdout=0.25",
                         "checkpoint.every=2"), **QUIET)
    run = Path(done["run_dir"])
    scored = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in scored if "heldout_loss" in r}
    assert set(scored) == {0, 2, 4} and all("heldout_loss_ema" in r for r in scored.values())
    assert scored[4]["heldout_loss_ema"] != scored[4]["heldout_loss"]
    best = json.loads((run / "best.json").read_text())
    assert best["weights"] == "ema"
    assert best["heldout_loss"] == min(scored[s]["heldout_loss_ema"] for s in (2, 4))

    checkpoint = run / "step-000004"
    said = []
    export(checkpoint, ["comfyui"], tmp_path / "ema-export", say=said.append)
    export(checkpoint, ["comfyui"], tmp_path / "raw-export", say=lambda *_: None, weights="raw")
    assert any("moving average" in s for s in said), said
    for folder, source in (("ema-export", "ema.safetensors"), ("raw-export", "trainable.safetensors")):
        trained = load_file(str(checkpoint / source))
        (file,) = (tmp_path / folder).glob("*-comfyui.safetensors")
        written = load_file(str(file))
        for name, value in trained.items():
            module, part = name.split(".lora_")
            key = f"diffusion_model.{to_original(module)}.lora_{'down' if part.startswith('A') else 'up'}.weight"
            assert (written[key] == value).all(), (folder, key)
    card = (tmp_path / "ema-export" / "README.md").read_text()
    assert "moving average of the trained weights (decay 0.5)" in card and "(these weights)" in card
    assert "moving average" not in (tmp_path / "raw-export" / "README.md").read_text().split("## Training")[1].split("\n- Held")[0]


def test_ema_refusals(tiny_folders, tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"train.ema_decay.*schedulefree_adamw already averages"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["train.optimizer=schedulefree_adamw", "train.ema_decay=0.99"])
    with pytest.raises(ConfigError, match=r"export.weights.*needs the average train.ema_decay keeps"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["export.weights=ema"])
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, "train.steps=1"), **QUIET)
    with pytest.raises(ExportError, match=r"keeps no moving average .*--weights raw"):
        export(done["checkpoint"], ["comfyui"], tmp_path / "out", say=lambda *_: None, weights="ema")
    assert not (tmp_path / "out").exists()


def test_the_plan_counts_the_average():
    from wan_tune.plan.memory import MemoryPlan, Setup

    recipe = load_recipe(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml", ["train.ema_decay=0.999"])
    rows = {label: b for _, label, b in MemoryPlan(recipe, "gpu").breakdown(Setup.of(recipe)).rows}
    assert rows["EMA copy fp32"] == rows["LoRA weights fp32"]
