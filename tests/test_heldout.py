"""The held-out loss: fixed samples, sigmas and noise, so the same weights give the same number on
any resume and any world size; the best step by it is kept and exportable; validation rounds
leave contact sheets (base above current) and an overview page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import demo

from wan_tune.data.sampler import BucketBatchSampler
from wan_tune.training.heldout import choose_holdout
from wan_tune.training.loop import train
from wan_tune.media.video_io import FRAMES_PER_ROW
from wan_tune.training.overview import LABEL_HEIGHT


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def heldout(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "heldout_loss" in r}


def test_holdout_takes_whole_clips_by_a_stable_hash():
    sources = [f"clip{i}.mp4" for i in range(10) for _ in range(2)]  # 2 windows per clip
    chosen = choose_holdout(sources, 0.2, seed=0)
    assert len(chosen) == 4 and len({sources[i] for i in chosen}) == 2  # whole clips, ~20% of samples
    assert choose_holdout(sources, 0.2, seed=0) == chosen  # no per-process hash salt
    assert choose_holdout(sources, 0.2, seed=1) != chosen  # the seed picks
    assert choose_holdout(sources, 0.0, seed=0) == [] and len(choose_holdout(sources, 0.01, seed=0)) == 2  # at least one clip


def test_held_out_samples_are_never_dealt_to_training():
    buckets = [(9, 64, 96)] * 6 + [(9, 96, 64)] * 6
    held = frozenset({0, 7, 8})
    for world in (1, 2):
        dealt = set()
        for rank in range(world):
            s = BucketBatchSampler(buckets, 2, seed=3, rank=rank, world=world, held_out=held)
            for epoch in range(3):
                dealt |= {i for b in s.epoch_batches(epoch) for i in b}
        assert not dealt & held and dealt == set(range(12)) - held


@pytest.fixture(scope="module")
def straight(tiny_folders, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    recipe = demo(tiny_folders, tiny_shards, out, **RUN)
    return train(recipe, progress=False, say=lambda *_: None)


RUN = {"train.steps": "6", "checkpoint.every": "2", "checkpoint.keep_last": "1", "data.holdout": "0.25",
       "train.lr": "5e-3", "eval.sigmas": "[0.2, 0.5, 0.8]"}


def test_heldout_loss_repeats_exactly_on_resume_and_best_is_kept(tiny_folders, tiny_shards, tmp_path, straight, capsys):
    from wan_tune.export.run import read_checkpoint

    run = Path(straight["run_dir"])
    scores = heldout(run)
    assert sorted(scores) == [0, 2, 4, 6]  # before training, then with every checkpoint
    assert set(scores[2]) == {"step", "heldout_loss", "heldout_loss@0.2", "heldout_loss@0.5", "heldout_loss@0.8"}
    assert scores[2]["heldout_loss"] == pytest.approx(np.mean([scores[2][f"heldout_loss@{s}"] for s in ("0.2", "0.5", "0.8")]))
    assert scores[6]["heldout_loss"] != scores[0]["heldout_loss"]  # the weights moved
    assert all("loss" not in r for r in scores.values())  # training lines stay as they were

    # The same run stopped at step 4 and resumed: every number equals the straight run's. The
    # step-4 line is removed before resuming, so the resumed trainer scores the loaded weights again.
    other = tmp_path / "resumed"
    train(demo(tiny_folders, tiny_shards, other, **{**RUN, "train.steps": "4"}), progress=False, say=lambda *_: None)
    metrics = other / "runs" / "demo-tiny" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if not (json.loads(line)["step"] == 4 and "heldout_loss" in line)))
    resumed = train(demo(tiny_folders, tiny_shards, other, **RUN), progress=False, say=print)
    assert "held-out loss at step 4" in capsys.readouterr().out
    assert heldout(resumed["run_dir"]) == scores  # bit-identical

    # best.json names the best scored checkpoint; keep_last=1 does not delete it; export finds it.
    best = json.loads((run / "best.json").read_text())
    scored = {s: r["heldout_loss"] for s, r in scores.items() if s > 0}
    assert best["step"] == min(scored, key=scored.get) and best["heldout_loss"] == scored[best["step"]]
    assert (run / best["checkpoint"] / "state.json").is_file()
    kept = sorted(p.name for p in run.glob("step-*"))
    assert kept == sorted({"step-000006", best["checkpoint"]})
    _, state, _ = read_checkpoint(run / "best")
    assert state["step"] == best["step"]


def test_validation_rounds_leave_contact_sheets_and_an_overview(tiny_folders, tiny_shards, tmp_path):
    extra = {"train.steps": "4", "validation.every": "2", "validation.prompts": "[wtune a red circle, a blue ring]",
             "validation.frames": "9", "validation.steps": "2", "validation.height": "48", "validation.width": "64",
             "data.holdout": "0.25", "checkpoint.every": "2"}
    summary = train(demo(tiny_folders, tiny_shards, tmp_path, **extra), progress=False, say=lambda *_: None)
    val = Path(summary["run_dir"]) / "validation"
    sheets = sorted(p.relative_to(val).as_posix() for p in val.rglob("*.png"))
    assert sheets == ["base/00.png", "base/01.png", "step-000002/00.png", "step-000002/01.png",
                      "step-000004/00.png", "step-000004/01.png"]
    frames = min(FRAMES_PER_ROW, 9)
    for step in (2, 4):
        sheet = np.asarray(Image.open(val / f"step-{step:06d}" / "00.png").convert("RGB"))
        assert sheet.shape == (2 * (LABEL_HEIGHT + 48), frames * 64, 3)  # two panels: base, current
        base_panel = sheet[LABEL_HEIGHT:LABEL_HEIGHT + 48]
        assert np.array_equal(base_panel, np.asarray(Image.open(val / "base" / "00.png").convert("RGB")))
        assert np.abs(sheet[-48:].astype(int) - base_panel.astype(int)).mean() > 0.5  # the LoRA changed the picture
    page = (val / "index.html").read_text()
    assert page.index("step 4") < page.index("step 2")  # newest first
    assert "step-000002/01.png" in page and "held-out loss" in page and "a blue ring" in page


@pytest.mark.slow
def test_heldout_loss_under_zero3_equals_one_process(tiny_folders, tiny_shards, tmp_path, straight):
    """Every parameter partitioned (stage3_param_persistence_threshold 0, as a 14B gets): all
    ranks run the held-out forwards together and the base model scores what one process scores."""
    from launching import launch

    proc = launch("zero3_cpu.yaml", tiny_folders, tiny_shards, tmp_path, "data.holdout=0.25", "eval.sigmas=[0.2, 0.5, 0.8]",
                  "train.steps=2", "train.lr=5e-3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    scores = heldout(tmp_path / "demo-tiny")
    assert sorted(scores) == [0, 2]
    one = heldout(straight["run_dir"])[0]
    assert scores[0] == pytest.approx(one, rel=1e-6)  # the same base weights, gathered from two shards
    assert scores[2]["heldout_loss"] != scores[0]["heldout_loss"]
