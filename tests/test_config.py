"""Recipes: merging, typing, interpolation, and every error reported at once by key."""

from __future__ import annotations

import pytest

from wan_tune.cli import main
from wan_tune.config import ConfigError, load_recipe, to_yaml


def problems(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return dict(info.value.problems)


def test_defaults_overrides_and_interpolation(recipe_file):
    path = recipe_file("run:\n  name: brand\ntrain:\n  lr: 2.0e-4\n")
    r = load_recipe(path, ["train.lr=5e-5", "data.frames=[33,81]"])
    assert r.train.lr == 5e-5  # the override wins over the file
    assert r.data.frames == [33, 81]
    assert r.data.shards == "data/shards/brand"  # ${run.name} resolved after merging
    assert r.train.steps == 2000  # untouched keys keep their defaults


def test_misspelt_section_exits_2_and_suggests(recipe_file, capsys):
    path = recipe_file("trian:\n  lr: 1.0e-4\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trian" in err and "did you mean 'train'" in err


def test_wrong_type_names_key_and_expected_type(recipe_file):
    p = problems(recipe_file("{}\n"), ["train.lr=abc"])
    assert list(p) == ["train.lr"]
    assert "expected float" in p["train.lr"] and "'abc'" in p["train.lr"]


def test_frames_must_be_4k_plus_1(recipe_file):
    p = problems(recipe_file("{}\n"), ["data.frames=[80]"])
    assert "4k+1" in p["data.frames"] and "77 or 81" in p["data.frames"]


def test_many_mistakes_reported_in_one_run(recipe_file):
    path = recipe_file(
        """
trian: {lr: 1.0e-4}
run: {nmae: x}
data:
  frames: [80]
  resolutions: [[480, 830]]
  task: i2v
adapter: {method: full}
timesteps: {sampling: logitnormal, sigma_min: 0.8, sigma_max: 0.2}
train: {fp8_base: true}
"""
    )
    p = problems(path, ["train.lr=abc", "model.variant=wan2.1-t2v-1.3", "validation.every=10", "adapter.alpha=16"])
    assert set(p) == {
        "trian", "run.nmae", "data.frames", "data.resolutions", "adapter.alpha",
        "timesteps.sampling", "timesteps.sigma_min", "train.fp8_base", "train.lr", "model.variant",
        "validation.prompts",
    }
    assert "did you mean 'name'" in p["run.nmae"]
    assert "multiples of 16" in p["data.resolutions"]
    assert "did you mean 'logit_normal'" in p["timesteps.sampling"]
    assert "did you mean 'wan2.1-t2v-1.3b'" in p["model.variant"]
    assert "LoRA setting" in p["adapter.alpha"]


def test_lora_keys_left_at_default_are_fine_on_full(recipe_file, tmp_path):
    r = load_recipe(recipe_file("adapter: {method: full}\n"))
    assert r.adapter.method == "full"
    saved = tmp_path / "resolved.yaml"  # what a full fine-tune checkpoint stores
    saved.write_text(to_yaml(r))
    assert load_recipe(saved) == r


def test_a_lora_recipe_switches_to_full_from_the_command_line(recipe_file, tmp_path):
    path = recipe_file("adapter: {method: lora, rank: 16, alpha: 8, targets: [attention]}\n")
    notes = []
    r = load_recipe(path, ["adapter.method=full"], warn=notes.append)
    assert r.adapter.method == "full"
    # One line names what is ignored; the keys go back to their defaults, so the saved recipe
    # of the full fine-tune does not claim a rank (and loads back without a note).
    assert len(notes) == 1 and "adapter.rank, adapter.alpha, adapter.targets" in notes[0] and str(path) in notes[0]
    assert (r.adapter.rank, r.adapter.alpha, r.adapter.targets) == (32, None, ["attention", "ffn"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(r))
    again = []
    assert load_recipe(saved, warn=again.append) == r and again == []
    # `null` unsets a LoRA key; a value typed on the command line beside method=full is a contradiction.
    assert load_recipe(path, ["adapter.method=full", "adapter.rank=null"], warn=notes.append).adapter.method == "full"
    p = problems(path, ["adapter.method=full", "adapter.rank=8"])
    assert set(p) == {"adapter.rank"} and "command line" in p["adapter.rank"]
    # On a LoRA run nothing is ignored and nothing is said.
    quiet = []
    assert load_recipe(path, warn=quiet.append).adapter.rank == 16 and quiet == []


def test_i2v_rules(recipe_file):
    p = problems(recipe_file("data: {task: i2v}\n"))
    assert "wan2.1-i2v-14b-480p" in p["data.task"]  # names the variants that would fit
    p = problems(recipe_file("validation: {every: 5, prompts: [a], images: [x.png]}\n"))
    assert "I2V variants" in p["validation.images"]
    p = problems(recipe_file("model: {variant: wan2.1-i2v-14b-480p}\nvalidation: {every: 5, prompts: [a, b], images: [x.png]}\n"))
    assert "one first frame per prompt" in p["validation.images"]
    r = load_recipe(recipe_file("model: {variant: wan2.1-i2v-14b-480p}\ndata: {task: i2v}\n"))
    assert r.data.task == "i2v"


def test_key_outside_its_section_and_bad_override_shape(recipe_file):
    p = problems(recipe_file("lr: 3\n"), ["steps=5", "train.steps"])
    assert "did you mean 'train.lr'" in p["lr"]
    assert "did you mean 'train.steps'" in p["steps"]
    assert "section.key=value" in p["train.steps"]


def test_broken_interpolation_is_reported_with_the_others(recipe_file):
    p = problems(recipe_file("run: {output_dir: '${nope.x}'}\nadapter: {targets: [atention]}\n"))
    assert "nope.x" in p["run.output_dir"]
    assert "did you mean 'attention'" in p["adapter.targets"]


def test_bare_no_in_yaml_gets_a_quoting_hint_and_is_a_word_on_the_command_line(recipe_file):
    p = problems(recipe_file("train: {mixed_precision: no}\n"))
    assert "quote it" in p["train.mixed_precision"]
    r = load_recipe(recipe_file("{}\n"), ["train.mixed_precision=no", "train.gradient_checkpointing=false"])
    assert r.train.mixed_precision == "no" and r.train.gradient_checkpointing is False


def test_unreadable_recipes_name_the_file(recipe_file, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(recipe_file("train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_recipe(recipe_file("- a\n- b\n"))


def test_resolved_yaml_reloads_to_the_same_recipe(recipe_file, tmp_path):
    # Checkpoints save to_yaml(recipe); export and resume must read it back unchanged.
    r = load_recipe(recipe_file("run: {name: x}\nadapter: {rank: 4, targets: [attn1.to_q]}\n"), ["train.lr=3e-5"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(r))
    assert load_recipe(saved) == r
    assert "${" not in saved.read_text()


def test_check_refuses_what_training_would_stop_on_and_notes_what_does_nothing(recipe_file, tmp_path, capsys):
    """#33: `check` accepted a run name too long for the export's file names and validation inputs
    that are not there (training stopped at its first render); settings that change nothing for the
    recipe get one warning line each."""
    path = recipe_file("model: {variant: tiny-i2v}\n")
    image = tmp_path / "first.png"
    assert main(["check", str(path), f"validation.images=[{image}]"]) == 2
    assert f"validation.images[0]: no such file: {image}" in capsys.readouterr().err
    image.write_bytes(b"png")
    assert main(["check", str(path), f"validation.images=[{image}]"]) == 0
    assert main(["check", str(path), "run.name=" + "x" * 181]) == 2
    assert "run.name: is 181 bytes; at most 180" in capsys.readouterr().err
    assert main(["check", str(path), "run.name=" + "x" * 180, "vace.drop_control=0.5", "tracking.backend=none",
                 "tracking.log_artifacts=all"]) == 0
    err = capsys.readouterr().err
    assert "vace.* settings do nothing for tiny-i2v (not a VACE model)" in err
    assert "tracking.log_artifacts=all does nothing with tracking.backend=none" in err
    assert main(["check", str(path), "tracking.backend=none"]) == 0  # the default log_artifacts: no note
    assert "log_artifacts" not in capsys.readouterr().err
