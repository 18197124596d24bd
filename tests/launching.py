"""Multi-process runs on CPU, launched exactly as users launch: accelerate + a config file under
launch/accelerate/ (gloo; DESIGN.md section 7)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The demo recipe holds a clip out (data.holdout) and renders validation sheets; tests that count
# metrics lines, compare runs or train many steps turn both off, unless they test them.
PLAIN = ("data.holdout=0", "validation.every=0")


def launch(config: str, tiny_folders, tiny_shards, out: Path, *extra: str, variant: str = "tiny",
           processes: int | None = None, env: dict | None = None, module: str = "wan_tune.train") -> subprocess.CompletedProcess:
    """`processes` overrides the config's num_processes, as `--num_processes` does for users; `env`
    adds to the environment; `module` runs in place of the trainer (a probe under tests/ that wraps it)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate" / config),
        *(["--num_processes", str(processes)] if processes else []), "-m", module, str(ROOT / "recipes" / "demo-tiny.yaml"),
        f"model.variant={variant}", f"model.path={tiny_folders[variant]}", f"data.shards={tiny_shards[variant]}",
        f"run.output_dir={out}", "data.num_workers=0", "train.steps=4", "checkpoint.every=2", *PLAIN, *extra,
    ]
    # Plain DDP on CPU needs ACCELERATE_USE_CPU; DeepSpeed must not get it (accelerate would drop
    # DeepSpeed). FSDP2 finds the CPU by itself. The ZeRO-3 config names its DeepSpeed JSON
    # relative to the repository root, as a user launching from there would.
    env = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, **(env or {})}
    if config == "multi_cpu.yaml":
        env["ACCELERATE_USE_CPU"] = "1"
    if module != "wan_tune.train":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def rank_digests(stdout: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"\[rank (\d)\] trainable weights sha256 (\w+)", stdout)}
