"""Where footage comes from: a folder, a manifest (CSV / JSONL / Parquet) or a saved `datasets` dataset.

Every source becomes the same list of `SourceItem`s, so the rest of prep never asks which kind
it was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from wan_tune.config.sources import Source, data_sources
from wan_tune.media.footage import IMAGE_EXTS, VIDEO_EXTS
from wan_tune.media.vace_inputs import VaceInputs, from_record, split_sidecars

CAPTION_EXT = ".txt"  # sidecar captions: the only other files a footage folder is expected to hold
MAX_CAPTION_BYTES = 64 << 10  # a caption is at most 512 umT5 tokens, a few KB; anything far larger is the wrong file
PATH_COLUMNS = ("path", "video", "file", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text", "prompt")


class SourceError(ValueError):
    """The footage source itself is unusable (not a single bad file: those are skipped)."""


@dataclass(frozen=True)
class SourceItem:
    path: str
    """Absolute path of the video or image."""
    name: str
    """Path relative to the source (folder, manifest's folder, dataset): stable across machines."""
    caption: str | None = None
    """Caption given by the source (sidecar .txt or manifest column); None when there is none."""
    start_s: float | None = None
    end_s: float | None = None
    row: int | None = None
    """1-based data row of a manifest (header not counted), for the report; None for folder items."""
    problem: str | None = None
    """Why this item cannot be used whatever the file holds (a bad manifest row); None when it can."""
    caption_problem: str | None = None
    """Why the source gave no caption (an empty or undecodable sidecar, no caption column)."""
    vace: VaceInputs = VaceInputs()
    """VACE reference images, control video and mask given for this clip (sidecars or columns)."""
    alternates: tuple[str, ...] = ()
    """Further captions of the same clip (a sidecar's further lines, a manifest cell's further list items):
    each is encoded once and training draws one of them (with `caption`) per step."""
    prefix: str = ""
    """`<source name>/` for an item of a `data.sources` entry (the captions file and sample ids key it so); ""
    for `data.source`."""

    @property
    def captions(self) -> tuple[str, ...]:
        return (self.caption, *self.alternates) if self.caption else ()

    @property
    def supported(self) -> bool:
        """A video or image type prep reads; other files of a folder are listed so the report names them."""
        return Path(self.path).suffix.lower() in VIDEO_EXTS | IMAGE_EXTS

    @property
    def is_image(self) -> bool:
        return Path(self.path).suffix.lower() in IMAGE_EXTS

    @property
    def key(self) -> str:
        """One caption per item: the path, plus the time range when a manifest cuts one file several ways."""
        if self.start_s is None and self.end_s is None:
            return self.prefix + self.name
        return f"{self.prefix}{self.name}#{self.start_s or 0:g}-{'' if self.end_s is None else f'{self.end_s:g}'}"


def _sidecar(path: Path) -> tuple[tuple[str, ...], str | None]:
    """(captions, why there are none) from the .txt beside `path`: one caption a line (blank lines
    are left out), so a sidecar of three lines gives the clip three captions.

    A sidecar that is not UTF-8 is refused rather than decoded with replacement characters:
    a caption with mojibake trains on the mojibake."""
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return (), None
    size = txt.stat().st_size
    if size > MAX_CAPTION_BYTES:
        return (), (f"caption file {txt.name} is {size / 2**20:.1f} MB; a caption is at most 512 tokens (a few KB): "
                      "is it the right file?")
    raw = txt.read_bytes()
    try:
        text = raw.decode("utf-8-sig").strip()  # -sig: Notepad's byte-order mark is not caption text
    except UnicodeDecodeError as err:
        return (), (f"caption file {txt.name} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                      "save it as UTF-8")
    if not text:
        return (), f"caption file {txt.name} is empty; write the caption in it or in the captions file"
    return tuple(line.strip() for line in text.splitlines() if line.strip()), None


def _name(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _walk(folder: Path) -> list[Path]:
    """Every entry under `folder` that is not a folder, following linked folders (footage is often
    linked in from another disk) but never round a link loop; hidden entries are skipped."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree: walked already
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".")]
    return sorted(found)


def from_folder(folder: Path) -> list[SourceItem]:
    folder = folder.resolve()
    items = []
    footage, vace, orphans = split_sidecars([p for p in _walk(folder) if p.suffix.lower() != CAPTION_EXT])
    for path, why in orphans:
        items.append(SourceItem(str(path), _name(path, folder), problem=why))
    for path in footage:  # broken links and pipes too: each is reported, not ignored
        name = _name(path, folder)
        if path.exists() and not path.is_file():  # reading a named pipe would block prep for ever
            items.append(SourceItem(str(path), name, problem="not a regular file (a named pipe, socket or device); "
                                                             "prep reads video and image files"))
            continue
        # Every other file is an item: prep encodes it or its report says why not (a .pdf or
        # a .psd left out in silence looks like a bug to the person who put it there).
        captions, problem = _sidecar(path)
        items.append(SourceItem(str(path), name, captions[0] if captions else None, caption_problem=problem,
                                vace=vace.get(path, VaceInputs()), alternates=captions[1:]))
    return items


def _pick(columns, wanted: tuple[str, ...], what: str, where: str, required: bool = True) -> str | None:
    for name in wanted:
        if name in columns:
            return name
    if required:
        raise SourceError(f"{where}: no {what} column (looked for {', '.join(wanted)}; found {', '.join(map(str, columns))})")
    return None


class _BadValue(ValueError):
    pass


def _number(value, column: str) -> float | None:
    """A time in seconds; None for an empty cell, _BadValue for anything else that is not a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _BadValue(f"{column} {value!r} is not a number of seconds") from None
    return None if math.isnan(number) else number


def _window_problem(start: float | None, end: float | None) -> str | None:
    if start is not None and start < 0:
        return f"negative start {start:g} s"
    if end is not None and end <= 0:
        return f"end {end:g} s is not after the clip's start"
    if start is not None and end is not None and start >= end:
        return f"start {start:g} s is not before end {end:g} s"
    return None


def _cell_captions(value) -> tuple[str, ...]:
    """The captions of a manifest cell: a string is one caption; a list (JSONL, Parquet) several."""
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if value is not None and hasattr(value, "__iter__") and not isinstance(value, (bytes, dict)):
        return tuple(v.strip() for v in value if isinstance(v, str) and v.strip())
    return ()


def _from_records(records: list[dict], columns, where: str, base: Path) -> list[SourceItem]:
    """One item per row; a row that cannot be used still becomes an item, with its `problem`,
    so the report names it (with its row number) and every other row goes on."""
    path_col = _pick(columns, PATH_COLUMNS, "path", where)
    cap_col = _pick(columns, CAPTION_COLUMNS, "caption", where, required=False)
    no_caption = None if cap_col else f"the manifest has no caption column (looked for {', '.join(CAPTION_COLUMNS)})"
    items, first_row = [], {}
    for row, rec in enumerate(records, start=1):
        raw = rec.get(path_col)
        if not isinstance(raw, str) or not raw.strip():
            items.append(SourceItem("", f"{Path(where).name}:row-{row}", row=row, problem=f"no {path_col} given"))
            continue
        path = Path(raw.strip()).expanduser()
        if not path.is_absolute():
            path = base / path  # relative paths are relative to the manifest
        captions = _cell_captions(rec.get(cap_col)) if cap_col else ()
        caption = captions[0] if captions else None
        try:
            start, end = _number(rec.get("start"), "start"), _number(rec.get("end"), "end")
            problem = _window_problem(start, end)
        except _BadValue as err:
            start, end, problem = None, None, str(err)
        item = SourceItem(str(path), _name(path, base), caption, start, end, row=row, problem=problem,
                          caption_problem=no_caption, vace=from_record(rec, base), alternates=captions[1:])
        if problem is None and item.key in first_row:
            item = replace(item, problem=f"duplicate of row {first_row[item.key]} (same file and time range)")
        elif problem is None:
            first_row[item.key] = row
        items.append(item)
    return items


def from_manifest(path: Path) -> list[SourceItem]:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        else:
            frame = pd.read_parquet(path)
    except Exception as err:
        raise SourceError(f"{path}: cannot read the manifest ({err})") from None
    frame = frame.rename(columns={"start_s": "start", "end_s": "end"})
    return _from_records(frame.to_dict("records"), list(frame.columns), str(path), path.parent.resolve())


def from_dataset(path: Path) -> list[SourceItem]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise SourceError(f"{path}: cannot open the saved dataset ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return _from_records(ds.to_list(), ds.column_names, str(path), path.resolve())


def discover(source: str | None, key: str = "data.source", prefix: str = "") -> list[SourceItem]:
    """The items of one source (`key` names it in errors), sorted by key."""
    if not source:
        raise SourceError(f"{key} is empty: set it to a folder of clips, a manifest file or a saved dataset")
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"{key}: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".parquet"):
            raise SourceError(f"{key}: {path} is a file but not a CSV / JSONL / Parquet manifest")
        items = from_manifest(path)
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        items = from_dataset(path)
    else:
        items = from_folder(path)
    if not any(it.supported for it in items):
        raise SourceError(f"{key}: {path} holds no videos ({', '.join(sorted(VIDEO_EXTS))}) or images "
                          f"({', '.join(sorted(IMAGE_EXTS))})")
    if prefix:
        items = [replace(it, prefix=prefix) for it in items]
    return sorted(items, key=lambda it: it.key)


def source_key(recipe, i: int) -> str:
    """The recipe key that names source `i` in messages."""
    return f"data.sources[{i}].path" if recipe.data.sources else "data.source"


def discover_all(recipe) -> list[tuple[Source, list[SourceItem]]]:
    """Every source of the recipe with its items; the first of `source_problems` is raised."""
    sources = data_sources(recipe)
    if not sources:
        raise SourceError("data.source is empty: set it to a folder of clips, a manifest file or a saved dataset "
                          "(or list several in data.sources)")
    found = [(src, discover(src.path, source_key(recipe, i), src.prefix)) for i, src in enumerate(sources)]
    problems = _stills_given_frames(recipe, [(i, *pair) for i, pair in enumerate(found)])
    if problems:
        raise SourceError(": ".join(problems[0]))
    return found


def _stills_given_frames(recipe, found: list[tuple[int, Source, list[SourceItem]]]) -> list[tuple[str, str]]:
    """A source of stills alone given frame buckets above one (a still is a one-frame sample)."""
    out = []
    for i, src, items in found:
        given = recipe.data.sources[i].frames if src.listed else None
        if given and max(given) > 1 and all(it.is_image for it in items if it.supported):
            out.append((f"data.sources[{i}].frames", f"{src.name} holds only stills (each is a one-frame sample): "
                                                     "remove its frames"))
    return out


def source_problems(recipe) -> list[tuple[str, str]]:
    """(key, problem) of each source prep could not read: for `wan-tune check`, one line each."""
    problems, found = [], []
    for i, src in enumerate(data_sources(recipe)):
        try:
            found.append((i, src, discover(src.path, source_key(recipe, i), src.prefix)))
        except SourceError as err:
            key, _, why = str(err).partition(": ")
            problems.append((key, why))
    return problems + _stills_given_frames(recipe, found)
