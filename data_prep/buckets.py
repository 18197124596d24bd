"""Aspect-ratio buckets at a pixel area, and the resize + centre crop into one.

A bucket keeps the recipe's pixel area (so every batch costs about the same) with sides that
are multiples of 16 (VAE 8x times patch 2x). Each clip goes to the bucket closest to its own
shape, is scaled to cover it and centre-cropped: no padding, no distortion.
"""

from __future__ import annotations

import math

from wan_tune.media.footage import resize_crop  # noqa: F401  (prep's name for it; validation and sampling share it)

STEP = 16
MAX_ASPECT = 4.0  # buckets span 1:4 .. 4:1
MIN_KEPT = 0.5  # a crop that keeps less of the frame than this is refused (extreme aspect)
MAX_UPSCALE = 2.0  # a clip that must grow more than this is refused (too small)


def aspect_buckets(height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) buckets of about `height * width` pixels, sides multiples of 16, portrait to landscape."""
    area = height * width
    out = {(height, width), (width, height)}
    for short in range(STEP, math.isqrt(area) + STEP, STEP):
        long = round(area / short / STEP) * STEP
        if short <= long <= short * MAX_ASPECT and abs(short * long / area - 1) <= 0.1:
            out |= {(short, long), (long, short)}
    return sorted(out, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(src_h: int, src_w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    target = math.log(src_h / src_w)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - target), -hw[0] * hw[1]))


def fit_problem(src_h: int, src_w: int, bucket: tuple[int, int]) -> str | None:
    """Why a frame of this size cannot go into `bucket` (None when it can)."""
    bh, bw = bucket
    scale = max(bh / src_h, bw / src_w)
    if scale > MAX_UPSCALE:
        return f"too small: {src_w}x{src_h} px would be upscaled {scale:.1f}x for bucket {bw}x{bh}"
    kept = (bh * bw) / (src_h * scale * src_w * scale)
    if kept < MIN_KEPT:
        return f"extreme aspect ratio {src_w / src_h:.2f}: the crop to {bw}x{bh} would keep {kept:.0%} of the frame"
    return None
