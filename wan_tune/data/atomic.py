"""Atomic file writes: every file wan-tune writes is either complete or absent.

Write to a temporary file beside the target, flush it to disk, then rename: a process killed
at any point leaves the old file (or none), never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

_UMASK_LOCK = threading.Lock()


def new_file_mode(folder: bool = False) -> int:
    """The mode `open()` (`mkdir()`) gives a new file (folder) under the process's umask: 0644
    (0755) under 022. mkstemp and mkdtemp make theirs 0600 / 0700 whatever the umask: renamed into
    place as they are, a shared drive's teammates and a ComfyUI running as another user could not
    read them."""
    with _UMASK_LOCK:  # the umask can only be read by setting it
        umask = os.umask(0o077)
        os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)`, fsync the result, give it the umask's mode, rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # after: a writer may have replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def writable_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in `folder` (None when they can). Checked when a command
    starts, so a read-only or missing mount fails in a second, not after hours of work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"cannot write in {folder} ({err.strerror or err})"
    return None


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file, atomically (the format wan-tune writes every tensor in)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as err:  # its I/O failures (full disk, quota) are OSErrors to every caller
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None

    return atomic_write(path, write)


def file_digest(path: str | os.PathLike, chunk: int = 16 << 20) -> dict:
    """{"bytes": size, "crc32": 8 hex digits} of a file, read in chunks: what a checkpoint records
    of each file it writes and checks before one is used (CRC-32: ~2 GB/s here; it finds bit
    flips and cut-off files, which is the point, not tampering)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"bytes": size, "crc32": f"{crc:08x}"}
