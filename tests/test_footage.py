"""Footage as phones, cameras and editors write it, and manifests as people write them.

Every file is made here with PyAV (no ffmpeg binary): rotation metadata, variable frame rate,
10-bit, HEVC, ProRes, VP9 with alpha, audio beside video, two video streams, interlaced, 4K,
60 fps, odd names, bad sidecars; then one prep run shows which land (in which bucket) and that
the rest are skipped with a reason naming the real defect.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.prep import run_prep
from data_prep.sources import discover
from data_prep.summary import reason_kind
from wan_tune.media.synthetic import moving_shape, write_video
from data_prep.video import plan_windows
from wan_tune.media.footage import probe, read_frames
from footage_kinds import encode
from test_prep import index_of, recipe_for


def encode_vp9_alpha(path: Path, seed: int) -> Path:
    """VP9 with an alpha plane, written by a fresh process: once decord (which bundles its own
    libvpx) is loaded, PyAV's libvpx-vp9 encoder refuses to open in the same process (seen when
    this module ran after the demo's tests)."""
    code = (f"import sys; from pathlib import Path; sys.path[:0] = [{str(Path(__file__).parent)!r}]; "
            "from footage_kinds import encode; from wan_tune.media.synthetic import moving_shape; "
            f"encode(Path({str(path)!r}), moving_shape(12, 96, 128, 'square', 'yellow', seed={seed}), "
            "codec='libvpx-vp9', pix_fmt='yuva420p')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return path


def flat_frames(levels) -> np.ndarray:
    """Frames of one grey level each: a decoded frame's mean tells which source frame it was."""
    return np.stack([np.full((96, 128, 3), v, np.uint8) for v in levels])


# 20 frames at 10 fps, then 20 at 40 fps: the average rate (15 fps) is right nowhere.
VFR_PTS = [i * 100 for i in range(20)] + [2000 + i * 25 for i in range(20)]


def vfr_frame_at(t: float) -> int:
    return max(i for i, p in enumerate(VFR_PTS) if p <= t * 1000 + 1e-3)


@pytest.fixture(scope="module")
def camera_folder(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """(folder, {file: bucket it must land in}, {file: words its skip reason must hold})."""
    root = tmp_path_factory.mktemp("camera")
    clip = moving_shape(12, 96, 128, "square", "yellow", seed=5)
    lands = {
        # A phone held upright: coded landscape 128x96, displayed portrait through its rotation.
        "IMG 0001 été.MOV": (encode(root / "IMG 0001 été.MOV", clip, rotation=-90), "9x96x64"),
        "ten_bit.mp4": (encode(root / "ten_bit.mp4", clip, pix_fmt="yuv420p10le"), "9x64x96"),
        "hevc.mp4": (encode(root / "hevc.mp4", clip, codec="libx265", options={"x265-params": "log-level=error"}), "9x64x96"),
        "prores.mov": (encode(root / "prores.mov", clip, codec="prores_ks", pix_fmt="yuv422p10le"), "9x64x96"),
        "alpha.webm": (encode_vp9_alpha(root / "alpha.webm", seed=5), "9x64x96"),
        "with_audio.mp4": (encode(root / "with_audio.mp4", clip, audio=True), "9x64x96"),
        "two_streams.mkv": (encode(root / "two_streams.mkv", clip, second_video=True), "9x64x96"),
        "interlaced.mp4": (encode(root / "interlaced.mp4", clip, options={"flags": "+ilme+ildct", "x264-params": "interlaced=1"}), "9x64x96"),
        "sixty.mp4": (encode(root / "sixty.mp4", moving_shape(40, 96, 128, seed=6), fps=60), "9x64x96"),
        # 4K UHD, 5 frames: lands in the 5-frame bucket, resized in chunks.
        "uhd.mp4": (encode(root / "uhd.mp4", np.repeat(np.repeat(moving_shape(5, 54, 96, seed=7), 40, 1), 40, 2)), "5x64x96"),
        "vfr.mp4": (encode(root / "vfr.mp4", flat_frames(range(0, 240, 6)), pts_ms=VFR_PTS), "9x64x96"),
        "bom.mp4": (write_video(root / "bom.mp4", clip, fps=16), "9x64x96"),
        "loop.gif": (write_gif(root / "loop.gif", flat_frames(range(0, 240, 20))), "9x64x96"),
    }
    for name, (path, _) in lands.items():
        path.with_suffix(".txt").write_text(f"wtune style, {name}", encoding="utf-8")
    (root / "bom.txt").write_bytes("\ufeffwtune style, saved by Notepad".encode("utf-8"))
    skipped = {"short.mp4": "too short", "empty_caption.mp4": "caption file empty_caption.txt is empty",
               "latin1.mp4": "caption file latin1.txt is not UTF-8 text (byte 0xe9"}
    write_video(root / "short.mp4", moving_shape(4, 96, 128), fps=16)
    (root / "short.txt").write_text("wtune style, four frames")
    write_video(root / "empty_caption.mp4", clip, fps=16)
    (root / "empty_caption.txt").write_text("  \n")
    write_video(root / "latin1.mp4", clip, fps=16)
    (root / "latin1.txt").write_bytes("wtune style, caf\u00e9 au lait".encode("latin-1"))
    return root, {name: bucket for name, (_, bucket) in lands.items()}, skipped


def test_camera_footage_lands_and_the_rest_names_its_defect(tiny_folders, camera_folder, tmp_path):
    root, lands, skipped = camera_folder
    out = tmp_path / "shards"
    summary = run_prep(recipe_for(tiny_folders, root, out, "tiny", "data.max_clips_per_video=1"), progress=False,
                       say=lambda *_: None)
    index = index_of(out)
    landed = {row.source: f"{row.frames}x{row.height}x{row.width}" for row in index.itertuples()}
    assert landed == lands
    assert index.set_index("source").loc["bom.mp4", "caption"] == "wtune style, saved by Notepad"  # no BOM in the text
    with open(out / "prep_report.csv", newline="", encoding="utf-8") as f:
        report = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert set(report) == set(skipped)
    for name, words in skipped.items():
        assert words in report[name], (name, report[name])
    assert reason_kind(report["short.mp4"]) == "too short" and len(summary["skips"]) == 3


def test_a_rotated_phone_clip_decodes_upright(camera_folder):
    root, _, _ = camera_folder
    source = moving_shape(12, 96, 128, "square", "yellow", seed=5)
    info = probe(str(root / "IMG 0001 été.MOV"), False)
    assert (info.height, info.width) == (128, 96)
    window = plan_windows(info, 16, [9], 0, 1)[0]
    frames = read_frames(str(root / "IMG 0001 été.MOV"), window, False).astype(np.float32)
    upright = np.rot90(source[: window.frames], k=-1, axes=(1, 2)).astype(np.float32)  # -90: a quarter turn clockwise
    wrong = np.rot90(source[: window.frames], k=1, axes=(1, 2)).astype(np.float32)
    assert np.abs(frames - upright).mean() < 4 < np.abs(frames - wrong).mean()


def test_variable_frame_rate_follows_the_timestamps(camera_folder):
    root, _, _ = camera_folder
    info = probe(str(root / "vfr.mp4"), False)
    assert info.times is not None and info.duration == pytest.approx(2.5)
    windows = plan_windows(info, 16, [9], 0, 4)
    for w in windows:
        expected = [vfr_frame_at(w.start_s + k / 16) for k in range(9)]
        assert list(w.indices) == expected
        levels = read_frames(str(root / "vfr.mp4"), w, False).reshape(9, -1).mean(1)
        np.testing.assert_allclose(levels, np.array(expected) * 6, atol=2)  # the frames themselves, not only indices
    # The footage does test something: indexing by the average rate would be frames off.
    by_average = [int((w.start_s + k / 16) * info.fps) for w in windows for k in range(9)]
    assert max(abs(a - b) for a, b in zip(by_average, [i for w in windows for i in w.indices])) >= 4


# An animated GIF's own timing: 6 frames of 40 ms, then 6 of 120 ms (0.96 s in all).
GIF_DELAYS_MS = [40] * 6 + [120] * 6


def write_gif(path: Path, frames: np.ndarray) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_DELAYS_MS, loop=0)
    return path


def test_an_animated_gif_is_cut_by_its_frame_delays(camera_folder):
    root, _, _ = camera_folder
    info = probe(str(root / "loop.gif"), False)
    assert info.frames == 12 and info.duration == pytest.approx(0.96)
    starts = np.cumsum([0] + GIF_DELAYS_MS[:-1]) / 1000
    window = plan_windows(info, 16, [9], 0, 1)[0]
    expected = [int(np.searchsorted(starts, k / 16 + 1e-6, side="right")) - 1 for k in range(9)]
    assert list(window.indices) == expected == [0, 1, 3, 4, 6, 6, 7, 7, 8]
    levels = read_frames(str(root / "loop.gif"), window, False).reshape(9, -1).mean(1)
    np.testing.assert_allclose(levels, np.array(expected) * 20, atol=3)


def write_manifest(folder: Path, rows: list[dict], name: str) -> Path:
    path = folder / name
    if name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_manifest_rows_each_get_a_reason_and_the_good_ones_land(tiny_folders, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "a.mp4", moving_shape(40, 96, 128, seed=1), fps=16)  # 2.5 s
    write_video(clips / "b.mp4", moving_shape(40, 96, 128, seed=2), fps=16)
    good = {"path": "clips/a.mp4", "caption": "wtune style, a", "start": 0.0, "end": 1.0}
    rows = [
        good,
        {"path": "clips/b.mp4", "caption": "wtune style, b", "start": 1.0, "end": 2.52},  # end rounds up: fine
        {"path": "clips/missing.mp4", "caption": "wtune style, gone", "start": "", "end": ""},
        {"path": "clips/a.mp4", "caption": "wtune style, backwards", "start": 2.0, "end": 1.0},
        {"path": "clips/a.mp4", "caption": "wtune style, negative", "start": -1.0, "end": 1.0},
        {"path": "clips/a.mp4", "caption": "wtune style, late", "start": 9.0, "end": ""},
        {"path": "clips/b.mp4", "caption": "wtune style, long", "start": 0.0, "end": 30.0},
        dict(good),
        {"path": "", "caption": "wtune style, nothing", "start": "", "end": ""},
        {"path": "clips/b.mp4", "caption": "wtune style, words", "start": "ten", "end": ""},
    ]
    manifest = write_manifest(tmp_path, rows, "clips.csv")
    out = tmp_path / "shards"
    summary = run_prep(recipe_for(tiny_folders, manifest, out, "tiny", "data.max_clips_per_video=1"), progress=False,
                       say=lambda *_: None)
    reasons = [r for _, r in summary["skips"]]
    expected = {3: "cannot read: file not found", 4: "start 2 s is not before end 1 s", 5: "negative start -1 s",
                6: "start 9 s is past the end of the video (2.50 s)", 7: "end 30 s is past the end of the video",
                8: "duplicate of row 1", 9: "no path given", 10: "start 'ten' is not a number"}
    assert len(reasons) == len(expected)
    for row, words in expected.items():
        assert any(r.startswith(f"manifest row {row}: ") and words in r for r in reasons), (row, words, reasons)
    index = index_of(out)
    assert sorted(index["caption"]) == ["wtune style, a", "wtune style, b"]  # nothing else lost
    assert index.set_index("caption").loc["wtune style, b", "start_s"] == pytest.approx(1.0)

    # No caption column: every row says so (not "no sidecar"), and a template still captions them.
    bare = write_manifest(tmp_path, [{"path": "clips/a.mp4"}, {"path": "clips/b.mp4"}], "bare.jsonl")
    items = discover(str(bare))
    assert [it.caption_problem for it in items] == ["the manifest has no caption column (looked for caption, text, prompt)"] * 2
    summary = run_prep(recipe_for(tiny_folders, bare, tmp_path / "bare", "tiny", f"data.captions={tmp_path / 'bare.csv'}"),
                       progress=False, say=lambda *_: None)
    assert summary["samples"] == 0
    assert all("missing caption: the manifest has no caption column" in r for _, r in summary["skips"])
    summary = run_prep(recipe_for(tiny_folders, bare, tmp_path / "templ", "tiny", "caption.mode=template",
                                  f"data.captions={tmp_path / 'templ.csv'}", "data.max_clips_per_video=1"),
                       progress=False, say=lambda *_: None)
    assert summary["samples"] == 2 and summary["skips"] == []
