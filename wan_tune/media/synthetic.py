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
    vace: bool = False,
    animate: bool = False,
) -> list[Path]:
    """`count` mp4 clips with sidecar captions in `folder`; returns the video paths. `vace`: each
    clip also gets VACE sidecars made from its own frames (see `vace_sidecars`); `animate`:
    Wan2.2-Animate's pose and face videos (see `animate_sidecars`)."""
    folder = Path(folder)
    paths = []
    for i in range(count):
        shape, color = SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)]
        video = moving_shape(frames, height, width, shape, color, seed + i)
        path = write_video(folder / f"clip_{i:03d}.mp4", video, fps)
        path.with_suffix(".txt").write_text(f"{trigger} style, a {color} {shape} drifting over a dark gradient\n")
        if vace:
            vace_sidecars(path, video, fps)
        if animate:
            animate_sidecars(path, video, fps)
        paths.append(path)
    return paths


def grey_control(video: np.ndarray) -> np.ndarray:
    """A control video made from footage: its luminance as grey frames (VACE's 'grey' control)."""
    luma = video.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(luma.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def right_half_mask(frames: int, height: int, width: int) -> np.ndarray:
    """A VACE mask: the left half kept (black), the right half generated (white)."""
    mask = np.zeros((frames, height, width, 3), np.uint8)
    mask[:, :, width // 2 :] = 255
    return mask


def vace_sidecars(path: Path, video: np.ndarray, fps: float) -> dict[str, Path]:
    """Beside `path`: `.control.mp4` (grey), `.mask.mp4` (right half generated) and `.ref.png` (the
    middle of the first frame, square: a reference of another aspect than the clip)."""
    from PIL import Image

    t, h, w, _ = video.shape
    stem = path.with_suffix("")
    side = min(h, w)
    left = (w - side) // 2
    ref = Path(f"{stem}.ref.png")
    Image.fromarray(video[0, :side, left : left + side]).save(ref)
    return {
        "control": write_video(f"{stem}.control.mp4", grey_control(video), fps),
        "mask": write_video(f"{stem}.mask.mp4", right_half_mask(t, h, w), fps),
        "ref": ref,
    }


def animate_sidecars(path: Path, video: np.ndarray, fps: float) -> dict[str, Path]:
    """Beside `path`: `.pose.mp4` (its grey frames, standing in for a pose render) and `.face.mp4`
    (the middle square of each frame, standing in for the face crop)."""
    _, h, w, _ = video.shape
    side, stem = min(h, w), path.with_suffix("")
    left = (w - side) // 2
    return {"pose": write_video(f"{stem}.pose.mp4", grey_control(video), fps),
            "face": write_video(f"{stem}.face.mp4", np.ascontiguousarray(video[:, :side, left : left + side]), fps)}
