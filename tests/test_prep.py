"""The prep stage end to end on generated clips and the tiny models: shards, resume, bad input."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, UMT5EncoderModel

from data_prep.encode import denormalize_latents
from data_prep.prep import run_prep
from wan_tune.media.synthetic import make_clips, moving_shape, still_image, write_video
from wan_tune.config import load_recipe
from wan_tune.data import shards

ROOT = Path(__file__).resolve().parents[1]


def recipe_for(tiny_folders, source, out, variant="tiny", *overrides):
    return load_recipe(
        ROOT / "recipes" / "demo-tiny.yaml",
        [
            f"model.variant={variant}",
            f"model.path={tiny_folders[variant]}",
            f"data.source={source}",
            f"data.shards={out}",
            "data.shard_dtype=fp32",
            "data.frames=[5,9]",
            "data.samples_per_shard=2",
            "validation.every=0",  # the demo's validation prompts have no first frames for I2V variants
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    """3 landscape clips (24 fps), 1 portrait clip, 1 short clip, 2 images; all captioned."""
    root = tmp_path_factory.mktemp("footage")
    make_clips(root, 3, frames=30, height=96, width=128, fps=24)  # 1.25 s -> 20 frames at 16 fps
    write_video(root / "portrait.mp4", moving_shape(20, 128, 96, "ring", "blue", 7), fps=16)
    (root / "portrait.txt").write_text("wtune style, a tall blue ring")
    write_video(root / "short.mp4", moving_shape(7, 96, 128, seed=3), fps=16)  # 7 frames: bucket 5 only
    (root / "short.txt").write_text("wtune style, a short clip")
    for i in range(2):
        still_image(root / f"still_{i}.png", 96, 128, seed=i)
        (root / f"still_{i}.txt").write_text(f"wtune style, still number {i}")
    return root


def index_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / shards.INDEX_FILE)


def test_mixed_folder_becomes_shards(tiny_folders, footage, tmp_path):
    out = tmp_path / "shards"
    summary = run_prep(recipe_for(tiny_folders, footage, out), progress=False, say=lambda *_: None)
    index = index_of(out)
    # 3 landscape clips x 2 windows of 9 (max_clips_per_video=2), portrait 2 x 9, short 1 x 5, 2 stills.
    assert summary["buckets"] == {"9x64x96": 6, "9x96x64": 2, "5x64x96": 1, "1x64x96": 2}
    assert len(index) == 11 and index["id"].is_unique
    assert summary["skips"] == []
    meta = shards.read_meta(out)
    assert meta["variant"] == "tiny" and meta["task"] == "t2v" and len(meta["vae"]["latents_std"]) == 16

    # Latents decode back through the tiny VAE to the bucket's pixel shape.
    vae = AutoencoderKLWan.from_pretrained(tiny_folders["tiny"], subfolder="vae")
    reader = shards.ShardReader(out)
    for i, row in enumerate(reader.index.itertuples()):
        latents = reader.tensors(i)["latents"]
        assert latents.shape == (16, (row.frames - 1) // 4 + 1, row.height // 8, row.width // 8)
    row = reader.index[reader.index["frames"] == 9].index[0]
    with torch.no_grad():
        video = vae.decode(denormalize_latents(reader.tensors(row)["latents"][None], vae)).sample
    assert video.shape == (1, 3, 9, reader.row(row)["height"], reader.row(row)["width"])

    # Stored text embeddings equal a direct umT5 call on the real tokens.
    tokenizer = AutoTokenizer.from_pretrained(tiny_folders["tiny"], subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(tiny_folders["tiny"], subfolder="text_encoder").eval()
    for i in range(len(reader)):
        ids = tokenizer(reader.row(i)["caption"], return_tensors="pt")
        with torch.no_grad():
            direct = encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
        stored = reader.tensors(i)["text"]
        assert stored.shape == direct.shape and reader.row(i)["text_len"] == direct.shape[0]
        torch.testing.assert_close(stored, direct, rtol=0, atol=1e-5)
    empty = reader.empty_prompt()
    assert empty.shape == (1, 32)  # "" is just </s>

    # The index opens with `datasets` for review and filtering.
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / shards.INDEX_FILE), split="train")
    assert sorted(ds["caption"]) == sorted(index["caption"])


def test_rerun_skips_done_work_and_changed_settings_reencode(tiny_folders, footage, tmp_path):
    out = tmp_path / "shards"
    run_prep(recipe_for(tiny_folders, footage, out), progress=False, say=lambda *_: None)
    first = index_of(out)
    files = sorted(p.name for p in (out / "data").iterdir())
    said = []
    run_prep(recipe_for(tiny_folders, footage, out), progress=False, say=said.append)
    assert any("11 already encoded, 0 to encode" in s for s in said)
    assert sorted(p.name for p in (out / "data").iterdir()) == files  # nothing rewritten
    pd.testing.assert_frame_equal(index_of(out), first)

    said.clear()
    summary = run_prep(recipe_for(tiny_folders, footage, out, "tiny", "data.frames=[5]"), progress=False, say=said.append)
    assert any("prep settings changed" in s and "frames" in s for s in said)
    assert set(summary["buckets"]) == {"5x64x96", "5x96x64", "1x64x96"}  # stills keep their ids
    assert summary["stale"] == 8  # the 9-frame samples are left out of the index, not mixed in
    assert len(index_of(out)) == 11  # 5-frame windows of 5 clips x 2, the short clip's (kept), 2 stills (kept)
    assert set(index_of(out)["frames"]) == {1, 5}


def _prep_cmd(tiny_folders, footage, out, *extra):
    return [
        sys.executable, "-m", "wan_tune.cli", "prep", str(ROOT / "recipes" / "demo-tiny.yaml"),
        f"model.path={tiny_folders['tiny']}", f"data.source={footage}", f"data.shards={out}",
        "data.shard_dtype=fp32", "data.frames=[5,9]", "data.samples_per_shard=1", *extra,
    ]


def _same_samples(a: Path, b: Path) -> None:
    ia, ib = index_of(a), index_of(b)
    cols = [c for c in shards.COLUMNS if c != "file"]
    pd.testing.assert_frame_equal(ia[cols], ib[cols])
    ra, rb = shards.ShardReader(a), shards.ShardReader(b)
    for i in range(len(ra)):
        ta, tb = ra.tensors(i), rb.tensors(i)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_random_kills_then_rerun_give_the_uninterrupted_index(tiny_folders, footage, tmp_path):
    """SIGKILL prep at random moments (each rerun goes on from what the last one finished, and
    may itself be killed): the final index and shards equal an uninterrupted run's, no temporary left."""
    import random

    rng = random.Random(14)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_prep_cmd(tiny_folders, footage, clean), check=True, capture_output=True, env=env)

    def parts() -> int:
        return len(list((killed / "index").glob("*.parquet")))

    for _ in range(3):
        target = min(10, parts() + rng.randint(1, 4))
        proc = subprocess.Popen(_prep_cmd(tiny_folders, footage, killed), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and parts() < target and proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.05))  # a random moment: between files, or inside a write
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, "prep finished before the kill"
        assert not (killed / shards.INDEX_FILE).exists()
        written = parts()
        assert written < 11, "the kill did not land midway"
    rerun = subprocess.run(_prep_cmd(tiny_folders, footage, killed), capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{written} already encoded" in rerun.stdout or f"{written + 1} already encoded" in rerun.stdout
    _same_samples(clean, killed)
    index = index_of(killed)
    assert index["id"].is_unique
    on_disk = sorted(p.name for p in (killed / "data").iterdir())
    assert on_disk == sorted(Path(f).name for f in index["file"])  # no orphan, no temporary
    assert not list(killed.rglob("*.tmp"))


@pytest.mark.slow
def test_two_process_prep_equals_one_process(tiny_folders, footage, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_prep_cmd(tiny_folders, footage, one), check=True, capture_output=True)
    cmd = _prep_cmd(tiny_folders, footage, two)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "data_prep", *cmd[4:]]
    proc = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name.split("-")[0] for p in (two / "data").iterdir()}
    assert files == {"rank0", "rank1"}  # each rank wrote its own files
    _same_samples(one, two)


