"""Captions a studio can review before anything is encoded.

`wan-tune caption` writes one row per source item to `data.captions` (a CSV: key, caption,
origin); the studio edits it; `wan-tune prep` encodes what it says. Rerunning keeps every
caption already in the file unless `caption.overwrite` is set, so reviewed text is never lost.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from wan_tune.config.schema import CaptionConfig
from wan_tune.data.atomic import write_text
from wan_tune.data.progress import progress_bar
from wan_tune.media.footage import SkipClip, Window, probe, read_frames

from .sources import SourceItem, discover_all

COLUMNS = ("key", "caption", "origin")


class CaptionFileError(ValueError):
    """The caption review file cannot be read as wan-tune wrote it; the message says how to mend it."""


def read_captions(path: str | Path) -> dict[str, str]:
    """{key: its first caption} of the review file."""
    return {key: captions[0] if captions else "" for key, captions in read_caption_lists(path).items()}


def read_caption_lists(path: str | Path) -> dict[str, list[str]]:
    """{key: its captions} of the review file: one row a caption, so a clip with three captions has
    three rows with its key (empty ones are left out). A spreadsheet's "CSV UTF-8" (with its
    byte-order mark) reads; a legacy encoding or a renamed header is refused with the file named,
    never guessed."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionFileError(f"{path} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}): save it as "
                               "\"CSV UTF-8\" (a spreadsheet's plain \"CSV\" turns accents into another encoding)") from None
    # strict: a file cut inside a quoted caption is an error, not a shorter caption; the field
    # limit is lifted so that a long caption typed in a spreadsheet reads (prep truncates it to tokens).
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        missing = [c for c in ("key", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise CaptionFileError(f"{path}: no {' or '.join(missing)} column (its header is {', '.join(reader.fieldnames or [])}; "
                                   f"expected {', '.join(COLUMNS)}): restore the header, or delete the file to caption again")
        out: dict[str, list[str]] = {}
        for row in reader:
            text = (row.get("caption") or "").strip()
            out.setdefault(row["key"], [])
            if text and text not in out[row["key"]]:
                out[row["key"]].append(text)
        return out
    except csv.Error as err:
        raise CaptionFileError(f"{path} does not read as CSV ({err}: the file is cut off, or a quote is not closed): "
                               "mend it in a spreadsheet or text editor, or delete it to caption again") from None


def write_captions(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def fill_template(cfg: CaptionConfig, item: SourceItem) -> str:
    text = cfg.template.format(trigger=cfg.trigger_word, stem=Path(item.path).stem, caption=item.caption or "")
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")


def sample_frames(item: SourceItem, count: int):
    """`count` frames spread evenly over the item, as PIL images (one for a still)."""
    from PIL import Image

    info = probe(item.path, item.is_image)
    if info.is_image:
        frames = read_frames(item.path, Window(0, (0,), 0, 0), True)
    else:
        start = item.start_s or 0.0
        end = min(info.duration, item.end_s) if item.end_s is not None else info.duration
        first = info.frame_at(start)
        last = max(first, info.frame_at(end - 1e-3))  # the frame shown just before `end`
        idx = tuple(int(i) for i in np.linspace(first, last, num=min(count, last - first + 1)).round())
        frames = read_frames(item.path, Window(0, idx, start, end), False)
    return [Image.fromarray(f) for f in frames]


def make_captions(items: list[SourceItem], cfg: CaptionConfig, path: str | Path, progress: bool = True,
                  per_source: dict[str, CaptionConfig] | None = None) -> dict[str, int]:
    """Write the caption review file for `items`, keeping every caption already in it (unless
    caption.overwrite) and adding rows for new items; returns how many captions came from where.
    `per_source`: {item prefix: its source's caption settings} where `data.sources` gives its own."""
    existing = read_caption_lists(path)
    items = [item for item in items if item.supported and not item.problem]  # prep's report names the others
    rows, todo, todo_items = [], [], []
    for item in items:
        own = (per_source or {}).get(item.prefix, cfg)
        # A recipe moved from data.source to data.sources: its reviewed captions, under the clip's key
        # without the source's name, carry over to the new key.
        kept = existing.get(item.key) or (existing.get(item.key[len(item.prefix):]) if item.prefix else None)
        if kept and not own.overwrite:
            rows += [{"key": item.key, "caption": text, "origin": "kept"} for text in kept]
        elif own.mode == "template":
            rows.append({"key": item.key, "caption": fill_template(own, item), "origin": "template"})
        elif own.mode == "vlm":
            rows.append({"key": item.key, "caption": "", "origin": "vlm"})
            todo.append(len(rows) - 1)
            todo_items.append(item)
        elif item.captions:  # a sidecar of several lines: a row for each
            rows += [{"key": item.key, "caption": text, "origin": "sidecar"} for text in item.captions]
        else:
            rows.append({"key": item.key, "caption": "", "origin": "missing"})
    if todo:
        triggers = [(per_source or {}).get(item.prefix, cfg).trigger_word for item in todo_items]
        _vlm_fill(rows, todo_items, todo, cfg, progress, triggers)
    # Reviewed captions of clips no longer in the source stay in the file (a studio's work is
    # never dropped); prep only encodes the items it finds.
    current = {item.key for item in items}
    rows += [{"key": k, "caption": c, "origin": "not in source"} for k, texts in existing.items() if k not in current
             for c in texts or [""]]
    write_captions(path, rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["origin"]] = counts.get(row["origin"], 0) + 1
    return counts


def caption_recipe(recipe, progress: bool = True, found=None) -> dict[str, int]:
    """`make_captions` for every source of the recipe (`found`: `discover_all`'s answer, when the
    caller has it), each with its own caption settings."""
    found = discover_all(recipe) if found is None else found
    items = [item for _, source_items in found for item in source_items]
    return make_captions(items, recipe.caption, recipe.data.captions, progress, {src.prefix: src.caption for src, _ in found})


def _vlm_fill(rows: list[dict], items: list[SourceItem], where: list[int], cfg: CaptionConfig, progress: bool,
              triggers: list[str]) -> None:
    from .vlm import VLMCaptioner

    captioner = VLMCaptioner(cfg.vlm_model, cfg.vlm_prompt, max_new_tokens=cfg.vlm_max_new_tokens, batch_size=cfg.vlm_batch_size)
    bar = progress_bar(total=len(items), desc="caption (vlm)", unit="clip", disable=not progress)
    for lo in range(0, len(items), cfg.vlm_batch_size):
        batch, slots = [], []
        for item, row_i in zip(items[lo : lo + cfg.vlm_batch_size], where[lo : lo + cfg.vlm_batch_size]):
            try:
                batch.append(sample_frames(item, cfg.vlm_frames))
                slots.append(row_i)
            except SkipClip as err:  # prep reports unreadable inputs; the caption stays empty
                rows[row_i]["origin"] = f"unreadable: {err}"
        trigger_of = dict(zip(where, triggers))
        for row_i, text in zip(slots, captioner.caption(batch) if batch else []):
            rows[row_i]["caption"] = f"{trigger_of[row_i]}, {text}" if trigger_of[row_i] else text
        bar.update(len(items[lo : lo + cfg.vlm_batch_size]))
    bar.close()

