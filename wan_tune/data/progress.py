"""Progress bars that read well where they land: tqdm's bar on a terminal; in a log file or a pipe
(a scheduler's output, `| tee`), one plain line every 30 seconds and at the end, never the
carriage-return redraws that turn a log into one unreadable line."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream that turns each of tqdm's redraws (`\\r` + status) into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), in lines when its stream (stderr unless `file=`) is not a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    if kwargs.get("disable") or getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, file=_Lines(stream), ascii=True, ncols=100, **kwargs)
