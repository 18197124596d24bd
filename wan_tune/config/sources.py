"""The recipe's footage sources, each with every setting resolved: `data.sources` entries (their empty
settings filled from `data.*` / `caption.*`), or `data.source` as one source.

Prep reads each source with its own sizes and captions; training draws from each by its repeats or
weight and holds out its own share. Everything that asks "which settings does this clip have" asks here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .schema import CaptionConfig, Recipe

DEFAULT_NAME = "default"  # data.source with no name of its own (its index rows say this)


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    listed: bool
    """From `data.sources` (its clips are keyed `<name>/<path>`), not the `data.source` shorthand."""
    repeats: float
    weight: float | None
    role: str
    holdout: float
    fps: float
    frames: tuple[int, ...]
    resolutions: tuple[tuple[int, int], ...]
    max_clips_per_video: int
    clip_stride: int
    frame_extraction: str
    caption: CaptionConfig

    @property
    def prefix(self) -> str:
        """What its clips' keys (captions file, sample ids) start with: none for `data.source`, so a
        recipe that names one source keeps the keys (and the encoded samples) it always had."""
        return f"{self.name}/" if self.listed else ""

    def settings(self) -> dict:
        """What decides which windows and buckets its clips give (prep records it; an edit shows)."""
        return {"fps": self.fps, "frames": sorted(self.frames), "resolutions": [list(r) for r in self.resolutions],
                "max_clips_per_video": self.max_clips_per_video, "clip_stride": self.clip_stride,
                "frame_extraction": self.frame_extraction}


def default_name(path: str | None, i: int) -> str:
    stem = Path(path).expanduser().stem if path else ""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or f"source{i}"


def data_sources(recipe: Recipe) -> list[Source]:
    """Every source of the recipe, in the recipe's order (empty when it names none)."""
    d, c = recipe.data, recipe.caption
    if not d.sources:
        if not d.source:
            return []
        return [Source(DEFAULT_NAME, d.source, False, 1.0, None, "train", d.holdout, d.fps, tuple(d.frames),
                       tuple(map(tuple, d.resolutions)), d.max_clips_per_video, d.clip_stride, d.frame_extraction, c)]
    out = []
    for i, s in enumerate(d.sources):
        def pick(key: str, default):
            value = getattr(s, key)
            return default if value is None else value

        caption = dataclasses.replace(c, mode=pick("mode", c.mode), trigger_word=pick("trigger_word", c.trigger_word),
                                      template=pick("template", c.template))
        out.append(Source(
            s.name or default_name(s.path, i), s.path or "", True, pick("repeats", 1.0), s.weight, s.role,
            pick("holdout", d.holdout), pick("fps", d.fps), tuple(pick("frames", d.frames)),
            tuple(map(tuple, pick("resolutions", d.resolutions))), pick("max_clips_per_video", d.max_clips_per_video),
            pick("clip_stride", d.clip_stride), pick("frame_extraction", d.frame_extraction), caption))
    return out


def by_name(recipe: Recipe) -> dict[str, Source]:
    return {s.name: s for s in data_sources(recipe)}


def footage_file(recipe: Recipe, dataset: str, rel: str) -> tuple[Path, float]:
    """(the file an index row's `source` names, its source's fps): paths are relative to the
    source's folder, or to a manifest's folder."""
    sources = by_name(recipe)
    src = sources.get(dataset) or next(iter(sources.values()), None)
    if Path(rel).is_absolute() or src is None:
        return Path(rel), src.fps if src else recipe.data.fps
    base = Path(src.path or ".").expanduser()
    base = base.parent if base.is_file() else base  # a manifest: its paths are relative to its folder
    return base / rel, src.fps


def all_frames(recipe: Recipe) -> list[int]:
    """Every frame bucket of every source (the plan sizes the largest, validation the first)."""
    found = sorted({n for s in data_sources(recipe) for n in s.frames})
    return found or sorted(recipe.data.frames)


def all_resolutions(recipe: Recipe) -> list[list[int]]:
    """Every pixel area of every source, in recipe order without repeats."""
    seen: list[list[int]] = []
    for s in data_sources(recipe) or []:
        seen += [list(r) for r in s.resolutions if list(r) not in seen]
    return seen or [list(r) for r in recipe.data.resolutions]


def source_errors(recipe: Recipe, explicit: set[str]) -> list[tuple[str, str]]:
    """Rules over several sources (a source's own fields are checked key by key by the loader)."""
    d, errors = recipe.data, []
    if not d.sources:
        return errors
    if d.source:
        errors.append(("data.source", "and data.sources are both set: give one source as data.source, or list them all "
                       "in data.sources"))
    for i, s in enumerate(d.sources):
        if not s.path:
            errors.append((f"data.sources[{i}].path", "is empty: each source names a folder, manifest or saved dataset"))
    names = [src.name for src in data_sources(recipe)]
    for i, name in enumerate(names):
        if name in names[:i]:
            errors.append((f"data.sources[{i}].name", f"{name!r} is the name of data.sources[{names.index(name)}] too: "
                           "give each source its own name"))
    weighted = [s.weight is not None for s in d.sources]
    if any(weighted) and not all(weighted):
        errors.append(("data.sources", f"data.sources[{weighted.index(False)}] has no weight while others do: give every "
                       "source a weight (shares of the draw), or none (repeats)"))
    for i, s in enumerate(d.sources):
        if s.weight is not None and s.repeats is not None:
            errors.append((f"data.sources[{i}].repeats", "and weight are both set: give one (weight sets shares, "
                           "repeats counts)"))
    preserving = [i for i, s in enumerate(d.sources) if s.role == "preserve"]
    if preserving and recipe.adapter.method == "full":
        errors.append((f"data.sources[{preserving[0]}].role", "preserve compares with the base model (the adapter "
                       "turned off); a full fine-tune has no adapter to turn off: use a LoRA method, or role: train"))
    if preserving and len(preserving) == len(d.sources):
        errors.append((f"data.sources[{preserving[0]}].role", "preserve keeps the base model's behaviour on these "
                       "clips while another source teaches; add a source with role: train"))
    return errors
