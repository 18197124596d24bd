"""THE shard format: written by prep, read by the trainer. Writer and reader live here only.

```
<shards>/
  meta.json                  format version, variant, encoder identity, latent normalisation,
                             prep settings and their hash
  empty_prompt.safetensors   umT5 embedding of "" (caption dropout trains on it)
  data/rank{R}-{N}.safetensors   many samples each; tensors "<id>/latents", "<id>/text",
                             and for I2V "<id>/condition", "<id>/image_embeds"
  index/rank{R}-{N}.parquet  one row per sample of the data file of the same name
  index.parquet              all rows, merged after prep: `datasets.load_dataset("parquet", ...)`
                             or `pandas.read_parquet` open it to inspect and filter captions
```

Writes are atomic: a data file is written to a temporary name, flushed to disk and renamed;
its index part is written the same way only afterwards. A sample counts as done only once its
index part exists, so a killed prep never leaves a sample that is half there: a data file with
no index part is an orphan, deleted on the next run.

Each index row carries a CRC-32 of its sample's tensors: the reader checks it on every read,
so a byte flipped on disk stops training with the file named instead of training on it, and
`wan-tune prep --verify` finds such files and re-encodes them. Files in data/ or index/ that
prep did not name (a copy, a note) are left alone and never read.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .atomic import atomic_write, save_tensors, write_json

FORMAT_VERSION = 1
META_FILE = "meta.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
INDEX_FILE = "index.parquet"
DATA_DIR = "data"
PARTS_DIR = "index"

# Index columns, in order; `file` is relative to the shard folder.
COLUMNS = (
    "id", "source", "dataset", "caption", "frames", "height", "width", "start_frame", "start_s", "end_s", "text_len", "checksum",
    "file", "references", "vace", "captions",
)
_OWN_NAME = re.compile(r"rank(\d+)-(\d{5})")  # the stem of every data file and index part prep writes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ShardFormatError(RuntimeError):
    """The shard folder is missing, damaged or from another format version."""


def reference_count(tensors: dict[str, torch.Tensor]) -> int:
    """VACE reference images of a sample: the latent frames its context has before the clip's."""
    if "vace_context" not in tensors:
        return 0
    return int(tensors["vace_context"].shape[-3] - tensors["latents"].shape[-3])


def own_files(folder: Path, suffix: str, rank: int | None = None) -> list[Path]:
    """Files prep wrote in `folder` (rank{R}-{NNNNN}{suffix}), of one rank or all; others are foreign."""
    out = []
    for path in sorted(Path(folder).glob(f"*{suffix}")):
        m = _OWN_NAME.fullmatch(path.name[: -len(suffix)])
        if m and (rank is None or int(m.group(1)) == rank):
            out.append(path)
    return out


def foreign_files(root: str | os.PathLike) -> list[str]:
    """Files in data/ and index/ that prep did not write (its temporaries aside), relative to `root`."""
    root = Path(root)
    found = []
    for folder, suffix in ((DATA_DIR, ".safetensors"), (PARTS_DIR, ".parquet")):
        own = set(own_files(root / folder, suffix))
        found += [p.relative_to(root).as_posix() for p in sorted((root / folder).glob("*"))
                  if p not in own and not (p.name.startswith(".rank") and p.name.endswith(".tmp"))]
    return found


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def _by_sample(keys) -> dict[str, list[str]]:
    """{sample id: its tensor names} from a data file's "<id>/<tensor name>" keys."""
    names: dict[str, list[str]] = {}
    for key in keys:
        sid, name = key.split("/", 1)
        names.setdefault(sid, []).append(name)
    return names


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of a sample's tensors (names in order, then bytes), as 8 hex digits."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)  # bytes as stored, any dtype
    return f"{crc:08x}"


# --- meta ------------------------------------------------------------------------------------


def read_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise ShardFormatError(f"{root} holds no shards ({META_FILE} missing); run `wan-tune prep RECIPE` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise ShardFormatError(f"{path} is damaged ({_first_line(err)}); rerun `wan-tune prep RECIPE`: it writes "
                               f"{META_FILE} again (finished samples are kept)") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{path} is damaged (not a JSON object); rerun `wan-tune prep RECIPE`: it writes "
                               f"{META_FILE} again (finished samples are kept)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: shard format {meta.get('format_version')} but this wan-tune reads {FORMAT_VERSION}; rerun prep"
        )
    return meta


