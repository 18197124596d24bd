"""Wan2.2-Animate's inputs for a render (`wan-tune sample`, the demo): the reference image, the
pose and face videos (and replacement's background and mask), read and cut as prep cuts them, and
the contact-sheet rows that show them above the render."""

from __future__ import annotations

from .vace_media import ConditioningError, control_frames, fitted_on_canvas, mask_frames


def animate_media(reference, pose: str, face: str, frames: int, height: int, width: int, face_size: int,
                  fps: float | None = None, background: str | None = None, mask: str | None = None,
                  start_s: float = 0.0) -> dict:
    """The pipeline's inputs: `image` (`reference`: a file, or a PIL image), `pose_video`, `face_video`
    (`frames` PIL frames each, from `start_s` at `fps`; the pose cut to `height` x `width` as prep cuts
    it, the face to the motion encoder's square), and with a background (replacement)
    `background_video`, `mask_video`, `mode`."""
    from PIL import Image

    image = reference.convert("RGB") if isinstance(reference, Image.Image) else open_reference(reference)
    at = dict(start_s=start_s, fps=fps)
    media = {"image": image, "pose_video": control_frames(pose, frames, height, width, **at, what="pose video"),
             "face_video": control_frames(face, frames, face_size, face_size, **at, what="face video")}
    if background is not None:
        if mask is None:
            raise ConditioningError("a background video replaces the person in it: give the person's mask video too")
        media.update(mode="replace",
                     background_video=control_frames(background, frames, height, width, **at, what="background video"),
                     mask_video=mask_frames(mask, frames, height, width, **at))
    return media


def open_reference(path):
    """The character's reference image as RGB, or a ConditioningError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise ConditioningError(f"reference image {path}: not a readable image ({type(err).__name__})") from None


def animate_rows(media: dict, height: int, width: int) -> list[tuple[str, "object"]]:
    """Contact-sheet rows: the reference (fitted on a black canvas, as the pipeline fills it), the pose
    and the face frames (and the background)."""
    import numpy as np

    from .video_io import frame_row

    rows = [("reference", fitted_on_canvas(media["image"], height, width, "black"))]
    for key, label in (("pose_video", "pose"), ("face_video", "face"), ("background_video", "background")):
        if media.get(key):
            frames = [np.asarray(f.resize((height, height)) if label == "face" else f) for f in media[key]]
            rows.append((label, frame_row(np.stack(frames))))
    return rows
