"""State that cannot lie (#33 items 3-6): state.json records how a checkpoint was trained and on
what data under its own checksum; export reads those facts, not the editable recipe.yaml; an
edited or misplaced state.json is refused; a resume on shards another prep changed stops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _recipe(tiny_folders, shards, out, *extra):
    from launching import PLAIN

    from wan_tune.config import load_recipe

    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        *PLAIN, f"model.path={tiny_folders['tiny']}", f"data.shards={shards}", f"run.output_dir={out}", "train.steps=2",
        "data.num_workers=0", "adapter.alpha=8", *extra])


@pytest.fixture(scope="module")
def trained(tiny_folders, tiny_shards, tmp_path_factory):
    """A 2-step tiny LoRA (alpha 8, rank 32) on a copy of the shards: (recipe, its checkpoint)."""
    from wan_tune.training.loop import train

    tmp = tmp_path_factory.mktemp("recorded")
    shards = tmp / "shards"
    shutil.copytree(tiny_shards["tiny"], shards)
    recipe = _recipe(tiny_folders, shards, tmp / "runs")
    return recipe, Path(train(recipe, progress=False, say=lambda *_: None)["checkpoint"])


def test_state_json_records_the_training_and_the_data_under_its_checksum(trained):
    from wan_tune.training.checkpoint import read_state, state_checksum
    from wan_tune.training.facts import data_facts

    recipe, checkpoint = trained
    state, why = read_state(checkpoint)
    assert why is None and state["format_version"] == 2 and state["checksum"] == state_checksum(state)
    assert state["training"] == {"variant": "tiny", "method": "lora", "rank": recipe.adapter.rank, "alpha": 8.0,
                                 "targets": list(recipe.adapter.targets), "experts": list(recipe.model.experts),
                                 "expert_mode": "separate"}
    assert state["data"] == json.loads(json.dumps(data_facts(recipe.data.shards)))
    assert state["data"]["prep"]["frames"] == [9] and state["data"]["clips"] == 4


def test_export_ships_what_was_trained_not_an_edited_recipe(trained, tmp_path):
    """alpha 8 -> 16 in recipe.yaml would ship the LoRA at twice its strength: the export names the
    edit in one line and writes the trained alpha."""
    from safetensors import safe_open

    from wan_tune.export.run import export

    _, checkpoint = trained
    copy = tmp_path / "runs" / "demo-tiny" / checkpoint.name
    shutil.copytree(checkpoint.parent, copy.parent)
    text = (copy / "recipe.yaml").read_text()
    (copy / "recipe.yaml").write_text(text.replace("alpha: 8.0", "alpha: 16.0"))
    said = []
    checks = export(copy, ["comfyui"], tmp_path / "out", say=said.append)
    assert all(c.ok for c in checks)
    assert any("recipe.yaml was edited since the run (adapter.alpha: 16.0 there, 8.0 trained)" in s for s in said), said
    with safe_open(str(next((tmp_path / "out").glob("*-comfyui.safetensors"))), "pt") as f:
        assert f.metadata()["wan_tune.alpha"] == "8"
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {8.0}


def _edited(checkpoint: Path, where: Path, edit) -> Path:
    shutil.copytree(checkpoint, where)
    state = json.loads((where / "state.json").read_text())
    edit(state)
    (where / "state.json").write_text(json.dumps(state))
    return where


@pytest.mark.parametrize("case,why", [
    ("files-emptied", r"state\.json was changed after it was saved"),
    ("step-changed", r"state\.json was changed after it was saved"),
    ("no-checksum-no-files", r"state\.json lists no files"),
    ("newer", r"format 3, written by a newer wan-tune"),
    ("misplaced", r"state\.json says step 2 but its folder is step-000040"),
])
def test_an_edited_or_misplaced_state_json_is_refused(trained, tmp_path, case, why):
    from wan_tune.export.adapters import ExportError
    from wan_tune.export.run import export
    from wan_tune.training.checkpoint import checkpoint_damage

    _, checkpoint = trained
    edits = {"files-emptied": lambda s: s.update(files={}), "step-changed": lambda s: s.update(step=1),
             "no-checksum-no-files": lambda s: [s.pop("checksum"), s.pop("format_version"), s.update(files={})],
             "newer": lambda s: s.update(format_version=3), "misplaced": lambda s: None}
    folder = _edited(checkpoint, tmp_path / "run" / ("step-000040" if case == "misplaced" else checkpoint.name), edits[case])
    assert checkpoint_damage(folder) is not None and __import__("re").search(why, checkpoint_damage(folder))
    with pytest.raises(ExportError, match=why):
        export(folder, ["comfyui"], tmp_path / "out", say=lambda *_: None)


def test_a_resume_on_shards_another_prep_changed_stops(trained, tiny_folders, tiny_shards, tmp_path):
    """A second prep with other data.frames into the same shards folder: the card of a checkpoint
    exported after it still describes the data trained on; the resume stops and says what changed;
    checkpoint.on_new_data=continue goes on (and says so)."""
    from data_prep.prep import run_prep

    from wan_tune.config import load_recipe
    from wan_tune.export.run import export
    from wan_tune.training.errors import TrainingError
    from wan_tune.training.facts import data_facts
    from wan_tune.training.loop import train

    recipe, checkpoint = trained
    runs, shards = tmp_path / "runs", tmp_path / "shards"
    shutil.copytree(checkpoint.parent, runs / "demo-tiny")
    shutil.copytree(recipe.data.shards, shards)
    copy = runs / "demo-tiny" / checkpoint.name
    (copy / "recipe.yaml").write_text((copy / "recipe.yaml").read_text().replace(str(recipe.data.shards), str(shards)))
    run_prep(load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.source={tiny_shards['tiny'].parent / 'clips'}", f"data.shards={shards}",
        "data.shard_dtype=fp32", "data.frames=[5]", "data.max_clips_per_video=1", "validation.every=0"]), progress=False,
        say=lambda *_: None)

    trained_on, now = json.loads((copy / "state.json").read_text())["data"], data_facts(shards)
    assert now["samples"] != trained_on["samples"]
    export(copy, ["comfyui"], tmp_path / "out", say=lambda *_: None)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{trained_on['clips']} clips, {trained_on['samples']} training windows" in card
    assert f"{now['samples']} training windows" not in card

    again = _recipe(tiny_folders, shards, runs, "train.steps=4")
    with pytest.raises(TrainingError, match=r"changed since step-000002 was saved \(index .* -> .*data\.frames \[9\] -> "
                                            r"\[5\].*\): resuming would train on other data.*checkpoint\.on_new_data=continue"):
        train(again, progress=False, say=lambda *_: None)
    said = []
    done = train(_recipe(tiny_folders, shards, runs, "train.steps=4", "checkpoint.on_new_data=continue"), progress=False,
                 say=said.append)
    assert Path(done["checkpoint"]).name == "step-000004"
    assert any("trained on other shards" in s for s in said)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(trained, tiny_folders, tmp_path):
    from wan_tune.training.loop import train

    recipe, checkpoint = trained
    runs = tmp_path / "runs"
    shutil.copytree(checkpoint.parent, runs / "demo-tiny")
    said = []
    done = train(_recipe(tiny_folders, recipe.data.shards, runs), progress=False, say=said.append)
    assert done["checkpoint"] == str(runs / "demo-tiny" / checkpoint.name) and done["step"] == 2
    assert any(s.startswith(f"nothing to train: {runs / 'demo-tiny' / checkpoint.name} is at step 2 and train.steps is 2")
               for s in said), said
