"""A skeptical studio engineer's inputs, as a table: each row is one command on a run laid out like
the demo's (tiny model, shards, a trained run with checkpoints, an exported LoRA), made hostile
first. Each row names the exit status, a pattern of the one line the command must print, and the
files that must come out untouched (byte for byte). A regression shows up as one red row.

Rows that need more than one command (resume with a changed lr, a fresh start over an old run,
Ctrl-C) are tests of their own below the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import _wait_for

from wan_tune.cli import main
from wan_tune.config import load_recipe, to_yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = {"run.name": "my-brand", "train.steps": "4", "checkpoint.every": "2", "checkpoint.keep_last": "0",
        "data.holdout": "0.25", "validation.every": "0", "data.num_workers": "0", "tracking.backend": "none"}


@pytest.fixture(scope="module")
def template(tiny_folders, tiny_shards, tmp_path_factory) -> Path:
    """A demo-like world, trained once: recipe.yaml, clips/, shards/, runs/my-brand/step-2,4, lora.safetensors."""
    from wan_tune.export.run import export

    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_shards["tiny"], root / "shards")
    shutil.copytree(tiny_shards["tiny"].parent / "clips", root / "clips")
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.source={root / 'clips'}", f"data.shards={root / 'shards'}",
        f"data.captions={root / 'shards' / 'captions.csv'}", f"run.output_dir={root / 'runs'}",
        *[f"{k}={v}" for k, v in BASE.items()]])
    (root / "recipe.yaml").write_text(to_yaml(recipe))
    assert main(["train", str(root / "recipe.yaml")]) == 0
    export(root / "runs" / "my-brand" / "step-000004", ["comfyui"], root / "export", say=lambda *_: None)
    shutil.copy(next((root / "export").glob("*-comfyui.safetensors")), root / "lora.safetensors")
    return root


@pytest.fixture
def world(template, tmp_path) -> Path:
    """A fresh copy of the template, at the same paths the recipe names (the recipe is rewritten)."""
    root = tmp_path / "w"
    shutil.copytree(template, root, symlinks=True)
    text = (root / "recipe.yaml").read_text().replace(str(template), str(root))
    (root / "recipe.yaml").write_text(text)
    return root


def run_of(w: Path) -> Path:
    return w / "runs" / "my-brand"


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def set_index_file(w: Path, value: str) -> None:
    import pandas as pd

    part = next((w / "shards" / "index").glob("rank0-*.parquet"))
    frame = pd.read_parquet(part)
    frame["file"] = value
    frame.to_parquet(part, index=False)


def no_api_key(w: Path, ctx: Ctx) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        ctx.monkeypatch.delenv(var, raising=False)
    (w / "netrc").write_text("")
    ctx.monkeypatch.setenv("NETRC", str(w / "netrc"))


def nan_lora(w: Path) -> None:
    tensors = load_file(w / "lora.safetensors")
    save_file({k: v * float("nan") for k, v in tensors.items()}, w / "lora.safetensors")


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    code: int
    line: str
    """Regex one line must match: of stderr for failures, of stdout + stderr otherwise, or of `where`."""
    setup: Callable = lambda w, ctx: None
    untouched: tuple[str, ...] = ()
    """Paths relative to the world whose bytes must not change (folders: every file in them)."""
    where: str | None = None
    """A file (relative to the world) whose lines `line` is matched against instead, e.g. prep's report."""


@dataclass
class Ctx:
    """What a row's setup may use: the test's monkeypatch, and an ExitStack undone after the command."""

    monkeypatch: object
    stack: ExitStack


R = ["{w}/recipe.yaml"]
TRAIN, CHECK, PREP, EXPORT = ["train", *R], ["check", *R], ["prep", *R], ["export"]
STEP4 = "{w}/runs/my-brand/step-000004"
SAMPLE = ["sample", "--base", "{tiny}", "--prompt", "wtune style", "--frames", "9", "--steps", "2",
          "--height", "64", "--width", "96", "--out", "{w}/s.mp4"]
RUN_FILES = ("runs/my-brand",)

