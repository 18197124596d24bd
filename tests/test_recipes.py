"""Every shipped recipe validates and is in the README's table, and the recipe reference matches the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wan_tune.cli import main
from wan_tune.config import load_recipe
from wan_tune.media.synthetic import still_image
from wan_tune.config.reference import BEGIN, END, reference_markdown
from wan_tune.models import get_variant

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_promised_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {
        "wan2.1-t2v-1.3b-lora", "wan2.1-t2v-14b-lora", "wan2.1-i2v-14b-480p-lora", "wan2.1-t2v-1.3b-full", "demo-tiny",
        "wan2.2-ti2v-5b-lora", "wan2.2-t2v-a14b-lora", "wan2.2-i2v-a14b-lora",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_checks_clean(path, capsys, tmp_path, monkeypatch):
    """Clean once the files it names for validation are there (a template's first frames are the
    user's to give: until then `check` names them, as training would stop on them)."""
    from wan_tune.config.checks import missing_inputs

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    for key, why in missing_inputs(recipe):
        assert main(["check", str(path)]) == 2 and f"{key}: {why}" in capsys.readouterr().err
        file = tmp_path / why.removeprefix("no such file: ")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"an image")
    if recipe.data.sources:  # `check` names each source folder that is not there (prep would stop on it)
        assert main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        for i, source in enumerate(recipe.data.sources):
            assert f"data.sources[{i}].path: {source.path} does not exist" in err
            still_image(tmp_path / source.path / "a.png", 64, 64)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"variant: {recipe.model.variant}" in out
    # A recipe's method and variant agree with its file name.
    variant = get_variant(recipe.model.variant)
    if path.stem != "demo-tiny":
        assert path.stem.startswith(variant.name)
        assert path.stem.endswith(recipe.adapter.method)  # ...-lora, -lokr, -full


def test_console_script_reports_errors_with_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {lr: 1}\n")
    script = Path(sys.executable).parent / "wan-tune"  # the installed console script of this env
    proc = subprocess.run([str(script), "check", str(bad), "data.frames=[80]"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'train'" in proc.stderr and "4k+1" in proc.stderr


def test_the_reference_page_matches_schema():
    page = (ROOT / "docs" / "recipe-reference.md").read_text()
    start, end = page.index(BEGIN), page.index(END) + len(END)
    assert page[start:end] == reference_markdown(), "regenerate it: python -m wan_tune.config.reference --update-docs"
