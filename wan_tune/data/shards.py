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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..atomic import atomic_write, save_tensors, write_json

FORMAT_VERSION = 1
META_FILE = "meta.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
INDEX_FILE = "index.parquet"
DATA_DIR = "data"
PARTS_DIR = "index"

# Index columns, in order; `file` is relative to the shard folder.
COLUMNS = (
    "id", "source", "caption", "frames", "height", "width", "start_frame", "start_s", "end_s", "text_len", "file",
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ShardFormatError(RuntimeError):
    """The shard folder is missing, damaged or from another format version."""


# --- meta ------------------------------------------------------------------------------------


def read_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise ShardFormatError(f"{root} holds no shards ({META_FILE} missing); run `wan-tune prep RECIPE` first")
    meta = json.loads(path.read_text())
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
        taken = [int(p.stem.split("-")[1]) for p in (self.root / PARTS_DIR).glob(f"rank{self.rank}-*.parquet")]
        self._next = max(taken, default=-1) + 1

    def _remove_orphans(self) -> None:
        """Data files of this rank that never got their index part, and temporaries, from a killed run."""
        indexed = {p.stem for p in (self.root / PARTS_DIR).glob(f"rank{self.rank}-*.parquet")}
        for path in (self.root / DATA_DIR).glob(f"rank{self.rank}-*.safetensors"):
            if path.stem not in indexed:
                path.unlink()
        for folder in (DATA_DIR, PARTS_DIR):
            for tmp in (self.root / folder).glob(f".rank{self.rank}-*.tmp"):
                tmp.unlink()

    def add(self, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(COLUMNS) - {"file", "text_len"} - set(row)
        if missing:
            raise ValueError(f"sample row lacks {sorted(missing)}")
        sid = row["id"]
        self._rows.append({**row, "text_len": int(tensors["text"].shape[0])})
        for name, t in tensors.items():
            # clone: samples of one caption share a cached text tensor; safetensors refuses shared memory
            self._tensors[f"{sid}/{name}"] = t.detach().to("cpu", self.dtype).clone()
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


def save_empty_prompt(root: str | os.PathLike, embedding: torch.Tensor, dtype: torch.dtype) -> None:
    save_tensors(Path(root) / EMPTY_PROMPT_FILE, {"text": embedding.to("cpu", dtype)})


# --- index -------------------------------------------------------------------------------------


def read_parts(root: str | os.PathLike):
    """All index rows written so far (by any rank), as a DataFrame."""
    import pandas as pd

    parts = sorted((Path(root) / PARTS_DIR).glob("*.parquet"))
    if not parts:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


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
        self.index = pd.read_parquet(index)
        self._ids, self._files_col = self.index["id"].tolist(), self.index["file"].tolist()  # no pandas per sample
        self._files: dict[str, Any] = {}
        self._names: dict[str, dict[str, list[str]]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _open(self, rel: str):
        from safetensors import safe_open

        if rel not in self._files:
            path = self.root / rel
            if not path.is_file():
                raise ShardFormatError(f"{path} is listed in {INDEX_FILE} but missing; rerun `wan-tune prep`")
            f = safe_open(str(path), framework="pt")
            names: dict[str, list[str]] = {}
            for key in f.keys():  # "<id>/<tensor name>", listed once per file, not per sample
                sid, name = key.split("/", 1)
                names.setdefault(sid, []).append(name)
            self._files[rel], self._names[rel] = f, names
        return self._files[rel]

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        rel, sid = self._files_col[i], self._ids[i]
        f = self._open(rel)
        return {name: f.get_tensor(f"{sid}/{name}") for name in self._names[rel][sid]}

    def row(self, i: int) -> dict:
        return self.index.iloc[i].to_dict()

    def empty_prompt(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.root / EMPTY_PROMPT_FILE))["text"]
