"""Writing mp4 files with PyAV (no ffmpeg binary needed), and a video as a row of frames (contact sheets)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: float = 16, codec: str = "libx264", faststart: bool = False) -> Path:
    """Write uint8 frames [T, H, W, 3] (H and W even) as a video file, atomically."""
    import av

    from ..data.atomic import atomic_write

    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format=path.suffix.lstrip(".") or "mp4", options=options) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "18", "preset": "veryfast"}  # near-lossless
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return atomic_write(path, write)


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Pipeline output (float in [0, 1], [T, H, W, 3]) -> uint8 frames."""
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)


FRAMES_PER_ROW = 6


def frame_row(frames: np.ndarray, count: int = FRAMES_PER_ROW) -> np.ndarray:
    """`count` evenly spaced frames of a uint8 video [T, H, W, 3], side by side: [H, count*W, 3]."""
    idx = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in idx], axis=1)