def _broken_inputs(root: Path, good_from: Path) -> dict[str, str]:
    """Each kind of bad input, with the words its report line must contain."""
    for p in good_from.iterdir():
        if p.name.startswith("clip_000") or p.name.startswith("still_0"):
            shutil.copy(p, root / p.name)
    (root / "zero.mp4").write_bytes(b"")
    (root / "notvideo.mp4").write_text("this is not a video")
    data = write_video(root / "full.mp4", moving_shape(40, 96, 128), fps=16).read_bytes()
    (root / "full.mp4").unlink()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    write_video(root / "tooshort.mp4", moving_shape(3, 96, 128), fps=16)
    os.symlink(root / "gone.mp4", root / "unreadable.mp4")
    write_video(root / "slowfps.mp4", moving_shape(4, 96, 128), fps=0.5)
    write_video(root / "tiny.mp4", moving_shape(20, 16, 16), fps=16)
    write_video(root / "extreme.mp4", moving_shape(20, 32, 640), fps=16)
    write_video(root / "nocaption.mp4", moving_shape(20, 96, 128), fps=16)
    (root / "corrupt_uncaptioned.mp4").write_bytes(data[:200])  # its defect is reported, not its missing caption
    frames = [Image.fromarray(f) for f in moving_shape(6, 96, 128)]
    frames[0].save(root / "style.gif", save_all=True, append_images=frames[1:], duration=62, loop=0)
    _audio_only(root / "voiceover.mp4")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "badimage.png")
    (root / "badimage.png").write_bytes((root / "badimage.png").read_bytes()[:20])
    for name in ("zero", "notvideo", "truncated", "tooshort", "unreadable", "slowfps", "tiny", "extreme", "badimage", "style",
                 "voiceover"):
        (root / f"{name}.txt").write_text("wtune style, broken")
    return {
        "zero.mp4": "empty file",
        "notvideo.mp4": "not a readable video",
        "truncated.mp4": "not a readable video",
        "tooshort.mp4": "too short",
        "unreadable.mp4": "cannot read",
        "slowfps.mp4": "unusable frame rate",
        "tiny.mp4": "too small",
        "extreme.mp4": "extreme aspect ratio",
        "nocaption.mp4": "missing caption",
        "badimage.png": "not a readable image",
        "corrupt_uncaptioned.mp4": "not a readable video",
        "voiceover.mp4": "no video stream",
        "notes.pdf": "unsupported type: .pdf",
    }


