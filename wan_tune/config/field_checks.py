"""Field checks of the recipe keys (schema.py's `check=`): each returns a message, or None when the
value is fine. Rules that involve several keys live in checks.py."""

from __future__ import annotations

import math
from typing import Any


def positive(v: Any) -> str | None:
    return None if v is None or (v > 0 and math.isfinite(v)) else f"must be a finite number > 0, got {v}"


def non_negative(v: Any) -> str | None:
    return None if v is None or (v >= 0 and math.isfinite(v)) else f"must be a finite number >= 0, got {v}"


def seed_range(v: Any) -> str | None:
    # torch generators take 64-bit seeds; the trainer mixes a step's position into it (mod 2^63).
    return None if 0 <= v < 2**63 else f"must be in [0, 2^63), got {v}"


TEXT_ENCODER_TOKENS = 512  # umT5 as every Wan pipeline uses it: positions beyond it were never trained


def text_tokens(v: Any) -> str | None:
    if 1 <= v <= TEXT_ENCODER_TOKENS:
        return None
    return f"must be 1 to {TEXT_ENCODER_TOKENS} (the umT5 text encoder's limit, and the length Wan pads prompts to), got {v}"


MAX_NAME_BYTES = 180


def plain_name(v: Any) -> str | None:
    """A run name is one folder name: it never leads out of run.output_dir (export names files after it too)."""
    if not v.strip() or v in (".", "..") or any(c in v for c in '/\\') or any(ord(c) < 32 for c in v):
        return f"must be a plain folder name (no '/', no '..', not empty), got {v!r}; put folders in run.output_dir"
    if len(v.encode()) > MAX_NAME_BYTES:  # a file name holds 255 bytes; export adds up to 60 (A14B, diffusers, .failed)
        return (f"is {len(v.encode())} bytes; at most {MAX_NAME_BYTES}: export names its files "
                f"<name>-step000000-high_noise-diffusers.safetensors")
    return None


def source_name(v: Any) -> str | None:
    """A source's name: a word of the index, the logs and the captions file's keys (`<name>/<path>`)."""
    if v and all(c.isalnum() or c in "-_." for c in v) and v not in (".", ".."):
        return None
    return f"must be letters, digits, '-', '_' or '.', got {v!r}"


def shift_value(v: Any) -> str | None:
    """timesteps.shift: a number > 0, or auto (from each batch's token count)."""
    if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
        return None
    return f"must be a number > 0 or auto, got {v!r}"


def unit_interval(v: Any) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"


def below_one(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v}"


def holdout_share(v: Any) -> str | None:
    return None if 0 <= v <= 0.5 else f"must be in [0, 0.5] (a share of the samples; 0 = off), got {v}"


def sigmas_in_unit_interval(v: Any) -> str | None:
    if not v:
        return "give at least one sigma"
    bad = [s for s in v if not 0 < s < 1]
    return f"sigmas must be in (0, 1), got {bad}" if bad else None


def _frame_hint(n: int) -> str:
    lo = max(1, (n - 1) // 4 * 4 + 1)
    return f"{lo} or {lo + 4}" if lo != n else str(n)


def frames_4k1(v: Any) -> str | None:
    values = v if isinstance(v, list) else [v]
    if not values:
        return "needs at least one frame count"
    bad = [n for n in values if n < 1 or (n - 1) % 4]
    if bad:
        return (
            "frame counts must be 4k+1 (1, 5, 9, ..., 81: the VAE packs 4 frames per latent after the first); "
            + ", ".join(f"{n} (try {_frame_hint(n)})" for n in bad)
        )
    return None


def resolutions_16(v: Any) -> str | None:
    if not v:
        return "needs at least one [height, width] pair"
    for pair in v:
        if len(pair) != 2:
            return f"each entry is a [height, width] pair, got {list(pair)}"
        if any(side <= 0 or side % 16 for side in pair):
            return f"height and width must be positive multiples of 16 (VAE 8x, patch 2x), got {list(pair)}"
    return None


def multiple_of_16(v: Any) -> str | None:
    return None if v is None or (v > 0 and v % 16 == 0) else f"must be a positive multiple of 16, got {v}"


def expert_labels(v: Any) -> str | None:
    bad = [x for x in v if x not in ("high_noise", "low_noise")]
    if bad:
        return f"experts are high_noise and low_noise; got {bad}"
    return "each expert once" if len(set(v)) != len(v) else None


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "adafactor", "prodigy", "schedulefree_adamw", "came")


def optimizer_name(v: Any) -> str | None:
    if v in OPTIMIZERS or (v.count(":") == 1 and all(part.strip() for part in v.split(":"))):
        return None
    return f"must be one of {', '.join(OPTIMIZERS)} or `module:Class` (e.g. torch.optim:SGD), got {v!r}"


def two_betas(v: Any) -> str | None:
    return None if len(v) == 2 and all(0 <= b < 1 for b in v) else f"must be two values in [0, 1), got {list(v)}"


