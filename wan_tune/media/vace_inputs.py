"""A clip's conditioning inputs: VACE's reference images, control video and its mask (#25), and
Wan2.2-Animate's reference image, pose and face videos, and for replacement its background and mask
(#38: media/animate_inputs.py checks those). Prep finds and checks them here; validation and `wan-tune
sample` check theirs with the same rules.

They come as sidecar files beside a clip (`clip.ref.png`, `clip.ref-2.png`, `clip.control.mp4`,
`clip.mask.mp4`, `clip.pose.mp4`, `clip.face.mp4`, `clip.bg.mp4`) or as manifest columns (`reference` /
`references`, `control`, `mask`, `pose`, `face`, `background`). A sidecar is never footage of its own. Checks here turn a bad input into a report reason before anything is
encoded: a control or mask whose frame count or shape differs from the clip's, a mask that is not
black and white, a reference that would be a sliver of the frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wan_tune.media.footage import IMAGE_EXTS, VIDEO_EXTS, MediaInfo, SkipClip, Window, probe, read_frames

# Any case: `clip.REF.png` and `clip.Control.mp4` are sidecars too (never footage trained as a clip).
_SIDECAR = re.compile(r"^(?P<stem>.+)\.(?:(?P<ref>ref)(?:-(?P<n>\d+))?|(?P<kind>control|mask|pose|face|bg))(?P<ext>\.[^.]+)$",
                      re.I)
VIDEO_KINDS = {"control": "control", "mask": "mask", "pose": "pose", "face": "face", "bg": "background"}
REFERENCE_COLUMNS = ("references", "reference", "ref")
MIN_REFERENCE_FILL = 0.35  # share of the frame a reference fills once fitted on the pipeline's white canvas
MAX_GREY_SHARE = 0.02  # mask pixels neither near black nor near white (codec noise sits within 48 levels)
ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class VaceInputs:
    """One clip's conditioning files (absolute paths): VACE's references, control and mask;
    Animate's reference (the first of `references`), pose, face, and replacement's background and mask."""

    references: tuple[str, ...] = ()
    control: str | None = None
    mask: str | None = None
    pose: str | None = None
    face: str | None = None
    background: str | None = None

    def __bool__(self) -> bool:
        return bool(self.files())

    def files(self) -> list[str]:
        return [*self.references, *(p for p in (self.control, self.mask, self.pose, self.face, self.background) if p)]

    def to_json(self) -> str:
        """For the shard index's `vace` column (validation renders a clip's own inputs from it)."""
        import json

        videos = {k: getattr(self, k) for k in VIDEO_KINDS.values() if getattr(self, k)}
        return json.dumps({"references": list(self.references), "control": self.control, "mask": self.mask,
                           **videos}) if self else ""

    @classmethod
    def from_json(cls, text) -> "VaceInputs":
        import json

        if not isinstance(text, str) or not text:
            return cls()
        d = json.loads(text)
        return cls(tuple(d.get("references") or ()), **{k: d.get(k) for k in VIDEO_KINDS.values()})


def sidecar_of(path: Path) -> tuple[str, str, int] | None:
    """(clip stem, 'ref' or a video kind (control, mask, pose, face, background), reference number) when
    `path` is a conditioning sidecar."""
    m = _SIDECAR.match(path.name)
    if not m:
        return None
    ext = m.group("ext").lower()
    if m.group("ref") and ext in IMAGE_EXTS:
        return m.group("stem"), "ref", int(m.group("n") or 1)
    if m.group("kind") and ext in VIDEO_EXTS:
        return m.group("stem"), VIDEO_KINDS[m.group("kind").lower()], 0
    return None


def split_sidecars(paths: list[Path]) -> tuple[list[Path], dict[Path, VaceInputs], list[tuple[Path, str]]]:
    """(footage files, VACE inputs by clip path, orphans with why). A sidecar belongs to the clip
    of the same folder and stem (`a.ref.png` -> `a.mp4`); one without such a clip is reported."""
    sidecars, footage = {}, []
    for p in paths:
        found = sidecar_of(p)
        if found is None:
            footage.append(p)
        else:
            sidecars[p] = found
    by_stem: dict[tuple, list[Path]] = {}  # a stem in any case: the sidecar's case need not be the clip's
    for p in footage:
        if p.suffix.lower() in VIDEO_EXTS | IMAGE_EXTS:
            by_stem.setdefault((p.parent, p.stem.lower()), []).append(p)
    parts: dict[Path, dict] = {}
    orphans = []
    for p, (stem, kind, n) in sorted(sidecars.items()):
        clips = by_stem.get((p.parent, stem.lower()), [])
        if len(clips) != 1:
            orphans.append((p, f"{kind} sidecar without a clip named {stem}.* beside it" if not clips else
                            f"{kind} sidecar of which clip? {' and '.join(c.name for c in clips)} share the name "
                            f"{stem}: rename one so each sidecar names its clip"))
            continue
        clip = clips[0]
        d = parts.setdefault(clip, {"refs": []})
        if kind == "ref":
            d["refs"].append((n, str(p)))
        else:
            d[kind] = str(p)
    inputs = {c: VaceInputs(tuple(r for _, r in sorted(d.pop("refs"))), **d) for c, d in parts.items()}
    return footage, inputs, orphans


def from_record(rec: dict, base: Path) -> VaceInputs:
    """A manifest row's conditioning columns: references separated by `;` (or a list), control, mask,
    pose, face, background."""
    def path(value) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return None
        p = Path(value.strip()).expanduser()
        return str(p if p.is_absolute() else base / p)

    refs = next((rec[c] for c in REFERENCE_COLUMNS if c in rec and rec[c] is not None), None)
    if isinstance(refs, str):
        refs = refs.split(";")
    refs = tuple(p for p in (path(r) for r in (list(refs) if refs is not None and not isinstance(refs, float) else [])) if p)
    return VaceInputs(refs, **{k: path(rec.get(k)) for k in VIDEO_KINDS.values()})


# --- checks at planning time -------------------------------------------------------------------


def _aspect(h: int, w: int) -> float:
    return w / h


def check_inputs(inputs: VaceInputs, clip: MediaInfo) -> None:
    """Raise SkipClip (the report's reason) when an input cannot serve the clip."""
    for kind, file in (("control", inputs.control), ("mask", inputs.mask)):
        if file is not None:
            check_video(kind, file, clip)
    if inputs.mask and not inputs.control:
        raise SkipClip(f"mask {Path(inputs.mask).name} without a control video: VACE masks which frames of the "
                       "control to keep; give clip.control.mp4 too")
    for file in inputs.references:
        problem = reference_problem(file, clip.height, clip.width)
        if problem:
            raise SkipClip(problem)


def check_video(kind: str, file: str, clip: MediaInfo, square: bool = False) -> None:
    """Raise SkipClip unless the `kind` video has one frame per clip frame and the clip's aspect
    (`square`: a square one, as Animate's face video, which its motion encoder reads as a square)."""
    name = Path(file).name
    try:
        info = probe(file, False)
    except SkipClip as err:
        raise SkipClip(f"{kind} video {name}: {err}") from None
    if info.frames < clip.frames:
        raise SkipClip(f"{kind} video {name} has {info.frames} frames, the clip {clip.frames}: it must have one "
                       "frame per clip frame (render it from the clip at the clip's frame rate)")
    if info.frames > clip.frames + 1:  # an encoder may add one trailing frame
        raise SkipClip(f"{kind} video {name} has {info.frames} frames, the clip {clip.frames}: they must match")
    want = 1.0 if square else _aspect(clip.height, clip.width)
    if abs(_aspect(info.height, info.width) / want - 1) > ASPECT_TOLERANCE:
        if square:
            raise SkipClip(f"{kind} video {name} is {info.width}x{info.height}: it must be square (crop it to the face)")
        raise SkipClip(f"{kind} video {name} is {info.width}x{info.height}, the clip {clip.width}x{clip.height}: "
                       f"a {kind} video must have the clip's shape (its size may differ, its aspect may not)")


def reference_problem(file: str, height: int, width: int) -> str | None:
    """Why a reference image cannot condition a `height` x `width` video (None when it can)."""
    from PIL import Image

    name = Path(file).name
    try:
        with Image.open(file) as im:
            im.verify()
        with Image.open(file) as im:
            w, h = im.size
    except FileNotFoundError:
        return f"reference image {name} does not exist"
    except Exception as err:
        return f"reference image {name} is not a readable image ({type(err).__name__})"
    # WanVACEPipeline fits a reference inside the frame on a white canvas: the share it fills.
    scale = min(height / h, width / w)
    fill = (h * scale) * (w * scale) / (height * width)
    if fill < MIN_REFERENCE_FILL:
        return (f"reference image {name} is {w}x{h}, the video {width}x{height}: fitted on the frame it would fill "
                f"{fill:.0%} of it; crop it nearer the video's aspect")
    return None


def window_frames(file: str, window: Window) -> np.ndarray:
    """The control (or mask) frames at the clip window's own source frame indices: a control made
    frame by frame from the clip lines up with it, variable frame rate or not."""
    info = probe(file, False)
    indices = [min(i, info.frames - 1) for i in window.indices]
    return read_frames(file, replace(window, indices=tuple(indices)), False)


def mask_problem(frames, name: str) -> str | None:
    """Why mask frames (PIL images or arrays) are not a black-and-white mask (VACE binarises at half grey)."""
    pixels = np.stack([np.asarray(f) for f in frames])
    grey = ((pixels > 48) & (pixels < 207)).mean()
    if grey > MAX_GREY_SHARE:
        return (f"mask {name} is not black and white ({grey:.0%} of its pixels are grey): VACE keeps black and "
                "generates white; threshold it")
    return None
