"""Synthetic footage written with PyAV: the demo's clips and the tests' inputs (no ffmpeg binary).

The clips have a distinctive, learnable look (a neon shape drifting over a dark gradient), and
captions that carry the trigger word, so a LoRA trained on them has something to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .video_io import write_video

__all__ = ["make_clips", "moving_shape", "still_image", "write_video"]

SHAPES = ("circle", "square", "ring")
COLORS = {"red": (255, 60, 60), "green": (60, 230, 120), "blue": (70, 120, 255), "yellow": (250, 220, 60)}


def moving_shape(
    frames: int, height: int, width: int, shape: str = "circle", color: str = "red", seed: int = 0
) -> np.ndarray:
    """A shape drifting across a dark blue-violet gradient; uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack(
        [20 + 40 * xx / width, 10 + 20 * yy / height, 60 + 80 * (1 - yy / height)], axis=-1
    ).astype(np.float32)
    r = min(height, width) * 0.18
    x0, y0 = rng.uniform(r, width - r), rng.uniform(r, height - r)
    vx, vy = rng.uniform(-1, 1, 2) * min(height, width) * 0.03
    rgb = np.array(COLORS[color], np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        cx = r + (x0 + vx * t - r) % max(1.0, width - 2 * r)
        cy = r + (y0 + vy * t - r) % max(1.0, height - 2 * r)
        if shape == "square":
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
        elif shape == "ring":
            d = np.hypot(xx - cx, yy - cy)
            mask = (d < r) & (d > r * 0.6)
        else:
            mask = np.hypot(xx - cx, yy - cy) < r
        img = background.copy()
        img[mask] = rgb
        out[t] = img.clip(0, 255).astype(np.uint8)
    return out


def still_image(path: str | Path, height: int, width: int, color: str = "green", seed: int = 0) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(moving_shape(1, height, width, "square", color, seed)[0]).save(path)
    return path


def make_clips(
    folder: str | Path,
    count: int,
    trigger: str = "wtune",
    frames: int = 24,
    height: int = 96,
    width: int = 128,
    fps: float = 16,
    seed: int = 0,
) -> list[Path]:
    """`count` mp4 clips with sidecar captions in `folder`; returns the video paths."""
    folder = Path(folder)
    paths = []
    for i in range(count):
        shape, color = SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)]
        path = write_video(folder / f"clip_{i:03d}.mp4", moving_shape(frames, height, width, shape, color, seed + i), fps)
        path.with_suffix(".txt").write_text(f"{trigger} style, a {color} {shape} drifting over a dark gradient\n")
        paths.append(path)
    return paths
