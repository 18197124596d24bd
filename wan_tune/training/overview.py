"""Validation a person can judge at a glance: contact sheets and one overview page per run.

Each validation round writes, per prompt, `step-NNNNNN/NN.png`: a row of evenly spaced frames of
the base model's video (rendered once per run with the same seed, kept in `base/`) above the same
frames from the current weights. `index.html` beside them shows every round, newest first, with
the held-out loss of that step when there is one; it is rewritten after each round.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..data.atomic import atomic_write, write_text

LABEL_HEIGHT = 14  # PIL's default bitmap font is 11 px high


def labelled(row: np.ndarray, label: str) -> np.ndarray:
    """The row under a strip carrying its label."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (row.shape[1], LABEL_HEIGHT), (24, 24, 24))
    ImageDraw.Draw(strip).text((3, 1), label, fill=(235, 235, 235))
    return np.concatenate([np.asarray(strip), row], axis=0)


def write_sheet(path: Path, rows: list[tuple[str, np.ndarray]]) -> Path:
    """One PNG: each (label, frame row) under its label, top to bottom."""
    from PIL import Image

    width = max(r.shape[1] for _, r in rows)
    panels = [labelled(np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))), label) for label, r in rows]
    sheet = Image.fromarray(np.concatenate(panels, axis=0))
    return atomic_write(Path(path), lambda tmp: sheet.save(tmp, format="PNG"))


def read_row(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_row(path: Path, row: np.ndarray) -> Path:
    from PIL import Image

    return atomic_write(Path(path), lambda tmp: Image.fromarray(row).save(tmp, format="PNG"))


def write_overview(validation_dir: Path, prompts: list[str], metrics: Path) -> Path:
    """validation/index.html: every round's sheets, newest first, with its held-out loss."""
    from .metrics import heldout_by_step

    validation_dir = Path(validation_dir)
    losses = heldout_by_step(metrics)
    rounds = sorted((p for p in validation_dir.glob("step-*") if p.is_dir()), reverse=True)
    parts = ["<!doctype html><meta charset='utf-8'><title>validation</title>",
             "<style>body{font-family:sans-serif;background:#111;color:#ddd} img{max-width:100%;image-rendering:pixelated}"
             " h2{margin-top:2em} figure{margin:0 0 1em 0}</style>",
             "<h1>Validation rounds</h1><p>Each sheet: the base model (top) and the weights of that step (below), "
             "same prompt, same seed.</p>"]
    for folder in rounds:
        step = int(folder.name.split("-")[1])
        loss = f" &middot; held-out loss {losses[step]:.4f}" if step in losses else ""
        parts.append(f"<h2>step {step}{loss}</h2>")
        for sheet in sorted(folder.glob("*.png")):
            i = int(sheet.stem)
            caption = html.escape(prompts[i]) if i < len(prompts) else sheet.stem
            parts.append(f"<figure><img src='{folder.name}/{sheet.name}'><figcaption>{caption}</figcaption></figure>")
    return write_text(validation_dir / "index.html", "\n".join(parts) + "\n")
