"""Cutting footage into frame windows at the target fps: which source frames make each training clip.

Reading the frames is `wan_tune.media.footage` (shared with validation); this module decides which ones.
"""

from __future__ import annotations

import math

from wan_tune.media.footage import MediaInfo, SkipClip, Window

END_SLACK_S = 0.1  # how far past the video a manifest's end may round


def plan_windows(
    info: MediaInfo,
    target_fps: float,
    buckets: list[int],
    stride: int,
    max_clips: int,
    start_s: float | None = None,
    end_s: float | None = None,
    extraction: str = "slide",
) -> list[Window]:
    """Windows of the largest frame bucket the (trimmed) video fills, resampled to `target_fps`:
    `slide`: every `stride` frames (0: back to back) from the start, up to `max_clips`; `head`: the
    first only; `uniform`: `max_clips` starts spread evenly from the first frame to the last start
    that still fits (fewer when the video holds fewer distinct windows).

    Raises SkipClip when even the smallest bucket does not fit.
    """
    if info.is_image:
        return [Window(0, (0,), 0.0, 0.0)]
    a = max(0.0, start_s or 0.0)
    if a >= info.duration:
        raise SkipClip(f"start {a:g} s is past the end of the video ({info.duration:.2f} s)")
    # A manifest's end may round the clip's length up; more than that is a wrong row, not a rounding.
    if end_s is not None and end_s > info.duration + END_SLACK_S + 1 / info.fps:
        raise SkipClip(f"end {end_s:g} s is past the end of the video ({info.duration:.2f} s); fix the row, "
                       "or leave end empty for the rest of the clip")
    b = min(info.duration, end_s) if end_s is not None else info.duration
    if b <= a:
        raise SkipClip(f"empty time range {a:g}-{b:g} s (video is {info.duration:.2f} s)")
    available = int(math.floor((b - a) * target_fps + 1e-6))
    fitting = [n for n in sorted(buckets) if n <= available]
    if not fitting:
        raise SkipClip(
            f"too short: {b - a:.2f} s gives {available} frames at {target_fps:g} fps; the smallest bucket is {min(buckets)}"
        )
    length = fitting[-1]
    windows = []
    for start in _starts(extraction, available, length, stride, max_clips):
        idx = tuple(info.frame_at(a + (start + k) / target_fps) for k in range(length))
        windows.append(Window(start, idx, a + start / target_fps, a + (start + length) / target_fps))
    return windows


def _starts(extraction: str, available: int, length: int, stride: int, max_clips: int) -> list[int]:
    """First frames (at the target fps) of the windows of `length` in `available` frames."""
    last = available - length
    if extraction == "head":
        return [0]
    if extraction == "uniform":
        count = min(max_clips, last + 1)
        return sorted({round(j * last / (count - 1)) for j in range(count)}) if count > 1 else [0]
    step = stride or length
    return [j * step for j in range(max_clips) if j * step <= last]