CASES = [
    # --- deletes user files -----------------------------------------------------------------
    Case("demo-over-user-folders",
         lambda w: ["demo", f"data.source={w}/clips", f"data.shards={w}/shards", f"run.output_dir={w}/runs",
                    "run.name=my-brand"],
         1, r"was not made by `wan-tune demo`", untouched=("clips", "shards", "runs")),
    Case("index-names-absolute-path", lambda w: PREP, 1, r"names the file '/.*outside\.bin', which is not a data file",
         setup=lambda w, ctx: ((w / "outside.bin").write_bytes(b"precious"), set_index_file(w, str(w / "outside.bin"))),
         untouched=("outside.bin", "shards/data")),
    Case("index-names-parent-path", lambda w: PREP, 1, r"names the file '\.\./outside\.bin', which is not a data file",
         setup=lambda w, ctx: ((w / "outside.bin").write_bytes(b"precious"), set_index_file(w, "../outside.bin")),
         untouched=("outside.bin", "shards/data")),
    Case("index-names-dotdot-inside-data", lambda w: TRAIN, 1, r"names the file 'data/\.\./\.\./outside\.bin'",
         setup=lambda w, ctx: ((w / "outside.bin").write_bytes(b"precious"),
                              set_index_file(w, "data/../../outside.bin"), _merge(w)),
         untouched=("outside.bin",)),
    Case("run-name-escapes", lambda w: [*CHECK, "run.name=../../escape"], 2, r"run\.name: must be a plain folder name"),
    Case("run-name-absolute", lambda w: [*CHECK, "run.name=/abs"], 2, r"run\.name: must be a plain folder name"),
    Case("export-name-from-recipe-escapes", lambda w: [*EXPORT, STEP4], 1, r"run\.name: must be a plain folder name",
         setup=lambda w, ctx: _edit(run_of(w) / "step-000004" / "recipe.yaml", "name: my-brand", "name: ../../../x"),
         untouched=RUN_FILES),
    # --- silently wrong or stuck ------------------------------------------------------------
    Case("torn-metrics-line", lambda w: [*TRAIN, "train.steps=6"], 0, r"metrics\.jsonl: dropped 1 damaged line",
         setup=lambda w, ctx: _append(run_of(w) / "metrics.jsonl", b'{"step": 5, "lo')),
    Case("metrics-not-utf8", lambda w: [*TRAIN, "train.steps=6"], 0, r"dropped 1 damaged line",
         setup=lambda w, ctx: _append(run_of(w) / "metrics.jsonl", b'{"step": 5, "x": "\xff\xfe"}\n')),
    Case("damaged-best-json-export", lambda w: [*EXPORT, "{w}/runs/my-brand/best"], 1, r"best\.json is damaged.*delete it",
         setup=lambda w, ctx: (run_of(w) / "best.json").write_text("{nope"), untouched=RUN_FILES),
    Case("damaged-best-json-train", lambda w: [*TRAIN, "train.steps=6"], 0, r"best\.json is damaged.*rewrote it",
         setup=lambda w, ctx: (run_of(w) / "best.json").write_text('{"checkpoint": "../../etc"}')),
    Case("damaged-meta-json", lambda w: TRAIN, 1, r"meta\.json is damaged .*rerun `wan-tune prep",
         setup=lambda w, ctx: (w / "shards" / "meta.json").write_text('{"format_ver'), untouched=RUN_FILES),
    Case("damaged-index-parquet", lambda w: TRAIN, 1, r"index\.parquet is damaged .*rebuilds",
         setup=lambda w, ctx: _cut(w / "shards" / "index.parquet"), untouched=RUN_FILES),
    Case("damaged-optimizer-json", lambda w: [*TRAIN, "train.steps=6"], 0,
         r"skipped step-000004 \(optimizer\.json is .*resuming from step-000002",
         setup=lambda w, ctx: (run_of(w) / "step-000004" / "optimizer.json").write_text("{")),
    Case("missing-optimizer-file", lambda w: [*TRAIN, "train.steps=6"], 0,
         r"skipped step-000004 \(optimizer\.safetensors missing\); resuming from step-000002",
         setup=lambda w, ctx: (run_of(w) / "step-000004" / "optimizer.safetensors").unlink()),
    Case("missing-trainable-file", lambda w: [*TRAIN, "train.steps=6"], 0,
         r"skipped step-000004 \(trainable\.safetensors missing\)",
         setup=lambda w, ctx: (run_of(w) / "step-000004" / "trainable.safetensors").unlink()),
    Case("second-train-on-locked-folder", lambda w: [*TRAIN, "train.steps=6"], 1,
         r"runs/my-brand is in use by another `wan-tune train` \(pid \d+ on .*\); wait",
         setup=lambda w, ctx: _hold_lock(w, ctx), untouched=RUN_FILES),
    Case("flipped-byte-in-checkpoint-resume", lambda w: [*TRAIN, "train.steps=6"], 0,
         r"skipped step-000004 \(.*trainable\.safetensors does not match its size and CRC-32",
         setup=lambda w, ctx: flip_byte(run_of(w) / "step-000004" / "trainable.safetensors")),
    Case("flipped-byte-in-checkpoint-export", lambda w: [*EXPORT, STEP4], 1,
         r"trainable\.safetensors does not match its size and CRC-32 in state\.json .*damaged on disk",
         setup=lambda w, ctx: flip_byte(run_of(w) / "step-000004" / "trainable.safetensors"), untouched=RUN_FILES),
    Case("flipped-byte-in-empty-prompt", lambda w: TRAIN, 1, r"empty_prompt\.safetensors does not match the checksum",
         setup=lambda w, ctx: flip_byte(w / "shards" / "empty_prompt.safetensors", -8), untouched=RUN_FILES),
    # --- one line, not a traceback -------------------------------------------------------------
    Case("fps-infinite", lambda w: [*TRAIN, "data.fps=.inf"], 2, r"data\.fps: must be a finite number > 0, got inf"),
    Case("text-tokens-above-512", lambda w: [*TRAIN, "data.max_text_tokens=600"], 2, r"data\.max_text_tokens: must be 1 to 512"),
    Case("seed-beyond-64-bit", lambda w: [*TRAIN, "run.seed=9223372036854775808"], 2, r"run\.seed: must be in \[0, 2\^63\)"),
    Case("target-names-no-module", lambda w: [*CHECK, "adapter.targets=[attn9.to_q]"], 2,
         r"adapter\.targets: 'attn9\.to_q' names no module of tiny; did you mean 'attn2\.to_q'\?"),
    Case("batch-larger-than-every-bucket", lambda w: [*TRAIN, "train.batch_size=100"], 1,
         r"train\.batch_size=100 but the largest bucket of .* holds \d+ training clip"),
    Case("empty-recipe", lambda w: ["check", f"{w}/empty.yaml"], 2, r"empty\.yaml: the recipe is empty",
         setup=lambda w, ctx: (w / "empty.yaml").write_text("")),
    Case("rank-above-layer-width", lambda w: [*CHECK, "adapter.rank=100000"], 2,
         r"adapter\.rank: 100000 is above the width of .* a LoRA's rank is at most 48"),
    Case("resolution-beyond-variant", lambda w: [*CHECK, "data.resolutions=[[16384,16384]]"], 2,
         r"data\.resolutions: \[16384, 16384\] makes aspect buckets up to \d+ px .* at most 16384"),
    Case("ti2v-on-16-channel-shards", lambda w: [*TRAIN, "model.variant=tiny-ti2v", "model.path=null"], 1,
         r"holds 16-channel latents .* tiny-ti2v takes 48", untouched=RUN_FILES),
    Case("wandb-without-api-key", lambda w: [*TRAIN, "tracking.backend=wandb"], 1,
         r"W&B has no API key here .*wandb login.*WANDB_MODE=offline.*tracking\.backend=none",
         setup=no_api_key, untouched=RUN_FILES),
    Case("export-out-read-only", lambda w: [*EXPORT, STEP4, "--out", f"{w}/ro/x"], 1, r"cannot write in .*ro/x",
         setup=lambda w, ctx: _read_only(w / "ro", ctx)),
    Case("caption-read-only", lambda w: ["caption", *R, f"data.captions={w}/ro/c.csv"], 1,
         r"data\.captions: cannot write in .*ro", setup=lambda w, ctx: _read_only(w / "ro", ctx)),
    Case("sample-out-read-only", lambda w: [*SAMPLE[:-1], f"{w}/ro/s.mp4"], 1, r"--out: cannot write in .*ro",
         setup=lambda w, ctx: _read_only(w / "ro", ctx)),
    Case("sample-zero-steps", lambda w: [*SAMPLE, "--steps", "0"], 1, r"--steps must be at least 1, got 0"),
    Case("sample-height-30", lambda w: [*SAMPLE, "--height", "30"], 1, r"--height must be a positive multiple of 16 px, got 30"),
    Case("sample-height-negative", lambda w: [*SAMPLE, "--height", "-16"], 1, r"--height must be a positive multiple of 16 px"),
    Case("sample-frames-negative", lambda w: [*SAMPLE, "--frames", "-3"], 1, r"--frames must be 4k\+1"),
    Case("sample-empty-lora", lambda w: [*SAMPLE, "--lora", f"{w}/empty.safetensors"], 1, r"holds no tensors: not an adapter",
         setup=lambda w, ctx: save_file({}, w / "empty.safetensors")),
    Case("sample-nan-lora", lambda w: [*SAMPLE, "--lora", f"{w}/lora.safetensors"], 1, r"holds NaN or infinite values",
         setup=lambda w, ctx: nan_lora(w)),
    Case("huge-sidecar-caption", lambda w: [*PREP, "data.captions={w}/c2.csv"], 0,
         r"clip_000\.mp4.*caption file clip_000\.txt is 5\.0 MB",
         setup=lambda w, ctx: (w / "clips" / "clip_000.txt").write_bytes((b"wtune " * 1_000_000)[: 5 << 20]),
         where="shards/prep_report.csv"),
    # --- smaller ---------------------------------------------------------------------------
    Case("captions-cut-inside-a-quote", lambda w: PREP, 1, r"captions\.csv does not read as CSV \(unexpected end of data",
         setup=lambda w, ctx: (w / "shards" / "captions.csv").write_text('key,caption,origin\nclip_000.mp4,"wtune a long'),
         untouched=("shards/index.parquet",)),
    Case("fifo-in-source", lambda w: [*PREP, "data.captions={w}/c2.csv"], 0, r"pipe\.mp4.*not a regular file",
         setup=lambda w, ctx: os.mkfifo(w / "clips" / "pipe.mp4"), where="shards/prep_report.csv"),
    Case("options-between-recipe-and-overrides", lambda w: [*TRAIN, "--resume", "never", "train.lr=0"], 2,
         r"train\.lr: must be a finite number > 0, got 0"),
]


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _merge(w: Path) -> None:
    from wan_tune.data.shards import INDEX_FILE, PARTS_DIR

    import pandas as pd

    parts = sorted((w / "shards" / PARTS_DIR).glob("*.parquet"))
    pd.concat([pd.read_parquet(p) for p in parts]).to_parquet(w / "shards" / INDEX_FILE, index=False)


