"""Validation's inputs taken from the clips prep encoded, when the recipe gives none: I2V's first
frames (FLF2V's last ones too) and Wan2.2-Animate's reference, pose and face videos, held-out clips
first, each read from the footage prep read and cut at the window prep trained on."""

from __future__ import annotations

from ..config import Recipe
from ..config.sources import DEFAULT_NAME, footage_file


def window_pictures(recipe: Recipe, row: dict, last: bool = False) -> list:
    """The first frame (PIL) of `row`'s window, and with `last` the frame at the window's last
    frame's time, through prep's own reader (rotation and variable frame rate as prep saw them)."""
    from PIL import Image

    from ..media.footage import IMAGE_EXTS, Window, probe, read_frames

    name = row.get("dataset") or DEFAULT_NAME
    path, fps = footage_file(recipe, name, row["source"])
    if not path.is_file():
        raise ValueError(f"validation takes frames of the clips prep read when the recipe gives none, but {path} is "
                         f"not here (source {name}): give validation.images (Wan2.2-Animate: validation.references)")
    still = path.suffix.lower() in IMAGE_EXTS
    info = None if still else probe(str(path), False)
    times = [float(row["start_s"])] + ([float(row["start_s"]) + (int(row["frames"]) - 1) / fps] if last else [])
    indices = tuple(0 if still else info.frame_at(t) for t in times)  # as prep's windows pick them
    pictures = [Image.fromarray(a) for a in read_frames(str(path), Window(0, indices, 0.0, 0.0), still)]
    return pictures * 2 if last and still else pictures  # a still image is its own first and last frame


def clip_first_frames(recipe: Recipe, shards, prefer: list[int], count: int, last: bool = False) -> list:
    """I2V validation without `validation.images`: the first frames of the windows of `count`
    clips, held-out ones (`prefer`) first. `last` (FLF2V): (first, last) pairs."""
    from ..data.shards import ShardReader

    frames = []
    for row in ShardReader(shards).clip_rows(prefer):
        pictures = window_pictures(recipe, row, last)
        frames.append(tuple(pictures) if last else pictures[0])
        if len(frames) == count:
            break
    return frames


def animate_validation_media(recipe: Recipe, face_size: int, height: int, width: int, prefer: list[int]) -> list[dict]:
    """Wan2.2-Animate validation: each prompt's `WanAnimatePipeline` inputs from a clip (held-out
    ones first; fewer clips than prompts: they serve again in turn): its pose and face videos (and
    with `animate.mode: replace` its background and mask) from its window's start, `validation.frames`
    of them at the recipe's frame rate, and the character: `validation.references[i]` (your mascot
    performing the clip), else the clip's reference image, else its window's first frame (as prep
    took it for training)."""
    from itertools import islice

    from ..data.shards import ShardReader
    from ..media.animate_media import animate_media
    from ..media.vace_inputs import VaceInputs

    v, replace = recipe.validation, recipe.animate.mode == "replace"
    clips = list(islice(ShardReader(recipe.data.shards).clip_rows(prefer), len(v.prompts)))
    out = []
    for i in range(len(v.prompts)):
        row = clips[i % len(clips)]
        inputs = VaceInputs.from_json(row.get("vace"))
        given = v.references[i].strip() if i < len(v.references) else ""
        reference = given or (inputs.references[0] if inputs.references else window_pictures(recipe, row)[0])
        _, fps = footage_file(recipe, row.get("dataset") or DEFAULT_NAME, row["source"])  # the source's rate
        out.append(animate_media(reference, inputs.pose, inputs.face, v.frames, height, width, face_size, fps,
                                 inputs.background if replace else None, inputs.mask if replace else None,
                                 start_s=float(row["start_s"])))
    return out
