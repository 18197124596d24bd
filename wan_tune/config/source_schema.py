"""One entry of `data.sources`: a folder, manifest or dataset with its own sizes, repeats and role.

Every setting left empty takes the `data.*` / `caption.*` key of the same name, so a source says only
what differs. Its docs are the recipe reference's `data.sources[]` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .field_checks import frames_4k1, holdout_share, positive, resolutions_16, source_name
from .options import opt

FRAME_EXTRACTION = ("slide", "head", "uniform")
ROLES = ("train", "preserve")


@dataclass
class SourceConfig:
    """One footage source of `data.sources` (empty settings: the `data.*` / `caption.*` key of the same name)."""

    path: Optional[str] = opt(None, "Folder, CSV/JSONL/Parquet manifest or saved `datasets` dataset, as `data.source`.")
    name: Optional[str] = opt(
        None, "Name in the index's `dataset` column, the logs and the held-out scores; empty = the folder or manifest's "
        "name. Clips are keyed `<name>/<path>` in the captions file.", check=source_name)
    repeats: Optional[float] = opt(
        None, "Times each of its samples is drawn per epoch (2 = twice; 0.5 = half of them, a new half each epoch); "
        "empty = 1. Give `weight` instead to set shares.", check=positive)
    weight: Optional[float] = opt(
        None, "Its share of the samples drawn (normalised over the sources; an epoch draws as many samples as the "
        "sources hold). Give every source a weight, or none.", check=positive)
    role: str = opt(
        "train", "train: learn it; preserve: regularisation, whose target is the base model's own prediction (adapter "
        "off), so the adapter keeps what the model did there (`train.preserve_weight` scales its loss).", choices=ROLES)
    holdout: Optional[float] = opt(None, "Its share kept out for the held-out loss; empty = `data.holdout`.",
                                   check=holdout_share)
    resolutions: Optional[list[list[int]]] = opt(None, "Its pixel areas; empty = `data.resolutions`.",
                                                 check=resolutions_16)
    frames: Optional[list[int]] = opt(None, "Its frame buckets; empty = `data.frames`. A source of stills needs none "
                                            "(an image is a one-frame sample).", check=frames_4k1)
    fps: Optional[float] = opt(None, "Its frame rate; empty = `data.fps`.", check=positive)
    max_clips_per_video: Optional[int] = opt(None, "Empty = `data.max_clips_per_video`.", check=positive)
    clip_stride: Optional[int] = opt(None, "Empty = `data.clip_stride`.", check=lambda v: None if v >= 0 else
                                     f"must be >= 0, got {v}")
    frame_extraction: Optional[str] = opt(None, "Empty = `data.frame_extraction`.", choices=FRAME_EXTRACTION)
    trigger_word: Optional[str] = opt(None, "Empty = `caption.trigger_word`.")
    template: Optional[str] = opt(None, "Empty = `caption.template`.")
    mode: Optional[str] = opt(None, "Caption mode for its clips; empty = `caption.mode`.",
                              choices=("sidecar", "template", "vlm"))
