"""`wan-tune demo` end to end at a smaller size: every artifact exists and is valid."""

from __future__ import annotations

from pathlib import Path

import decord

from wan_tune.cli import main
from wan_tune.data.shards import ShardReader
from wan_tune.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_chain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes data/demo and checkpoints/ under the cwd
    r = run_demo(ROOT / "recipes" / "demo-tiny.yaml", ["train.steps=40", "checkpoint.every=20"], clips=4)
    assert len(list(Path(r["clips"]).glob("*.mp4"))) == 4 and Path(r["captions"]).is_file()
    assert len(ShardReader(r["shards"])) == r["samples"] == 8  # 4 clips x 2 windows of 9 frames
    assert Path(r["checkpoint"]).name == "step-000040"
    assert r["last_loss"] < r["first_loss"]
    assert r["selftest_ok"] and {Path(a).name.rsplit("-", 1)[1] for a in r["adapters"]} == {
        "comfyui.safetensors", "diffusers.safetensors", "kohya.safetensors"}
    assert len(decord.VideoReader(r["video"])) == 9 and Path(r["contact_sheet"]).stat().st_size > 0
    out = capsys.readouterr().out
    assert "demo summary" in out and "time per stage" in out

    # Rerun through the CLI (recipe found beside the package): starts fresh, exit 0.
    assert main(["demo", "--clips", "2", "train.steps=20", "checkpoint.every=20"]) == 0
    assert "removing the previous demo output" in capsys.readouterr().out
    assert len(list(Path(r["clips"]).glob("*.mp4"))) == 2
