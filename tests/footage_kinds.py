"""Writing video as cameras and editors do, with PyAV: codec, pixel format, rotation, audio,
a second video stream, explicit timestamps. Imports nothing heavy, so a fresh process can use it."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def encode(path: Path, frames: np.ndarray, fps: float = 16, codec: str = "libx264", pix_fmt: str = "yuv420p",
           options: dict | None = None, rotation: int | None = None, audio: bool = False,
           second_video: bool = False, pts_ms: list[int] | None = None) -> Path:
    """Write `frames` (uint8 [T, H, W, 3]) as a camera or editor would: codec, pixel format,
    display rotation, an audio track, a second video stream, or explicit timestamps (VFR)."""
    with av.open(str(path), "w") as out:
        if pts_ms is None:
            video = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        else:
            video = out.add_stream(codec)
            video.time_base = video.codec_context.time_base = Fraction(1, 1000)
            video.codec_context.framerate = Fraction(round(fps))
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = pix_fmt
        video.options = options or {}
        if rotation is not None:
            video.set_display_rotation(rotation)  # what a phone writes for a clip held upright
        extra = out.add_stream("libx264", rate=fps) if second_video else None
        if extra is not None:
            extra.height, extra.width, extra.pix_fmt = 32, 48, "yuv420p"
        sound = out.add_stream("aac", rate=16000) if audio else None
        alpha = "a" in pix_fmt.split("p")[0]
        for i, rgb in enumerate(frames):
            data = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], -1) if alpha else rgb
            frame = av.VideoFrame.from_ndarray(data, format="rgba" if alpha else "rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(video.encode(frame))
            if extra is not None:
                out.mux(extra.encode(av.VideoFrame.from_ndarray(np.zeros((32, 48, 3), np.uint8), format="rgb24")))
        out.mux(video.encode())
        if extra is not None:
            out.mux(extra.encode())
        if sound is not None:
            tone = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
            tone.sample_rate = 16000
            out.mux(sound.encode(tone))
            out.mux(sound.encode())
    return path
