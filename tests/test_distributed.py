"""Two processes on CPU (gloo): DDP and DeepSpeed ZeRO-2 train and end with the same weights on
both ranks (DESIGN.md section 7). Launched exactly as users launch: accelerate + a config file."""

from __future__ import annotations

import pytest
from launching import launch, rank_digests


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "zero2_cpu.yaml"])
def test_two_ranks_end_with_the_same_weights(config, tiny_folders, tiny_shards, tmp_path):
    proc = launch(config, tiny_folders, tiny_shards, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = rank_digests(proc.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    assert "2 process(es)" in proc.stdout
    run = tmp_path / "demo-tiny"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000004"]
    losses = (run / "metrics.jsonl").read_text().splitlines()
    assert len(losses) == 4  # one line per step from rank 0 only
    if config.startswith("zero2"):
        assert (run / "step-000004" / "deepspeed").is_dir()
        # Resuming a ZeRO-2 run restores the partitioned optimizer state through DeepSpeed.
        more = launch(config, tiny_folders, tiny_shards, tmp_path, "train.steps=6")
        assert more.returncode == 0, more.stderr[-4000:]
        assert "resumed from" in more.stdout and "step-000004" in more.stdout
        assert len(set(rank_digests(more.stdout).values())) == 1
