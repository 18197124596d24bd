"""Progress in a log file or pipe (#34): plain lines, at most one per interval and one at the end,
no carriage-return redraws; the bar as tqdm draws it on a terminal."""

from __future__ import annotations

import io

import wan_tune.data.progress as progress_module
from wan_tune.data.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_and_a_terminal_the_bar():
    log = io.StringIO()
    for _ in progress_bar(range(500), desc="encode", unit="clip", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 1 <= len(lines) <= 3, lines  # the start and the end, not 500 redraws
    assert lines[-1].startswith("encode: 100%") and "500/500" in lines[-1]

    log = io.StringIO()
    progress_module.LOG_INTERVAL_S = 0.0  # every update past the interval: a line each, still no redraws
    try:
        bar = progress_bar(total=5, desc="train", file=log)
        for step in range(5):
            bar.set_postfix(loss=f"{step:.4f}", refresh=False)
            bar.update(1)
        bar.close()
    finally:
        progress_module.LOG_INTERVAL_S = 30.0
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) >= 5 and "loss=4.0000" in lines[-1]

    terminal = Terminal()
    for _ in progress_bar(range(3), desc="encode", file=terminal, mininterval=0):
        pass
    assert "\r" in terminal.getvalue()  # tqdm's own redraws where a person watches
