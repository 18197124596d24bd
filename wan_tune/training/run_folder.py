"""Who owns a run folder: one training process at a time, and one run per folder.

- `RunLock`: rank 0 holds an exclusive `flock` on `<output_dir>/.<name>.lock` while it trains.
  A second `train` on the same folder is refused in one line naming the holder. The kernel drops
  the lock when its process dies however it dies, so a lock file left by a killed run is stale
  by construction and simply taken over; nothing has to guess from PIDs. (On network file
  systems flock is as good as the mount's locking: NFSv4 and Lustre with flock enabled honour it.)
- `set_aside`: a fresh start (`--resume never`, or a resume from another folder's checkpoint)
  into a folder that holds an earlier run moves that run to `<name>.replaced-<time>/` first, so
  two runs never mix: auto-resume, best.json and export then only ever see the new one. A resume
  from an earlier step of the same run moves the later steps aside the same way.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .checkpoint import BEST_FILE, step_folders, step_number
from .errors import TrainingError
from .launch import StopSignal, agree
from .metrics import METRICS_FILE


@contextmanager
def claimed(accelerator, run_dir: Path, say) -> Iterator[StopSignal]:
    """The run folder, locked by rank 0 for as long as the run goes (a second run on it is refused
    on every rank), with the stop signals installed; both undone on the way out."""
    lock = RunLock(run_dir)
    busy = lock.acquire() if accelerator.is_main_process else None
    if agree(accelerator, busy is not None):
        raise TrainingError(busy or f"{run_dir} is in use by another run (rank 0 says which)")
    stop = StopSignal(say)
    try:
        yield stop
    finally:
        stop.restore()
        lock.release()


class RunLock:
    """An exclusive lock on a run folder (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns why not (another process holds it), or None once held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                return (f"{self.run_dir} is in use by another `wan-tune train` ({holder}); wait "
                        "for it to finish or stop it, or give this run another run.name")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it between our open and flock: try the new file
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: a waiter that opened it retries on the new file
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its process is still running"


def _aside_folder(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.parent / f"{run_dir.name}.replaced-{stamp}"
    n = 2
    while target.exists():
        target, n = run_dir.parent / f"{run_dir.name}.replaced-{stamp}-{n}", n + 1
    return target


def set_aside(run_dir: Path, resume_from: Path | None, fresh: bool) -> str | None:
    """Before a run starts, move what would mix with it out of `run_dir`; returns what was done
    (None when nothing was in the way). `resume_from`: the checkpoint this run continues (None:
    none); `fresh`: the run was asked to start over (--resume never). Hidden files stay."""
    run_dir = Path(run_dir)
    entries = sorted(e for e in run_dir.iterdir() if not e.name.startswith(".")) if run_dir.is_dir() else []
    if not entries:
        return None
    if fresh or (resume_from is not None and Path(resume_from).resolve().parent != run_dir.resolve()):
        target = _aside_folder(run_dir)
        target.mkdir()
        for entry in entries:
            entry.rename(target / entry.name)
        why = "a fresh start" if resume_from is None else f"resuming from {resume_from}, which is not of this run"
        return f"{run_dir} held an earlier run: moved it to {target} ({why}; nothing was deleted)"
    if resume_from is None:
        return None  # auto with nothing to resume: this run's own log of a first start cut short is kept
    start = step_number(resume_from)
    later = [p for p in step_folders(run_dir) if step_number(p) > start]
    if not later:
        return None
    target = _aside_folder(run_dir)
    target.mkdir()
    for path in later:
        path.rename(target / path.name)
    for name in (METRICS_FILE, BEST_FILE):  # the full log stays with the steps it describes
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target / name)
    best = run_dir / BEST_FILE
    try:
        named = json.loads(best.read_text()).get("checkpoint") if best.is_file() else None
    except ValueError:
        named = None
    if named in {p.name for p in later}:
        best.unlink()  # it named a step that is no longer here; the next held-out score writes it again
    return (f"resuming from {Path(resume_from).name}: moved the {len(later)} later checkpoint(s) of this run "
            f"({later[0].name} ... {later[-1].name}) to {target}, so they cannot be resumed or exported by mistake")
