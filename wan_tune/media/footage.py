"""Reading footage: probe and decode videos with decord (PyAV for animated GIFs) and stills with PIL.

Prep reads every clip through here, and so does validation when it takes a clip's first frame,
so both see rotation and variable frame rate alike. A `Window` is a list of source frame indices,
fetched in one batched `get_batch` call (decord seeks once and decodes forward), which is what
makes prep fast; see bench/prep_throughput.py. Cutting clips into windows is prep's
(`data_prep/video.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_FPS, MAX_FPS = 1.0, 240.0
VIDEO_EXTS = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".gif"}  # GIFs: PyAV, by their frame delays
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}


class SkipClip(Exception):
    """This input cannot be used; the message is the one-line reason for the report."""


@dataclass(frozen=True)
class MediaInfo:
    frames: int
    fps: float
    height: int
    width: int
    is_image: bool = False
    times: tuple[float, ...] | None = None
    """Each frame's start time in seconds, where frames are not on a constant-rate grid (variable
    frame rate, animated GIFs); None: constant rate."""
    end: float | None = None
    """End of the last frame in seconds, set with `times`."""

    @property
    def duration(self) -> float:
        if self.end is not None:
            return self.end
        return self.frames / self.fps if self.fps else 0.0

    def frame_at(self, t: float) -> int:
        """The source frame shown at time `t` (seconds from the first frame)."""
        if self.times is None:
            index = int(math.floor(t * self.fps + 1e-6))
        else:  # the last frame that starts at or before t: phones vary the rate with the light
            index = int(np.searchsorted(self.times, t + 1e-6, side="right")) - 1
        return min(self.frames - 1, max(0, index))


@dataclass(frozen=True)
class Window:
    start_frame: int
    """Index of the window's first frame on the resampled (target fps) timeline."""
    indices: tuple[int, ...]
    """Source frame indices, one per output frame."""
    start_s: float
    end_s: float

    @property
    def frames(self) -> int:
        return len(self.indices)


def _check_file(path: str) -> None:
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise SkipClip("cannot read: broken link")
    if not p.exists():
        raise SkipClip("cannot read: file not found")
    if not p.is_file():
        raise SkipClip("cannot read: not a regular file")
    if not os.access(p, os.R_OK):
        raise SkipClip("cannot read: permission denied")
    if p.stat().st_size == 0:
        raise SkipClip("empty file (0 bytes)")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def _reader(path: str):
    import decord

    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # decord raises RuntimeError / DECORDError with ffmpeg's words
        if _has_no_video_stream(path):  # decord's words for it are a failed C++ check
            raise SkipClip("no video stream (an audio-only file?)") from None
        raise SkipClip(f"not a readable video ({_first_line(err)})") from None


def _has_no_video_stream(path: str) -> bool:
    """True when the container opens and holds no video stream (False when it does not open)."""
    import av

    try:
        with av.open(path) as container:
            return not container.streams.video
    except Exception:
        return False


def _is_gif(path: str) -> bool:
    return Path(path).suffix.lower() == ".gif"


