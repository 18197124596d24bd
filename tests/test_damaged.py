"""Damaged state: a broken newest checkpoint is named and passed over; malformed safetensors files
given to a command get one line that names them, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import demo

from wan_tune.cli import main
from wan_tune.training.loop import TrainingError, train

RUN = {"checkpoint.every": "2", "checkpoint.keep_last": "0"}


def _quiet(*_):
    pass


def test_damaged_checkpoints_are_named_and_passed_over(tiny_folders, tiny_shards, tmp_path, capsys):
    straight = train(demo(tiny_folders, tiny_shards, tmp_path / "a", **RUN, **{"train.steps": "6"}), progress=False, say=_quiet)
    train(demo(tiny_folders, tiny_shards, tmp_path / "b", **RUN, **{"train.steps": "4"}), progress=False, say=_quiet)
    run = tmp_path / "b" / "runs" / "demo-tiny"
    weights = run / "step-000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a save cut off by a full disk

    resumed = train(demo(tiny_folders, tiny_shards, tmp_path / "b", **RUN, **{"train.steps": "6"}), progress=False, say=print)
    out = capsys.readouterr().out
    assert "skipped step-000004 (trainable.safetensors is damaged" in out and "resuming from step-000002" in out
    a = load_file(Path(straight["checkpoint"]) / "trainable.safetensors")
    b = load_file(Path(resumed["checkpoint"]) / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3-6 trained again: the uninterrupted result

    (run / "step-000006" / "state.json").unlink()  # a folder that never got its state
    train(demo(tiny_folders, tiny_shards, tmp_path / "b", **RUN, **{"train.steps": "6"}), progress=False, say=print)
    assert "skipped step-000006 (no state.json)" in capsys.readouterr().out

    for step in run.glob("step-*"):
        (step / "state.json").write_text("{not json")
    with pytest.raises(TrainingError, match=r"every checkpoint in .* is damaged .*state.json is not readable JSON"):
        train(demo(tiny_folders, tiny_shards, tmp_path / "b", **RUN, **{"train.steps": "6"}), progress=False, say=_quiet)


def test_malformed_safetensors_headers_get_one_line_naming_the_file(tiny_folders, tiny_shards, tmp_path, capsys):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**62).to_bytes(8, "little") + b"{}")  # a header length no file has
    not_json = tmp_path / "not_json.safetensors"
    not_json.write_bytes((8).to_bytes(8, "little") + b"notjson!")
    summary = train(demo(tiny_folders, tiny_shards, tmp_path / "run", **{"train.steps": "2"}), progress=False, say=_quiet)
    for bad in (huge, not_json):
        assert main(["sample", "--base", str(tiny_folders["tiny"]), "--lora", str(bad), "--prompt", "x",
                     "--out", str(tmp_path / "o.mp4")]) == 1
        err = capsys.readouterr().err.strip()
        assert str(bad) in err and len(err.splitlines()) == 1, err
        ckpt = tmp_path / f"ckpt-{bad.stem}"
        shutil.copytree(summary["checkpoint"], ckpt)
        shutil.copy(bad, ckpt / "trainable.safetensors")
        assert main(["export", str(ckpt)]) == 1
        err = capsys.readouterr().err.strip()
        assert str(ckpt / "trainable.safetensors") in err and len(err.splitlines()) == 1, err
