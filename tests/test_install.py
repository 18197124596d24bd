"""The tested install: constraints.txt pins what the suite passed with, and this environment is it."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            out[name.lower().replace("_", "-")] = pinned.strip()
    return out


def test_every_dependency_is_pinned_except_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]} - {"torch"}
    pinned = pins()
    assert wanted - set(pinned) == set(), "run scripts/freeze_constraints.sh (README: 'A tested install')"
    assert "torch" not in pinned  # setup.sh installs the build that fits the machine first


def test_this_environment_is_the_pinned_one():
    """CI installs with -c constraints.txt, so a pin that differs means the file is stale or was ignored."""
    differs = {}
    for name, pinned in pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue  # an extra this environment did not install
        if got != pinned:
            differs[name] = (pinned, got)
    assert not differs, f"installed versions differ from constraints.txt: {differs}"