def _gif(path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(frames uint8 [T, H, W, 3], each frame's start time, the end) of an animated GIF.

    decord cannot open GIFs ("broken metadata"); PyAV decodes them with each frame's own delay as
    its timestamp, and a GIF is small enough to decode whole each time it is read."""
    import av

    frames, times, last = [], [], 0.0
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time or 0.0))
                last = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
    except Exception as err:
        raise SkipClip(f"not a readable GIF ({_first_line(err)})") from None
    if not frames:
        raise SkipClip("GIF has no frames")
    start = np.asarray(times) - times[0]
    step = start[-1] / (len(start) - 1) if len(start) > 1 else 0.0
    return np.stack(frames), start, float(start[-1] + (last or step or 0.1))  # no delay given: browsers show 0.1 s


def _probe_gif(path: str) -> MediaInfo:
    frames, start, end = _gif(path)
    return MediaInfo(frames=len(frames), fps=len(frames) / end, height=frames.shape[1], width=frames.shape[2],
                     times=tuple(start.tolist()), end=end)  # each frame's delay is its own: always by timestamps


def unsupported_reason(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return (f"unsupported type: {suffix or 'no extension'}; prep reads videos ({' '.join(sorted(VIDEO_EXTS))}) "
            f"and images ({' '.join(sorted(IMAGE_EXTS))})")


def probe(path: str, is_image: bool) -> MediaInfo:
    _check_file(path)
    if is_image:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                w, h = im.size
        except Exception as err:
            raise SkipClip(f"not a readable image ({type(err).__name__})") from None
        return MediaInfo(frames=1, fps=1.0, height=h, width=w, is_image=True)
    if _is_gif(path):
        return _probe_gif(path)
    vr = _reader(path)
    frames, fps = len(vr), float(vr.get_avg_fps())
    if frames <= 0:
        raise SkipClip("video has no frames")
    if not math.isfinite(fps) or not MIN_FPS <= fps <= MAX_FPS:
        raise SkipClip(f"unusable frame rate {fps:g} fps (expected {MIN_FPS:g}-{MAX_FPS:g})")
    h, w = _frame_size(vr)  # decord applies rotation metadata: a portrait phone clip comes out portrait
    times, end = _variable_times(vr, fps)
    return MediaInfo(frames=frames, fps=fps, height=h, width=w, times=times, end=end)


def _variable_times(vr, fps: float) -> tuple[tuple[float, ...] | None, float | None]:
    """Frame start times and the stream's end when frames are not evenly spaced at `fps`.

    Phones record variable frame rate; indexing by the average rate would drift by seconds
    over a clip and play parts of it fast or slow. Constant-rate video keeps the plain
    index arithmetic (None), so its windows do not depend on timestamp rounding.
    """
    try:
        stamps = np.asarray(vr.get_frame_timestamp(range(len(vr))), dtype=np.float64)
    except Exception:  # no usable timestamps: the average rate is all there is
        return None, None
    start = stamps[:, 0] - stamps[0, 0]
    if len(start) < 2 or np.abs(start - np.arange(len(start)) / fps).max() <= 0.5 / fps:
        return None, None
    return tuple(start.tolist()), float(stamps[-1, 1] - stamps[0, 0])


def _frame_size(vr) -> tuple[int, int]:
    shape = vr.next().shape  # decodes one frame: proves the stream decodes at all
    vr.seek(0)
    return int(shape[0]), int(shape[1])


def read_frames(path: str, window: Window, is_image: bool) -> np.ndarray:
    """uint8 [T, H, W, 3] for the window's frames (one batched fetch)."""
    if is_image:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))[None]
    if _is_gif(path):
        return _gif(path)[0][list(window.indices)]
    vr = _reader(path)
    try:
        return vr.get_batch(list(window.indices)).asnumpy()
    except Exception as err:
        raise SkipClip(f"decode failed (truncated or damaged file?): {_first_line(err)}") from None


def resize_crop(frames: np.ndarray, bucket: tuple[int, int], chunk: int = 16) -> "torch.Tensor":
    """uint8 frames [T, H, W, 3] -> float video [3, T, h, w] in [-1, 1], covering `bucket` then centre-cropped.

    Works `chunk` frames at a time so 81 frames of 4K never sit in memory as floats at once.
    """
    import torch
    import torch.nn.functional as F

    bh, bw = bucket
    t, h, w, _ = frames.shape
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    top, left = (rh - bh) // 2, (rw - bw) // 2
    out = torch.empty(3, t, bh, bw)
    for i in range(0, t, chunk):
        x = torch.from_numpy(np.array(frames[i : i + chunk])).permute(0, 3, 1, 2).float()  # copy: decord's arrays are read-only
        if (rh, rw) != (h, w):
            # antialias: downscaling 4K to 480p without it aliases fine textures.
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top : top + bh, left : left + bw]
        out[:, i : i + chunk] = (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)
    return out


def pictures(video) -> list:
    """Float video [3, T, H, W] in [-1, 1] (what `resize_crop` gives) -> its frames as the PIL images
    the diffusers pipelines take."""
    from PIL import Image

    pixels = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return [Image.fromarray(f) for f in pixels]
