"""An export folder delivered as one piece, and only what the export wrote in it.

Every file of an export is written into a hidden staging folder inside the destination
(`.wan-tune-partial-<host>-<pid>`: the same file system, and a shared drive's folder may be writable
where its parent is not), self-tested there, and takes its final name only when every check
passed: an export that fails, is interrupted or is killed leaves nothing under a name that ComfyUI,
a script or `push` would pick up. The manifest (`wan-tune-export.json`) lists each file the export
wrote with its size and CRC; W&B's export artifact and `push` take exactly those files, never the
rest of the folder.

Nothing is overwritten that this export did not write: a destination file in the way must be one
the folder's manifest lists, unchanged, for the same checkpoint (a re-export of it). A README.md
already in `--out .`, another run's export, a model card edited after the export: each is refused
in one line before any work, naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from ..data.atomic import file_digest, write_json

MANIFEST = "wan-tune-export.json"
FORMAT_VERSION = 1


class DeliveryError(RuntimeError):
    """The export cannot go into its folder; the message says which file is in the way."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when it has none; a damaged one is a DeliveryError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, UnicodeDecodeError) as err:
        raise DeliveryError(f"{path} is damaged ({str(err).splitlines()[0][:100]}): the folder's files cannot be "
                            "told apart from others; export into a new folder") from None
    return manifest


def manifest_files(folder: str | os.PathLike) -> list[Path]:
    """The files the folder's export wrote (that are still there), manifest first; [] without one."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    return [folder / MANIFEST, *(folder / name for name in sorted(manifest["files"]) if (folder / name).is_file())]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class Delivery:
    """`with Delivery(out, identity) as stage:` write into `stage`, then `deliver()` when every
    check passed. `identity`: what says which export this is (run, step, checkpoint), kept in the
    manifest so a re-export of the same checkpoint may replace its own files."""

    def __init__(self, out: str | os.PathLike, identity: dict):
        self.out = Path(out).absolute()
        self.identity = identity
        self.stage = self.out / f".wan-tune-partial-{socket.gethostname()}-{os.getpid()}"
        self.old = read_manifest(self.out) if self.out.is_dir() else None

    def __enter__(self) -> Path:
        self._remove_dead_stages()
        if self.stage.exists():
            shutil.rmtree(self.stage)  # this process's own leftover
        self.stage.mkdir(parents=True)
        return self.stage

    def _remove_dead_stages(self) -> None:
        """Staging folders of exports killed on this machine (SIGKILL, power): never delivered, only clutter.
        Another machine's (a shared drive) may be an export running there: left alone."""
        prefix = f".wan-tune-partial-{socket.gethostname()}-"
        for stage in self.out.glob(prefix + "*") if self.out.is_dir() else []:
            pid = stage.name[len(prefix):]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(stage, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)  # delivered files were moved out; the rest was never shipped

    def _ours(self, name: str) -> bool:
        """`name` in the destination is a file of this checkpoint's earlier export, as it wrote it."""
        old = self.old
        if old is None or {k: old.get(k) for k in self.identity} != self.identity:
            return False
        if name == MANIFEST:
            return True
        recorded = old["files"].get(name)
        return recorded is not None and file_digest(self.out / name) == recorded

    def in_the_way(self, names: list[str]) -> None:
        """Refuse, in one line, when a destination file this export would write is not its own to replace."""
        if self.old is not None and {k: self.old.get(k) for k in self.identity} != self.identity:
            who = ", ".join(f"{k} {self.old.get(k)}" for k in self.identity)
            raise DeliveryError(f"{self.out} holds another export ({who}; {MANIFEST}): give each export its own --out "
                                "folder (nothing was written)")
        # A folder this export writes (a full model's) may hold only files of this checkpoint's earlier export.
        expanded = [f"{n}/{f}" if (self.out / n).is_dir() else n for n in names
                    for f in (_files_under(self.out / n) if (self.out / n).is_dir() else [""])]
        clash = [n for n in expanded if (self.out / n).exists() and not ((self.out / n).is_file() and self._ours(n))]
        if clash:
            raise DeliveryError(f"{self.out / clash[0]} is in the way: export writes that name and never replaces a file "
                                f"it did not write{' (or one edited since)' if self.old else ''}. Move it, or give --out "
                                f"another folder (nothing was written){f'; {len(clash) - 1} more' if len(clash) > 1 else ''}")

    def deliver(self) -> list[Path]:
        """Move the staged files to their final names, the manifest first (a reader takes the files
        it lists that are there; `push` checks they all are).
        Files of this checkpoint's earlier export that the new one does not write are removed."""
        names = _files_under(self.stage)
        self.in_the_way(names + [MANIFEST])  # again: the folder may have changed while the export ran
        manifest = {**self.identity, "format_version": FORMAT_VERSION,
                    "files": {n: file_digest(self.stage / n) for n in names}}
        stale = [n for n in (self.old or {}).get("files", {}) if n not in manifest["files"] and (self.out / n).is_file()
                 and self._ours(n)]
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / MANIFEST, manifest)
        for name in stale:
            (self.out / name).unlink()
        delivered = []
        for name in names:
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.stage / name, target)
            delivered.append(target)
        return delivered

    def keep_failed(self) -> list[Path]:
        """After a failed self-test: only the `*.failed` files, moved into the destination to inspect."""
        kept = []
        for name in _files_under(self.stage):
            if ".failed" in name and not (self.out / name).exists():
                target = self.out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.stage / name, target)
                kept.append(target)
        return kept