def _hold_lock(w: Path, ctx: Ctx) -> None:
    """Another `train` holding the run folder (a second open file description: flock conflicts in one process too)."""
    from wan_tune.training.run_folder import RunLock

    lock = RunLock(run_of(w))
    assert lock.acquire() is None
    ctx.stack.callback(lock.release)


def _read_only(folder: Path, ctx: Ctx) -> None:
    from test_damaged import read_only

    ctx.stack.enter_context(read_only(folder))


def _digests(w: Path, paths: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for rel in paths:
        target = w / rel
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for f in files:
            out[str(f.relative_to(w))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


NOISE = re.compile(r"\d+%\||it/s|s/it|^warning: |^\[20\d\d-")  # progress bars, warnings, library log lines


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, world: Path, tiny_folders, monkeypatch, capsys):
    monkeypatch.chdir(world)
    argv = [a.format(w=world, tiny=tiny_folders["tiny"]) for a in case.argv(world)]
    with ExitStack() as stack:
        case.setup(world, Ctx(monkeypatch, stack))
        before = _digests(world, case.untouched)
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code}, expected {case.code}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    text = (world / case.where).read_text() if case.where else err if case.code else out + err
    assert any(re.search(case.line, line) for line in text.splitlines()), text[-3000:]
    if case.code:  # one line, naming the file or key and what to do
        lines = [line for line in err.splitlines() if line.strip() and not NOISE.search(line)]
        assert len(lines) == 1, err[-3000:]
    assert _digests(world, case.untouched) == before