def _audio_only(path: Path) -> None:
    """An mp4 with one AAC audio stream and no video, as a voice-over export is."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 400, 16000)) * 0.3).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_every_broken_input_is_reported_and_good_ones_land(tiny_folders, footage, tmp_path, capsys):
    from wan_tune.cli import main

    src = tmp_path / "mixed"
    src.mkdir()
    expected = _broken_inputs(src, footage)
    out = tmp_path / "shards"
    args = ["prep", str(ROOT / "recipes" / "demo-tiny.yaml"), f"model.path={tiny_folders['tiny']}",
            f"data.source={src}", f"data.shards={out}", "data.frames=[5,9]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    with open(out / "prep_report.csv", newline="") as f:
        report = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert set(report) == set(expected)
    for name, words in expected.items():
        assert words in report[name], (name, report[name])
    index = index_of(out)
    assert sorted(set(index["source"])) == ["clip_000.mp4", "still_0.png", "style.gif"]  # every good input landed
    assert f"skipped inputs: {len(expected)}" in printed and "too short" in printed

    # --strict turns any skip into a failure, before anything is encoded.
    strict_out = tmp_path / "strict"
    assert main(args[:-2] + [f"data.shards={strict_out}", "data.frames=[5,9]", "--strict"]) == 1
    assert not (strict_out / "data").exists() or not list((strict_out / "data").iterdir())


def test_nothing_encodable_exits_non_zero(tiny_folders, tmp_path):
    from wan_tune.cli import main

    src = tmp_path / "bad"
    src.mkdir()
    (src / "zero.mp4").write_bytes(b"")
    (src / "zero.txt").write_text("x")
    assert main(["prep", str(ROOT / "recipes" / "demo-tiny.yaml"), f"model.path={tiny_folders['tiny']}",
                 f"data.source={src}", f"data.shards={tmp_path / 'out'}"]) == 1


def test_i2v_conditioning_equals_the_diffusers_pipeline(tiny_folders, footage, tmp_path):
    out = tmp_path / "shards"
    run_prep(recipe_for(tiny_folders, footage, out, "tiny-i2v", "data.frames=[9]"), progress=False, say=lambda *_: None)
    reader = shards.ShardReader(out)
    assert reader.meta["task"] == "i2v"
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_folders["tiny-i2v"])
    i = int(reader.index.index[reader.index["frames"] == 9][0])
    row, stored = reader.row(i), reader.tensors(i)
    from data_prep.buckets import resize_crop
    from data_prep.video import plan_windows
    from wan_tune.media.footage import probe, read_frames

    # Rebuild the clip's first frame the way prep cut it, then let the pipeline condition on it.
    path = str(footage / row["source"])
    window = [w for w in plan_windows(probe(path, False), 16, [9], 0, 2) if w.start_frame == row["start_frame"]][0]
    video = resize_crop(read_frames(path, window, False), (row["height"], row["width"]))
    first = Image.fromarray(((video[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    image = pipe.video_processor.preprocess(first, height=row["height"], width=row["width"])
    _, condition = pipe.prepare_latents(image, 1, 16, row["height"], row["width"], 9, torch.float32, torch.device("cpu"))
    embeds = pipe.encode_image(first, torch.device("cpu"))
    assert stored["condition"].shape == (20, 3, row["height"] // 8, row["width"] // 8)
    torch.testing.assert_close(stored["condition"], condition[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(stored["image_embeds"], embeds[0], rtol=0, atol=1e-5)
    with safe_open(str(out / row["file"]), "pt") as f:
        assert f.metadata()["format_version"] == str(shards.FORMAT_VERSION)


def test_clips_added_after_captioning_use_their_sidecars(tiny_folders, footage, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(footage, src)
    out = tmp_path / "shards"
    first = run_prep(recipe_for(tiny_folders, src, out), progress=False, say=lambda *_: None)
    write_video(src / "late.mp4", moving_shape(20, 96, 128, seed=9), fps=16)
    (src / "late.txt").write_text("wtune style, a late addition")
    second = run_prep(recipe_for(tiny_folders, src, out), progress=False, say=lambda *_: None)
    assert second["samples"] == first["samples"] + 2 and second["skips"] == []
    assert "wtune style, a late addition" in set(index_of(out)["caption"])


def test_a_clip_deleted_during_prep_is_one_report_line(tmp_path):
    """#33: each of its windows failed alike, one report line each."""
    from data_prep.prep import Sample, Timer, _encode_one
    from data_prep.sources import SourceItem
    from wan_tune.media.footage import Window

    from wan_tune.config.sources import data_sources

    gone = SourceItem(str(tmp_path / "clip.mp4"), "clip.mp4")
    source = data_sources(load_recipe(None, [f"data.source={tmp_path}"]))[0]
    skips = []
    for start in (0, 9, 18):
        window = Window(start, tuple(range(start, start + 9)), start / 16, (start + 9) / 16)
        _encode_one(Sample(f"id{start}", gone, window, (9, 64, 96), "a caption", source), None, None, False, skips, Timer(), {}, 0.0)
    assert len(skips) == 1 and skips[0][0] == "clip.mp4", skips
