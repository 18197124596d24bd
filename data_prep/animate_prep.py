"""Wan2.2-Animate's tensors for one sample (#38): its pose and face videos (and replacement's
background and mask) cut to the clip's window, the reference image (the clip's sidecar, else the
window's first frame), encoded by the pipeline's own methods (wan_tune/models/animate.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from wan_tune.media.animate_media import open_reference
from wan_tune.media.footage import SkipClip, pictures
from wan_tune.media.vace_inputs import mask_problem, window_frames
from wan_tune.media.vace_media import ConditioningError
from wan_tune.models.animate import encode_conditions

from .buckets import resize_crop


def animate_tensors(animate_pipe, sample, video: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """`sample`'s Animate conditioning; `video` is its clip as cut for the latents ([3, T, H, W] in
    [-1, 1]). Pose, background and mask are cropped as the clip is, so they stay on it; the face
    video is whole (the pipeline resizes it to the motion encoder's square)."""
    from PIL import Image

    inputs, (_, h, w) = sample.item.vace, sample.bucket

    def cut(file):
        return pictures(resize_crop(window_frames(file, sample.window), (h, w))) if file else None

    face = [Image.fromarray(f) for f in window_frames(inputs.face, sample.window)]
    background, mask = (cut(inputs.background), cut(inputs.mask)) if mode == "replace" else (None, None)
    if mask is not None:
        problem = mask_problem(mask, Path(inputs.mask).name)
        if problem:
            raise SkipClip(problem)
    if inputs.references:
        try:
            reference = open_reference(inputs.references[0])
        except ConditioningError as err:  # checked when planned; a file changed since is a reason, not a crash
            raise SkipClip(str(err)) from None
    else:
        reference = pictures(video[:, [0]])[0]
    return encode_conditions(animate_pipe, reference, cut(inputs.pose), face, h, w, mode, background, mask)