# --- rows of more than one command ------------------------------------------------------------


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_changed_lr_on_resume_is_applied_and_recorded(world, capsys):
    run = run_of(world)
    assert main(["train", str(world / "recipe.yaml"), "train.steps=6", "train.lr=1e-3", "train.weight_decay=0.5"]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings, applied from here on: train.lr 0.005 -> 0.001; train.weight_decay 0.01 -> 0.5" in out
    lrs = {r["step"]: r["lr"] for r in _records(run) if "lr" in r}
    assert lrs[4] == 0.005 and lrs[5] == lrs[6] == 0.001  # the log shows what ran ...
    saved = load_recipe(run / "step-000006" / "recipe.yaml")
    assert saved.train.lr == 0.001 and saved.train.weight_decay == 0.5  # ... and the saved recipe says the same
    groups = json.loads((run / "step-000006" / "optimizer.json").read_text())["param_groups"]
    assert all(g["lr"] == 0.001 and g["weight_decay"] == 0.5 and g["initial_lr"] == 0.001 for g in groups)

    # Another optimizer cannot take over AdamW's state: refused, naming the key, nothing written.
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", str(world / "recipe.yaml"), "train.steps=8", "train.optimizer=adafactor"]) == 1
    err = capsys.readouterr().err
    assert "train.optimizer was adamw in step-000006; its state cannot continue as adafactor" in err
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow
def test_a_fresh_start_moves_the_old_run_aside(world, capsys):
    run = run_of(world)
    old_best = (run / "best.json").read_text()
    assert main(["train", str(world / "recipe.yaml"), "--resume", "never", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in run.parent.iterdir() if p.name.startswith("my-brand.replaced-")]
    assert len(aside) == 1 and f"moved it to {aside[0]}" in out
    assert sorted(p.name for p in aside[0].glob("step-*")) == ["step-000002", "step-000004"]  # nothing lost
    assert (aside[0] / "best.json").read_text() == old_best
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002"]  # the new run alone
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2]
    assert json.loads((run / "best.json").read_text())["checkpoint"] == "step-000002"
    # The next plain run resumes the new run, not the old step 4.
    assert main(["train", str(world / "recipe.yaml"), "train.steps=3"]) == 0
    assert "resumed from" in capsys.readouterr().out and (run / "step-000003").is_dir()
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_resuming_an_earlier_step_moves_the_later_ones_aside(world, capsys):
    run = run_of(world)
    assert main(["train", str(world / "recipe.yaml"), "--resume", str(run / "step-000002"), "train.steps=3",
                 "checkpoint.every=1000"]) == 0
    out = capsys.readouterr().out
    aside = next(p for p in run.parent.iterdir() if p.name.startswith("my-brand.replaced-"))
    assert "moved the 1 later checkpoint(s) of this run (step-000004 ... step-000004)" in out
    assert [p.name for p in aside.glob("step-*")] == ["step-000004"]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000003"]


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_the_lock_goes_with_the_run(world, capsys):
    lock = world / "runs" / ".my-brand.lock"
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "since": "2026-01-01 00:00:00"}))  # a killed run's
    assert main(["train", str(world / "recipe.yaml"), "train.steps=5"]) == 0
    assert not lock.exists()


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_exits_130(world):
    run = run_of(world)
    proc = subprocess.Popen([sys.executable, "-m", "wan_tune.cli", "train", str(world / "recipe.yaml"), "train.steps=500",
                             "checkpoint.every=1000", "data.holdout=0.25"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=world)
    assert _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_records(run)) >= 9)  # past step 6
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    saved = max(run.glob("step-*"))
    assert int(saved.name.split("-")[1]) > 4 and f"received SIGINT: saved {saved}" in out
    # The checkpoint saved on the stop gets its held-out score when the run resumes, so it can become best.
    stop = int(saved.name.split("-")[1])
    assert main(["train", str(world / "recipe.yaml"), f"train.steps={stop + 1}", "checkpoint.every=1000",
                 "data.holdout=0.25"]) == 0
    scores = {r["step"]: r["heldout_loss"] for r in _records(run) if "heldout_loss" in r}
    assert {stop, stop + 1} <= set(scores)
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == min((stop, stop + 1), key=lambda s: (scores[s], s)) and (run / best["checkpoint"]).is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_prep_keeps_what_was_encoded(world, tiny_folders, signum, code, said):
    """Ctrl-C, or SIGTERM (a scheduler's, `kill`, #33): the samples so far written whole, one line, 128 + signal."""
    from wan_tune.media.synthetic import make_clips

    if not (world / "many").is_dir():
        make_clips(world / "many", 30, frames=20, height=64, width=96)
    new = world / f"new-{signum}"
    args = ["prep", str(world / "recipe.yaml"), f"data.source={world / 'many'}", f"data.shards={new}",
            f"data.captions={new / 'captions.csv'}", "data.samples_per_shard=1"]
    proc = subprocess.Popen([sys.executable, "-m", "wan_tune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=world)
    assert _wait_for(lambda: len(list((new / "index").glob("rank0-*.parquet"))) >= 2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"wan-tune prep: {said}"), err[-2000:]
    parts = {p.stem for p in (new / "index").glob("rank0-*.parquet")}
    data = {p.stem for p in (new / "data").glob("rank0-*.safetensors")}
    assert parts and parts == data and len(parts) < 60  # every finished sample kept whole, none half there
    assert main(args) == 0  # the rerun goes on from there


@pytest.mark.slow
def test_values_from_the_environment_are_not_written_in_clear(world, monkeypatch):
    monkeypatch.setenv("WT_SECRET_ENTITY", "s3cr3t-team")
    assert main(["train", str(world / "recipe.yaml"), "train.steps=5", "tracking.entity=${oc.env:WT_SECRET_ENTITY}"]) == 0
    for path in [run_of(world) / "step-000005" / "recipe.yaml", *run_of(world).rglob("*.json*")]:
        assert "s3cr3t" not in path.read_text(errors="replace"), path
    saved = run_of(world) / "step-000005" / "recipe.yaml"
    assert "entity: ${oc.env:WT_SECRET_ENTITY}" in saved.read_text()
    assert load_recipe(saved).tracking.entity == "s3cr3t-team"  # it still resolves where the variable is set


def test_a_linked_footage_folder_lands_and_a_failed_export_file_is_renamed(world, tiny_folders, monkeypatch, capsys):
    from data_prep.sources import discover
    from wan_tune.export import run as export_run
    from wan_tune.export.selftest import Check

    (world / "more").symlink_to(world / "clips", target_is_directory=True)
    linked = world / "linked"
    linked.mkdir()
    (linked / "shoot").symlink_to(world / "clips", target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)  # a link loop is walked once
    items = discover(str(linked))
    assert sorted(i.name for i in items if i.supported) == [f"shoot/clip_{i:03d}.mp4" for i in range(4)]
    assert all(i.caption for i in items)

    def failing(path, adapter, variant, expert="transformer", fmt=""):
        return Check(str(path), 1, 1.0, 1e-5, "")  # our own self-test reporting a mismatch

    monkeypatch.setattr(export_run, "check_adapter_file", failing)
    assert main(["export", STEP4.format(w=world), "--out", str(world / "out"), "--format", "comfyui"]) == 1
    assert [p.name for p in (world / "out").iterdir()] == ["my-brand-step000004-comfyui.safetensors.failed"]


def test_listings_say_how_many_more_and_the_header_says_where_alpha_applies(world):
    from wan_tune.export.adapters import Adapter, ExportError, kohya_state_dict
    from wan_tune.export.run import header

    a, b = torch.zeros(4, 48), torch.zeros(48, 4)
    outside = ["condition_embedder.time_embedder.linear_2", "condition_embedder.text_embedder.linear_2",
               "condition_embedder.time_embedder.linear_1", "condition_embedder.text_embedder.linear_1", "proj_out"]
    adapter = Adapter({m: (a, b) for m in [*outside, "blocks.0.attn1.to_q"]}, 4, 4.0, {})
    with pytest.raises(ExportError, match=r"\(condition_embedder\.[a-z_.0-9]+, .*, .* and 2 more\)"):
        kohya_state_dict(adapter, False)
    recipe = load_recipe(world / "recipe.yaml")
    h = header(recipe, {"step": 4}, "comfyui", modules=adapter.pairs)
    assert h["wan_tune.alpha_applies_to"].startswith("the transformer blocks' adapters; 5 outside them (")
    assert "alpha/rank is folded into their lora_up" in h["wan_tune.alpha_applies_to"]
    assert "wan_tune.alpha_applies_to" not in header(recipe, {"step": 4}, "comfyui", modules=["blocks.0.attn1.to_q"])


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "tiny-ti2v", "wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p",
                                  "wan2.2-ti2v-5b", "wan2.2-i2v-a14b"])
def test_module_widths_are_the_models_own(name):
    from diffusers import WanTransformer3DModel

    from wan_tune.models.lora_targets import module_widths
    from wan_tune.models.variants import VARIANTS

    with torch.device("meta"):
        model = WanTransformer3DModel(**VARIANTS[name].transformer)
    real = {n: (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else None
            for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))}
    assert module_widths(VARIANTS[name]) == real
