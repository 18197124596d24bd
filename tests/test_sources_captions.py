"""Footage sources (folder, manifests, saved datasets) and the caption review file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from data_prep.captions import CaptionFileError, make_captions, read_captions
from data_prep.sources import SourceError, discover
from wan_tune.media.synthetic import make_clips, still_image, write_video, moving_shape
from wan_tune.config.schema import CaptionConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    make_clips(root, 2, frames=20)
    write_video(root / "sub" / "uncaptioned.mov", moving_shape(20, 64, 64), fps=16)
    still_image(root / "a.jpg", 64, 96)
    (root / "notes.md").write_text("not footage")
    return root


def test_folder_lists_videos_and_images_with_sidecars(clips):
    items = discover(str(clips))
    assert [i.name for i in items if i.supported] == ["a.jpg", "clip_000.mp4", "clip_001.mp4", "sub/uncaptioned.mov"]
    assert [i.name for i in items if not i.supported] == ["notes.md"]  # listed, so prep's report names it
    by_name = {i.name: i for i in items}
    assert by_name["clip_000.mp4"].caption.startswith("wtune style, a red circle")
    assert by_name["sub/uncaptioned.mov"].caption is None and by_name["a.jpg"].is_image


def test_manifests_and_saved_datasets_give_the_same_items(clips, tmp_path):
    rows = [
        {"path": "clip_000.mp4", "caption": "first", "start": 0.0, "end": 0.5},
        {"path": str(clips / "clip_001.mp4"), "caption": "second", "start": None, "end": None},
    ]
    (clips / "m.csv").write_text("path,caption,start,end\nclip_000.mp4,first,0,0.5\n" + f"{clips / 'clip_001.mp4'},second,,\n")
    (clips / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(clips / "m.parquet")
    import datasets

    datasets.Dataset.from_list([{**r, "path": str(clips / r["path"])} for r in rows]).save_to_disk(str(tmp_path / "ds"))
    for source in (clips / "m.csv", clips / "m.jsonl", clips / "m.parquet", tmp_path / "ds"):
        items = discover(str(source))
        assert [(Path(i.path).name, i.caption, i.start_s, i.end_s) for i in items] == [
            ("clip_000.mp4", "first", 0.0, 0.5),
            ("clip_001.mp4", "second", None, None),
        ], source
        assert items[0].key.endswith("#0-0.5")  # one caption per cut, not per file


def test_unusable_sources_say_what_is_wrong(clips, tmp_path):
    (tmp_path / "bad.csv").write_text("file_path,caption\nx.mp4,y\n")
    with pytest.raises(SourceError, match="no path column"):
        discover(str(tmp_path / "bad.csv"))
    with pytest.raises(SourceError, match="does not exist"):
        discover(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="data.source is empty"):
        discover(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no videos"):
        discover(str(tmp_path / "empty"))


def test_template_captions_and_reviewed_edits_survive_a_rerun(clips, tmp_path):
    items = discover(str(clips))
    out = tmp_path / "captions.csv"
    cfg = CaptionConfig(mode="template", trigger_word="acme", template="{trigger}, {caption}")
    counts = make_captions(items, cfg, out, progress=False)
    assert counts == {"template": 4}
    caps = read_captions(out)
    assert caps["clip_000.mp4"].startswith("acme, wtune style, a red circle")
    assert caps["sub/uncaptioned.mov"] == "acme"  # empty {caption} leaves no dangling comma

    rows = list(csv.DictReader(out.open()))
    rows[0]["caption"] = "edited by a person"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=rows[0].keys())
        w.writeheader()
        w.writerows(rows)
    assert make_captions(items, cfg, out, progress=False) == {"kept": 4}
    assert read_captions(out)[rows[0]["key"]] == "edited by a person"
    # A clip removed from the source keeps its reviewed row; a new clip gets one.
    assert make_captions(items[1:], cfg, out, progress=False) == {"kept": 3, "not in source": 1}
    assert read_captions(out)[rows[0]["key"]] == "edited by a person"
    cfg.overwrite = True
    make_captions(items, cfg, out, progress=False)
    assert read_captions(out)[rows[0]["key"]] != "edited by a person"


def test_vlm_captions_with_a_tiny_model(clips, tmp_path):
    from data_prep.vlm import save_tiny_vlm

    model = save_tiny_vlm(tmp_path / "vlm")
    (clips / "broken.mp4").write_bytes(b"nope")
    try:
        items = discover(str(clips))
        cfg = CaptionConfig(mode="vlm", trigger_word="acme", vlm_model=str(model), vlm_frames=3, vlm_batch_size=2, vlm_max_new_tokens=6)
        counts = make_captions(items, cfg, tmp_path / "c.csv", progress=False)
    finally:
        (clips / "broken.mp4").unlink()
    rows = {r["key"]: r for r in csv.DictReader((tmp_path / "c.csv").open())}
    assert counts["vlm"] == 4 and rows["broken.mp4"]["origin"].startswith("unreadable")
    for key in ("a.jpg", "clip_000.mp4", "sub/uncaptioned.mov"):
        assert rows[key]["caption"].startswith("acme, ") and len(rows[key]["caption"]) > len("acme, ")


def test_a_review_file_saved_by_a_spreadsheet(clips, tmp_path, capsys):
    """Excel's "CSV UTF-8" starts with a byte-order mark: it reads, edits and all. Its plain "CSV"
    (cp1252) and a renamed header are refused with the file named, in one line, not guessed at."""
    from wan_tune.cli import main

    items = discover(str(clips))
    out = tmp_path / "captions.csv"
    make_captions(items, CaptionConfig(mode="sidecar"), out, progress=False)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    rows[0]["caption"] = "wtune style, crème brûlée"

    def save(encoding: str, header=("key", "caption", "origin")) -> None:
        with out.open("w", newline="", encoding=encoding) as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([r["key"], r["caption"], r["origin"]] for r in rows)

    save("utf-8-sig")
    assert read_captions(out)[rows[0]["key"]] == "wtune style, crème brûlée"
    save("cp1252")
    with pytest.raises(CaptionFileError, match=r"is not UTF-8 \(byte 0xe8 at offset \d+\): save it as \"CSV UTF-8\""):
        read_captions(out)
    save("utf-8", header=("clip", "text", "origin"))
    with pytest.raises(CaptionFileError, match=r"no key or caption column \(its header is clip, text, origin"):
        read_captions(out)
    assert main(["caption", str(ROOT / "recipes" / "demo-tiny.yaml"), f"data.source={clips}", f"data.captions={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert str(out) in err and len(err.splitlines()) == 1, err
