"""Wan2.2-Animate's per-clip inputs, checked before anything is encoded (#38).

Beside each clip (or in a manifest's columns): the pose video (`clip.pose.mp4`, `pose`) and the face
video (`clip.face.mp4`, `face`: the face cropped square, as Wan2.2's Animate preprocessing writes
it), both one frame per clip frame; optionally the character's reference image (`clip.ref.png`,
`reference`; without one, the clip's first frame); for replacement, the background with the
character removed (`clip.bg.mp4`, `background`) and the character's mask (`clip.mask.mp4`, `mask`,
white where the character is). media/vace_inputs.py finds them; a bad one is a report row.
"""

from __future__ import annotations

from pathlib import Path

from wan_tune.media.footage import MediaInfo, SkipClip
from wan_tune.media.vace_inputs import VaceInputs, check_video, reference_problem

SIDECARS = {"pose": "clip.pose.mp4", "face": "clip.face.mp4", "background": "clip.bg.mp4", "mask": "clip.mask.mp4"}


def check_animate_inputs(inputs: VaceInputs, clip: MediaInfo, mode: str = "animate") -> None:
    """Raise SkipClip (the report's reason) when the clip's inputs cannot condition it in `mode`
    (animate: pose and face; replace: those, the background and the mask)."""
    needed = ("pose", "face") + (("background", "mask") if mode == "replace" else ())
    missing = [k for k in needed if not getattr(inputs, k)]
    if missing:
        raise SkipClip(f"Wan2.2-Animate ({mode}) needs a {' and a '.join(missing)} video per clip: none given "
                       f"(sidecar {', '.join(SIDECARS[k] for k in missing)} or manifest column {', '.join(missing)})")
    for kind in needed:
        check_video(kind, getattr(inputs, kind), clip, square=kind == "face")
    if inputs.references:
        problem = reference_problem(inputs.references[0], clip.height, clip.width)
        if problem:
            raise SkipClip(problem)
        if len(inputs.references) > 1:
            raise SkipClip(f"Wan2.2-Animate takes one reference image, the clip has {len(inputs.references)} "
                           f"({', '.join(Path(r).name for r in inputs.references)}): keep one")
