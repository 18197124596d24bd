"""Two processes on CPU (gloo): DDP and DeepSpeed ZeRO-2 train and end with the same weights on
both ranks (DESIGN.md section 7). Launched exactly as users launch: accelerate + a config file."""

from __future__ import annotations

import json

import pytest
from launching import PLAIN, ROOT, launch, rank_digests

from wan_tune.config import load_recipe
from wan_tune.training.loop import train


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "zero2_cpu.yaml"])
def test_two_ranks_end_with_the_same_weights(config, tiny_folders, tiny_shards, tmp_path):
    proc = launch(config, tiny_folders, tiny_shards, tmp_path, "data.holdout=0.25")
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = rank_digests(proc.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    assert "2 process(es)" in proc.stdout
    run = tmp_path / "demo-tiny"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000004"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # one line per step from rank 0 only
    scores = {r["step"]: r for r in lines if "heldout_loss" in r}
    assert sorted(scores) == [0, 2, 4]
    if config == "multi_cpu.yaml":
        # The held-out loss of the 2-process run's final weights, scored again by one process
        # (the resumed run scores its starting weights when that line is missing): the same number.
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if r is not scores[4]))
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path}",
            "data.num_workers=0", "train.steps=4", "checkpoint.every=2", *PLAIN, "data.holdout=0.25"])
        again = train(recipe, progress=False, say=lambda *_: None)
        assert again["heldout"][4] == scores[4]["heldout_loss"]
    if config.startswith("zero2"):
        assert (run / "step-000004" / "deepspeed").is_dir()
        # Resuming a ZeRO-2 run restores the partitioned optimizer state through DeepSpeed.
        more = launch(config, tiny_folders, tiny_shards, tmp_path, "train.steps=6")
        assert more.returncode == 0, more.stderr[-4000:]
        assert "resumed from" in more.stdout and "step-000004" in more.stdout
        assert len(set(rank_digests(more.stdout).values())) == 1
