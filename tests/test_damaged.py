"""Damaged state: a broken newest checkpoint is named and passed over; malformed safetensors files
given to a command get one line that names them, never a traceback."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
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
    assert "skipped step-000004 (trainable.safetensors is 65,632 bytes, 131,264 when saved (cut off" in out
    assert "resuming from step-000002" in out
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


def _shard_recipe(tiny_folders, shards_root: Path, source: Path):
    from wan_tune.config import load_recipe

    return load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "demo-tiny.yaml",
                       [f"model.path={tiny_folders['tiny']}", f"data.source={source}", f"data.shards={shards_root}",
                        "data.shard_dtype=fp32", "data.frames=[9]", "validation.every=0", "data.samples_per_shard=2"])


def _train_cli(tiny_folders, shards_root: Path, out: Path, capsys, workers: int = 0) -> tuple[int, str]:
    args = [f"{k}={v}" for k, v in {**dict(o.split("=", 1) for o in _overrides(tiny_folders, shards_root, out)),
                                     "train.steps": "4", "checkpoint.every": "1000",  # one epoch: every sample
                                     "data.num_workers": str(workers)}.items()]
    code = main(["train", str(Path(__file__).resolve().parents[1] / "recipes" / "demo-tiny.yaml"), *args])
    return code, capsys.readouterr().err.strip()


def _overrides(tiny_folders, shards_root, out):
    from test_train import overrides

    return overrides(tiny_folders, {"tiny": shards_root}, out)


def test_damaged_shards_stop_training_by_name_and_prep_mends_them(tiny_folders, tiny_shards, tmp_path, capsys):
    import pandas as pd
    from test_prep import _same_samples

    from data_prep.prep import run_prep
    from wan_tune.data import shards

    pristine, root = tiny_shards["tiny"], tmp_path / "shards"
    source = pristine.parent / "clips"
    run_prep(_shard_recipe(tiny_folders, root, source), progress=False, say=_quiet)  # as tiny_shards, 2 samples a file
    files = sorted((root / "data").glob("rank0-*.safetensors"))
    flipped, truncated = files[0], files[-1]
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0x10  # one bit in the last tensor's bytes: the header still reads
    flipped.write_bytes(bytes(data))

    code, err = _train_cli(tiny_folders, root, tmp_path / "t1", capsys, workers=1)  # raised in a loader worker
    assert code == 1 and str(flipped) in err and "does not match its checksum" in err and "--verify" in err, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"wan-tune train: {flipped}: sample "), err  # one line

    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    code, err = _train_cli(tiny_folders, root, tmp_path / "t2", capsys)  # found before the first step, by its header
    assert code == 1 and f"{truncated} is damaged" in err and len(err.splitlines()) == 1, err

    # Foreign files are left alone and never read; a lost index is rebuilt; --verify finds the flipped bit.
    (root / "data" / "notes.txt").write_text("shot list")
    shutil.copy(files[1], root / "data" / "rank0-00001 copy.safetensors")
    pd.DataFrame({"x": [1]}).to_parquet(root / "index" / "mine.parquet")
    (root / shards.INDEX_FILE).unlink()
    code, err = _train_cli(tiny_folders, root, tmp_path / "t3", capsys)
    assert code == 1 and f"{shards.INDEX_FILE} missing" in err and "rerun `wan-tune prep`" in err, err
    said: list[str] = []
    run_prep(_shard_recipe(tiny_folders, root, source), progress=False, say=said.append)
    assert any(f"damaged shard file data/{truncated.name} (does not open" in s for s in said), said
    assert not any(flipped.name in s for s in said)  # a header check cannot see a flipped bit
    run_prep(_shard_recipe(tiny_folders, root, source), progress=False, say=said.append, verify=True)
    assert any(f"damaged shard file data/{flipped.name} (sample" in s and "checksum" in s for s in said), said
    assert any("left alone" in s and "data/notes.txt" in s and "index/mine.parquet" in s for s in said), said
    assert (root / "data" / "notes.txt").exists() and (root / "data" / "rank0-00001 copy.safetensors").exists()
    _same_samples(pristine, root)  # re-encoded: the same samples, bit for bit as far as fp32 encodes go
    code, err = _train_cli(tiny_folders, root, tmp_path / "t4", capsys)
    assert code == 0, err

    # A file rewritten without one of its samples (a valid header): named by the reader and by prep's check.
    from safetensors.torch import load_file, save_file

    index = pd.read_parquet(root / shards.INDEX_FILE)
    row = index.iloc[0]
    kept = {k: v for k, v in load_file(root / row["file"]).items() if not k.startswith(f"{row['id']}/")}
    save_file(kept, root / row["file"])
    with pytest.raises(shards.ShardFormatError, match=f"sample {row['id']} is in index.parquet but not in the file"):
        shards.ShardReader(root).tensors(0)
    rows = list(index[index["file"] == row["file"]].itertuples())
    assert shards.file_damage(root, row["file"], rows) == f"sample {row['id']} missing"


@contextmanager
def read_only(folder: Path):
    """`folder` made unwritable even for root (immutable attribute); skips where that is impossible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("root here cannot make a folder read-only (chattr +i refused)")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


def test_a_read_only_output_folder_fails_at_the_start_with_its_name(tiny_folders, tiny_shards, tmp_path, capsys):
    from test_train import overrides

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "demo-tiny.yaml")
    with read_only(tmp_path / "ro") as ro:
        assert main(["train", recipe, *overrides(tiny_folders, tiny_shards, ro), "train.steps=1"]) == 1
        err = capsys.readouterr().err.strip()
        assert f"run.output_dir: cannot write in {ro}/runs" in err and len(err.splitlines()) == 1, err
        assert main(["prep", recipe, f"model.path={tiny_folders['tiny']}", f"data.source={tiny_shards['tiny'].parent / 'clips'}",
                     f"data.shards={ro / 'shards'}"]) == 1
        err = capsys.readouterr().err.strip()
        assert f"data.shards: cannot write in {ro}/shards" in err and len(err.splitlines()) == 1, err


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_folders, tiny_shards, tmp_path):
    """The disk fills while step 4 is saved: the run stops with the reason, step 2 is whole, no
    temporary is left, and the rerun ends with the weights of a run that never failed."""
    from test_train import overrides

    run = {**RUN, "train.steps": "4"}
    straight = train(demo(tiny_folders, tiny_shards, tmp_path / "a", **run), progress=False, say=_quiet)
    train(demo(tiny_folders, tiny_shards, tmp_path / "b", **{**run, "train.steps": "2"}), progress=False, say=_quiet)
    run_dir = tmp_path / "b" / "runs" / "demo-tiny"
    weights = run_dir / "step-000002" / "trainable.safetensors"
    before = weights.read_bytes()

    def small_files() -> None:  # every file this process writes stops growing at 16 KiB: a disk that is full
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    assert weights.stat().st_size > 16 << 10  # so the limit lands inside the save, not before it
    cmd = [sys.executable, "-m", "wan_tune.cli", "train", str(Path(__file__).resolve().parents[1] / "recipes" / "demo-tiny.yaml"),
           *overrides(tiny_folders, tiny_shards, tmp_path / "b"), *(f"{k}={v}" for k, v in run.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "could not save step-000004" in err and "File too large" in err and "still step-000002" in err, err
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".step", "step"))) == ["step-000002"]
    assert weights.read_bytes() == before

    resumed = train(demo(tiny_folders, tiny_shards, tmp_path / "b", **run), progress=False, say=_quiet)
    a = load_file(Path(straight["checkpoint"]) / "trainable.safetensors")
    b = load_file(Path(resumed["checkpoint"]) / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