def write_meta(root: str | os.PathLike, meta: dict) -> None:
    write_json(Path(root) / META_FILE, {**meta, "format_version": FORMAT_VERSION})


# --- writing ---------------------------------------------------------------------------------


@dataclass
class ShardWriter:
    """Buffers samples of one rank and writes them `per_file` at a time."""

    root: Path
    rank: int
    per_file: int
    dtype: torch.dtype = torch.bfloat16
    _rows: list[dict] = field(default_factory=list)
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _next: int = 0
    written: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / DATA_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        taken = [int(p.stem.split("-")[1]) for p in own_files(self.root / PARTS_DIR, ".parquet", self.rank)]
        self._next = max(taken, default=-1) + 1

    def _remove_orphans(self) -> None:
        """Data files of this rank that never got their index part, and temporaries, from a killed run."""
        indexed = {p.stem for p in own_files(self.root / PARTS_DIR, ".parquet", self.rank)}
        for path in own_files(self.root / DATA_DIR, ".safetensors", self.rank):
            if path.stem not in indexed:
                path.unlink()
        for folder in (DATA_DIR, PARTS_DIR):
            for tmp in (self.root / folder).glob(f".rank{self.rank}-*.tmp"):
                tmp.unlink()

    def add(self, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(COLUMNS) - {"file", "text_len", "checksum", "references", "vace", "dataset", "captions"} - set(row)
        if missing:
            raise ValueError(f"sample row lacks {sorted(missing)}")
        sid = row["id"]
        # clone: samples of one caption share a cached text tensor; safetensors refuses shared memory
        # (integer tensors, Animate's 8-bit face frames, keep their dtype)
        stored = {name: t.detach().to("cpu", self.dtype if t.is_floating_point() else t.dtype).clone()
                  for name, t in tensors.items()}
        self._rows.append({**row, "text_len": int(tensors["text"].shape[0]), "checksum": checksum(stored),
                           "references": reference_count(tensors), "vace": row.get("vace", ""),
                           "dataset": row.get("dataset", "default"),
                           "captions": 1 + sum(name.startswith("text.") for name in tensors)})
        for name, t in stored.items():
            self._tensors[f"{sid}/{name}"] = t
        if len(self._rows) >= self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        import pandas as pd

        name = f"rank{self.rank}-{self._next:05d}"
        data_path = self.root / DATA_DIR / f"{name}.safetensors"
        save_tensors(data_path, self._tensors, {"format_version": str(FORMAT_VERSION)})
        rows = [{**r, "file": f"{DATA_DIR}/{name}.safetensors"} for r in self._rows]
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        atomic_write(self.root / PARTS_DIR / f"{name}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
        self.written.append(data_path)
        self._rows, self._tensors = [], {}
        self._next += 1

    def close(self) -> None:
        self.flush()


def save_empty_prompt(root: str | os.PathLike, embedding: torch.Tensor, dtype: torch.dtype) -> str:
    """Write the empty prompt's embedding; returns its checksum (meta.json keeps it)."""
    stored = {"text": embedding.to("cpu", dtype)}
    save_tensors(Path(root) / EMPTY_PROMPT_FILE, stored)
    return checksum(stored)


# --- index -------------------------------------------------------------------------------------


def data_file(root: str | os.PathLike, rel: Any, where: str | os.PathLike) -> Path:
    """The data file an index row of `where` names, refused unless it is one prep writes: no
    index can make prep or training open, let alone delete, a file outside `<root>/data/`."""
    data = Path(root) / DATA_DIR
    name = rel[len(DATA_DIR) + 1:] if isinstance(rel, str) and rel.startswith(f"{DATA_DIR}/") else ""
    path = data / name
    if not (name.endswith(".safetensors") and _OWN_NAME.fullmatch(name.removesuffix(".safetensors"))
            and path.resolve().parent == data.resolve()):  # a link that leads out of data/ is not prep's either
        raise ShardFormatError(f"{where} names the file {rel!r}, which is not a data file of {root} (prep writes "
                               f"{DATA_DIR}/rankR-NNNNN.safetensors): refused, nothing was opened or deleted; if the "
                               "index was edited by hand, delete it and rerun `wan-tune prep`")
    return path


def _part_problem(part: Path) -> tuple[Any, str | None]:
    """(rows, None) of an index part, or (None, why it does not read)."""
    import pandas as pd

    try:
        return pd.read_parquet(part), None
    except Exception as err:  # pyarrow's errors for a truncated or foreign file
        return None, _first_line(err)


def read_part(part: Path):
    """One index part as a DataFrame; every row must name the data file of the same name."""
    frame, why = _part_problem(part)
    if why is not None:
        raise ShardFormatError(f"{part} is damaged ({why}); rerun `wan-tune prep`: it re-encodes the samples of a "
                               "damaged index part")
    own = f"{DATA_DIR}/{part.stem}.safetensors"
    for rel in set(frame["file"]) if "file" in frame else {None}:
        if rel != own:
            data_file(part.parents[1], rel, part)  # names a path out of the folder: refused as such
            raise ShardFormatError(f"{part} names the file {rel!r}, but its rows belong to {own}: refused, nothing was "
                                   "opened or deleted; if the index was edited by hand, delete it and rerun `wan-tune prep`")
    return frame


def read_parts(root: str | os.PathLike):
    """All index rows written so far (by any rank), as a DataFrame."""
    import pandas as pd

    parts = own_files(Path(root) / PARTS_DIR, ".parquet")
    if not parts:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat([read_part(p) for p in parts], ignore_index=True)


def drop_damaged_parts(root: str | os.PathLike) -> list[tuple[str, str]]:
    """Delete the index parts that do not read (prep's own files: their samples are encoded again,
    and each rank's writer removes their data files as orphans). Returns (part, why) for each."""
    dropped = []
    for part in own_files(Path(root) / PARTS_DIR, ".parquet"):
        _, why = _part_problem(part)
        if why is not None:
            part.unlink()
            dropped.append((part.relative_to(root).as_posix(), why))
    return dropped


def merge_index(root: str | os.PathLike, keep: Iterable[str] | None = None):
    """Write index.parquet from the parts: one row per id (sorted), only `keep` ids if given.

    Returns (merged DataFrame, number of rows left out because they are not in `keep`).
    """
    frame = read_parts(root).drop_duplicates("id", keep="last")
    dropped = 0
    if keep is not None:
        wanted = frame["id"].isin(set(keep))
        dropped = int((~wanted).sum())
        frame = frame[wanted]
    frame = frame.sort_values("id").reset_index(drop=True)
    atomic_write(Path(root) / INDEX_FILE, lambda tmp: frame.to_parquet(tmp, index=False))
    return frame, dropped


def file_damage(root: str | os.PathLike, rel: str, rows, deep: bool = False) -> str | None:
    """Why the data file `rel` cannot serve its index `rows` (None when it can).

    The header check (missing file, truncated, not safetensors, a sample's tensors absent) costs
    one small read per file; `deep` also reads every tensor and checks the samples' checksums."""
    from safetensors import safe_open

    path = data_file(root, rel, Path(root) / PARTS_DIR)
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            names = _by_sample(f.keys())  # once per file: rows x keys would be quadratic in samples per file
            for row in rows:
                if row.id not in names:
                    return f"sample {row.id} missing"
                if deep and isinstance(getattr(row, "checksum", None), str):
                    got = checksum({name: f.get_tensor(f"{row.id}/{name}") for name in names[row.id]})
                    if got != row.checksum:
                        return f"sample {row.id} does not match its checksum ({got} != {row.checksum})"
    except Exception as err:  # SafetensorError and OSError: any file that does not open is damaged
        return f"does not open as safetensors ({_first_line(err)})"
    return None


def drop_damaged(root: str | os.PathLike, deep: bool = False) -> list[tuple[str, str, int]]:
    """Delete each damaged data file and its index part, so that prep encodes its samples again.
    Returns (file, why, samples) for each."""
    root = Path(root)
    rows = read_parts(root)
    dropped = []
    for rel, group in rows.groupby("file", sort=True):
        why = file_damage(root, rel, list(group.itertuples()), deep)
        if why is None:
            continue
        stem = Path(rel).stem
        (root / PARTS_DIR / f"{stem}.parquet").unlink(missing_ok=True)  # part first: a sample counts while it has one
        (root / rel).unlink(missing_ok=True)
        dropped.append((rel, why, len(group)))
    return dropped


# --- reading -----------------------------------------------------------------------------------


class ShardReader:
    """Samples of a shard folder by position in index.parquet; files are memory-mapped once."""

    def __init__(self, root: str | os.PathLike):
        import pandas as pd

        self.root = Path(root)
        self.meta = read_meta(self.root)
        index = self.root / INDEX_FILE
        if not index.is_file():
            raise ShardFormatError(f"{self.root}: {INDEX_FILE} missing; prep did not finish, rerun `wan-tune prep`")
        try:
            self.index = pd.read_parquet(index)
        except Exception as err:
            raise ShardFormatError(f"{index} is damaged ({_first_line(err)}); rerun `wan-tune prep RECIPE`: it rebuilds "
                                   f"{INDEX_FILE} from {PARTS_DIR}/") from None
        self._ids, self._files_col = self.index["id"].tolist(), self.index["file"].tolist()  # no pandas per sample
        # Shards of an older wan-tune have no checksums: those samples are read unchecked.
        self._sums = self.index["checksum"].tolist() if "checksum" in self.index else [None] * len(self.index)
        self._files: dict[str, Any] = {}
        self._names: dict[str, dict[str, list[str]]] = {}
        for rel in dict.fromkeys(self._files_col):  # every header now: a damaged file stops the run at its start
            self._open(rel)

    def __len__(self) -> int:
        return len(self.index)

    def _open(self, rel: str):
        from safetensors import safe_open

        if rel not in self._files:
            path = data_file(self.root, rel, self.root / INDEX_FILE)
            if not path.is_file():
                raise ShardFormatError(f"{path} is listed in {INDEX_FILE} but missing; rerun `wan-tune prep`")
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as err:
                raise ShardFormatError(f"{path} is damaged ({_first_line(err)}); rerun "
                                       "`wan-tune prep RECIPE`: it re-encodes damaged shard files") from None
            self._files[rel], self._names[rel] = f, _by_sample(f.keys())  # listed once per file, not per sample
        return self._files[rel]

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        rel, sid = self._files_col[i], self._ids[i]
        f = self._open(rel)
        names = self._names[rel].get(sid)
        if names is None:
            raise ShardFormatError(f"{self.root / rel}: sample {sid} is in {INDEX_FILE} but not in the file; rerun "
                                   "`wan-tune prep RECIPE`: it re-encodes damaged shard files")
        tensors = {name: f.get_tensor(f"{sid}/{name}") for name in names}
        if isinstance(self._sums[i], str) and checksum(tensors) != self._sums[i]:
            raise ShardFormatError(f"{self.root / rel}: sample {sid} does not match its checksum (the file changed or "
                                   "was damaged on disk); run `wan-tune prep RECIPE --verify` to find and re-encode "
                                   "damaged samples")
        return tensors

    def row(self, i: int) -> dict:
        return self.index.iloc[i].to_dict()

    def clip_rows(self, prefer: list[int] = ()):
        """The index's rows one per clip (a clip's first window; a clip: its source within its
        dataset), the clips of the `prefer`red samples first (validation: the held-out ones)."""
        preferred, seen = set(prefer), set()
        for i in [*prefer, *(i for i in range(len(self)) if i not in preferred)]:
            row = self.row(i)
            clip = (row.get("dataset"), row["source"])
            if clip not in seen:
                seen.add(clip)
                yield row

    def empty_prompt(self) -> torch.Tensor:
        from safetensors.torch import load_file

        path = self.root / EMPTY_PROMPT_FILE
        try:
            stored = load_file(str(path))
            ok = set(stored) == {"text"} and stored["text"].dim() == 2
        except Exception as err:
            raise ShardFormatError(f"{path} is damaged ({_first_line(err)}); rerun `wan-tune prep RECIPE`: it writes "
                                   "it again") from None
        want = self.meta.get("empty_prompt_checksum")  # older shards have none: read unchecked
        if not ok or (want is not None and checksum(stored) != want):
            raise ShardFormatError(f"{path} does not match the checksum in {META_FILE} (damaged on disk); rerun "
                                   "`wan-tune prep RECIPE`: it writes it again")
        return stored["text"]
