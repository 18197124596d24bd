"""bench/gpu_suite.sh, run as SMOKE=1 on the tiny model on a CPU: every part runs, every settings row
trains, and the tables land in the docs file beside what was there, replaced (not repeated) on a rerun.
A GPU session runs the same script without SMOKE; no test needs a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("ckpt", "none", "block offload", "all", "route 0.5", "routes")  # SMOKE's rows ("all": fp8, activation offload, FFN
# chunks, attention ckpt; "route 0.5": token routing over the tiny model's two blocks)


def _suite(docs: Path, *parts: str) -> str:
    tmp = docs.parent / "tmp"  # the suite's work folder goes here, and must be gone at the end
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, SMOKE="1", DOCS=str(docs), PYTHON=sys.executable, OMP_NUM_THREADS="2", TMPDIR=str(tmp))
    env.pop("WAN_TUNE_BENCH_DIR", None)
    out = subprocess.run(["bash", "bench/gpu_suite.sh", *parts], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert not list(tmp.iterdir()), "the suite left its work folder behind"
    return out.stdout


@pytest.mark.slow
def test_the_gpu_suite_runs_every_row_and_writes_its_tables(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nwhat was measured before\n")
    _suite(docs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nwhat was measured before\n")
    settings = text.split("<!-- settings: tiny 3x8x12 -->")[1].split("<!-- /settings -->")[0]
    assert "CPU (" in settings and "torch " in settings  # the machine is named
    for name in ROWS:
        row = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) [GM]iB \| (.*?) \|",
                        settings, re.M)
        assert row, f"row {name!r} missing or failed:\n{settings}"
        assert float(row.group(1)) > 0 and float(row.group(4)) > 0
        # the plan's FLOPs against the first row: routing counts fewer, the memory settings the same
        assert (float(row.group(3)) < 0.9) if name.startswith("route") else float(row.group(3)) == 1.0, name
        if name != "block offload":  # a CPU plan has no offload
            assert row.group(5).endswith("iB"), name
        assert re.search(rf"^\| {re.escape(name)} \|.*\| [0-9.]+ [GM]iB \| [^|]+ \|$", settings, re.M), name  # host RAM
    assert re.search(r"^\| ckpt \| [0-9.]+ \| 1\.00 \|", settings, re.M)  # the first row is the reference
    assert "| native |" in text.split("<!-- settings: backends tiny 3x8x12 -->")[1]
    for latent, tokens in (("3x10x16", 120), ("3x12x20", 180)):  # the 14b part: the planner's advice for 24 GiB
        part = text.split(f"<!-- settings: tiny {latent} -->")[1].split("<!-- /settings -->")[0]
        assert f"({tokens} tokens)" in part  # the plan counts the latent trained (audit A4), not the demo's
        assert re.search(r"^\| plan \(`train\.gradient_checkpointing=\w+ .*`\) \| [0-9.]+ \|", part, re.M), part
    animate = text.split("<!-- settings: tiny-animate 2x8x12 -->")[1].split("<!-- /settings -->")[0]
    assert re.search(r"^\| fp8 \| [0-9.]+ \|", animate, re.M) and "(72 tokens)" in animate  # 2 latent frames + the reference
    # A rerun replaces its own table.
    _suite(docs, "backends")
    again = docs.read_text()
    assert again.count("<!-- settings: backends tiny 3x8x12 -->") == 1
    assert again.count("<!-- settings: tiny 3x8x12 -->") == 1


def test_an_unknown_part_is_refused():
    out = subprocess.run(["bash", "bench/gpu_suite.sh", "everything"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown part 'everything' (all, 1.3b, backends, 14b, animate)" in out.stderr


def test_each_row_plans_the_shape_it_trains():
    """Audit A4: the plan of a bench row counts the `--latent` its shards hold (480x832x81: 32,760
    tokens), not the demo recipe's 9 frames at 64x96."""
    sys.path.insert(0, str(ROOT / "bench"))
    from settings import shape_overrides

    from wan_tune.config import load_recipe
    from wan_tune.models.variants import get_variant
    from wan_tune.plan import run_shape

    for variant, latent, tokens in (("wan2.1-t2v-1.3b", "21x60x104", 32_760), ("wan2.1-t2v-14b", "21x90x160", 75_600),
                                    ("tiny", "3x10x16", 120)):
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [f"model.variant={variant}", *shape_overrides(variant, latent)])
        shape = run_shape(recipe, get_variant(variant))
        assert shape.tokens == tokens and shape.latent[1:] == tuple(int(x) for x in latent.split("x"))
