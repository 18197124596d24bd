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


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ranks_stop_with_a_checkpoint_when_their_launcher_is_killed(tiny_folders, tiny_shards, tmp_path):
    """#33: SIGKILL of `accelerate launch` left both ranks training on to the end, unsupervised. Each
    rank watches its parent: gone, they stop together at the next step with a checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train import _wait_for

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate" /
           "multi_cpu.yaml"), "-m", "wan_tune.train", str(ROOT / "recipes" / "demo-tiny.yaml"),
           f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path}",
           "data.num_workers=0", "train.steps=100000", "checkpoint.every=100000", *PLAIN]
    log = tmp_path / "log"
    with open(log, "w") as out:  # a file, not a pipe: ranks that outlive the launcher must not block on a full one
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "ACCELERATE_USE_CPU": "1"}, start_new_session=True)
    metrics = tmp_path / "demo-tiny" / "metrics.jsonl"
    assert _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, timeout=300)
    agent = launcher.pid
    workers = [c for c in _children(agent) if "wan_tune.train" in open(f"/proc/{c}/cmdline").read()]
    workers = workers or [g for c in _children(agent) for g in _children(c)]  # torchrun's agent in between
    assert len(workers) == 2, workers
    os.kill(agent, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 120
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    left = [w for w in workers if _alive(w)]
    for w in left:  # never leave them running on the machine
        os.kill(w, signal.SIGKILL)
    assert not left, "the ranks trained on without their launcher"
    output = log.read_text()
    saved = sorted((tmp_path / "demo-tiny").glob("step-*"))
    assert saved and "the launcher (process" in output and f"received the launcher's death: saved {saved[-1]}" in output
