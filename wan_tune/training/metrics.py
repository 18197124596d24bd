"""`<run>/metrics.jsonl`: one JSON record per step (and per held-out score), appended as training goes.

An append is not atomic: a disk that fills or a kill mid-write leaves a torn last line, and a
file edited by hand may hold anything. Readers skip every line that is not a record (a JSON
object with an integer `step`); the trainer rewrites the file without them when it opens it for
appending, and says so, so a damaged log never stops a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from ..data.atomic import write_text

METRICS_FILE = "metrics.jsonl"


def _record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except ValueError:  # not UTF-8 (UnicodeDecodeError is a ValueError) or not JSON
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_metrics(path: str | Path) -> tuple[list[dict], list[int]]:
    """(records, numbers of the lines that are not records) of a metrics log; ([], []) when absent."""
    path = Path(path)
    if not path.is_file():
        return [], []
    records, bad = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        record = _record(raw)
        if record is None:
            bad.append(number)
        else:
            records.append(record)
    return records, bad


def open_metrics(path: str | Path, start_step: int, say=print) -> IO[str]:
    """The log, opened for appending from `start_step`: the records of later steps a killed run
    had written are dropped (they are trained again and must not appear twice), and so is every
    damaged line, named."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        records, bad = read_metrics(path)
        if bad:
            say(f"warning: {path}: dropped {len(bad)} damaged line(s) (line {', '.join(map(str, bad[:5]))}"
                f"{' ...' if len(bad) > 5 else ''}: a write cut short or an edit); the other records are kept")
        kept = [r for r in records if r["step"] <= start_step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return path.open("a", encoding="utf-8")


def heldout_by_step(path: str | Path, key: str = "heldout_loss") -> dict[int, float]:
    """Held-out losses logged in the metrics log, by step (`key`: heldout_loss_ema for the EMA's)."""
    return {r["step"]: r[key] for r in read_metrics(path)[0] if key in r}
