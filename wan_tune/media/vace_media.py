"""A VACE model's conditioning media for rendering (`wan-tune sample`, validation): the control
video, its mask and the reference images as `WanVACEPipeline` takes them, PIL frames at the
render size, cut and checked the way prep cuts and checks them for training."""

from __future__ import annotations

import math
from pathlib import Path


class ConditioningError(ValueError):
    """A control video, mask or reference cannot condition the render; the message says why."""


def control_frames(path: str, frames: int, height: int, width: int, start_s: float = 0.0, fps: float | None = None,
                   what: str = "control video") -> list:
    """`frames` frames of a control (or mask) video from `start_s`, at `fps` (None: the video's own
    rate, frame after frame), resized and centre-cropped to `height` x `width` as prep does."""
    from .footage import SkipClip, Window, pictures, probe, read_frames, resize_crop

    name = Path(path).name
    try:
        info = probe(path, False)
        rate = fps or info.fps
        available = math.floor((info.duration - start_s) * rate + 1e-6)
        if available < frames:
            raise ConditioningError(f"{what} {name} has {max(available, 0)} frames at {rate:g} fps (from {start_s:g} s), "
                                    f"the video {frames}: give a control at least as long")
        indices = tuple(info.frame_at(start_s + k / rate) for k in range(frames))
        pixels = read_frames(path, Window(0, indices, start_s, start_s), False)
    except SkipClip as err:
        raise ConditioningError(f"{what} {name}: {err}") from None
    return pictures(resize_crop(pixels, (height, width)))


def mask_frames(path: str, frames: int, height: int, width: int, start_s: float = 0.0, fps: float | None = None) -> list:
    """A mask video's frames (`control_frames`), refused unless black and white."""
    from .vace_inputs import mask_problem

    masks = control_frames(path, frames, height, width, start_s, fps, what="mask video")
    problem = mask_problem(masks, Path(path).name)
    if problem:
        raise ConditioningError(problem)
    return masks


def reference_images(paths: list[str], height: int, width: int) -> list:
    from PIL import Image

    from .vace_inputs import reference_problem

    out = []
    for path in paths:
        problem = reference_problem(path, height, width)
        if problem:
            raise ConditioningError(problem)
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def pipeline_inputs(media: dict) -> dict:
    """WanVACEPipeline keyword arguments of {"video", "mask", "reference_images"} (absent ones left out)."""
    return {k: v for k, v in media.items() if k in ("video", "mask", "reference_images") and v}


def sheet_rows(media: dict, height: int, width: int) -> list[tuple[str, "object"]]:
    """Contact-sheet rows showing the conditioning: the control, the mask, the references (each
    fitted on a white canvas the size of a frame, as the pipeline places it)."""
    import numpy as np

    from .video_io import frame_row

    rows = []
    for key, label in (("video", "control"), ("mask", "mask")):
        if media.get(key):
            rows.append((label, frame_row(np.stack([np.asarray(p) for p in media[key]]))))
    refs = media.get("reference_images") or []
    if refs:
        rows.append(("references", np.concatenate([fitted_on_canvas(ref, height, width, "white") for ref in refs], axis=1)))
    return rows


def fitted_on_canvas(image, height: int, width: int, color: str):
    """`image` (PIL) fitted inside a `height` x `width` canvas of `color`, centred, as an RGB array:
    how a pipeline places a reference of another aspect (VACE on white, Animate on black)."""
    import numpy as np
    from PIL import Image

    scale = min(height / image.height, width / image.width)
    canvas = Image.new("RGB", (width, height), color)
    fitted = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return np.asarray(canvas)


def validation_media(recipe, height: int, width: int, prefer: list[int]) -> list[dict]:
    """Each validation prompt's VACE inputs: the recipe's (`validation.references` / `controls` /
    `masks`), or, all three empty, the inputs of clips that have some (held-out ones first), cut
    at the clip's window as prep cut them for training. Fewer such clips than prompts: the rest
    render without."""
    v, fps = recipe.validation, recipe.data.fps
    if v.references or v.controls or v.masks:
        out = []
        for i in range(len(v.prompts)):
            control, mask = (v.controls[i] if v.controls else ""), (v.masks[i] if v.masks else "")
            refs = [p.strip() for p in (v.references[i] if v.references else "").split(";") if p.strip()]
            out.append({"video": control_frames(control, v.frames, height, width, fps=fps) if control else None,
                        "mask": mask_frames(mask, v.frames, height, width, fps=fps) if mask else None,
                        "reference_images": reference_images(refs, height, width)})
        return out
    return _clip_media(recipe, height, width, prefer)


def _clip_media(recipe, height: int, width: int, prefer: list[int]) -> list[dict]:
    from ..data.shards import ShardReader
    from .vace_inputs import VaceInputs

    v = recipe.validation
    out = []
    for row in ShardReader(recipe.data.shards).clip_rows(prefer):
        inputs = VaceInputs.from_json(row.get("vace"))  # the files prep encoded this clip's context from
        if not inputs:
            continue
        start = float(row["start_s"])
        out.append({"video": control_frames(inputs.control, v.frames, height, width, start, recipe.data.fps)
                    if inputs.control else None,
                    "mask": mask_frames(inputs.mask, v.frames, height, width, start, recipe.data.fps) if inputs.mask else None,
                    "reference_images": reference_images(list(inputs.references), height, width)})
        if len(out) == len(v.prompts):
            break
    return out + [{} for _ in range(len(v.prompts) - len(out))]
