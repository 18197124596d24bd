"""What a checkpoint records of how it was trained, where state.json's checksum covers it.

recipe.yaml stays beside each checkpoint for people to read and edit (to train it again); the
facts that decide what an adapter *is* (variant, method, rank, alpha, targets, experts) and the
data it learned from (the shards' index hash, the prep settings that shaped it, its clips and
hours) are written into state.json when the checkpoint is saved. Export reads them from there
(an edited alpha in recipe.yaml would ship the LoRA at another strength), the model card
describes the data trained on (not what the shards hold by export time), and a resume on shards
that another prep changed stops and says what changed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from ..config import Recipe

# recipe key -> how state.json's "training" names it
TRAINING_KEYS = {"model.variant": "variant", "adapter.method": "method", "adapter.rank": "rank",
                 "adapter.alpha": "alpha", "adapter.targets": "targets", "model.experts": "experts",
                 "model.expert_mode": "expert_mode"}


def _get(recipe: Recipe, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def training_facts(recipe: Recipe) -> dict:
    return {name: _get(recipe, key) for key, name in TRAINING_KEYS.items()}


def data_facts(shards: str | Path) -> dict:
    """Clips, samples, buckets, hours of footage, the index's hash and the prep settings, from the
    shards ({} when they cannot be read)."""
    from ..data.shards import INDEX_FILE, ShardFormatError, ShardReader, read_meta

    try:
        index = ShardReader(shards).index
        settings = read_meta(shards).get("settings", {})
        digest = hashlib.sha256((Path(shards) / INDEX_FILE).read_bytes()).hexdigest()[:16]
    except (ShardFormatError, OSError):
        return {}
    buckets = Counter(f"{r.frames}x{r.height}x{r.width}" for r in index.itertuples())
    seconds = float((index["end_s"] - index["start_s"]).clip(lower=0).sum())
    facts = {"clips": int(index["source"].nunique()), "samples": len(index), "buckets": dict(sorted(buckets.items())),
             "hours": seconds / 3600, "index_sha256": digest, "prep": settings}
    if "dataset" in index and index["dataset"].nunique() > 1:  # data.sources: samples of each
        facts["sources"] = {str(k): int(v) for k, v in sorted(index["dataset"].value_counts().items())}
        facts["clips"] = int(index[["dataset", "source"]].drop_duplicates().shape[0])
    return facts


def recorded_facts(recipe: Recipe, checkpoint: Path | None = None) -> dict:
    """{"training": ..., "data": ...}: what each checkpoint of this run records (computed once a run;
    `checkpoint`: the one it resumes, whose record of adapter.init_from's files it carries)."""
    from .init_from import init_facts

    training = training_facts(recipe)
    if recipe.adapter.init_from:
        training["init_from"] = init_facts(recipe, checkpoint)
    return {"training": training, "data": data_facts(recipe.data.shards)}


def recipe_drift(recipe: Recipe, state: dict) -> list[tuple[str, object, object]]:
    """[(recipe key, recipe.yaml's value, the trained value)] where the checkpoint's recipe.yaml no
    longer says what state.json recorded ([] for checkpoints that recorded nothing)."""
    trained = state.get("training") or {}
    return [(key, _get(recipe, key), trained[name]) for key, name in TRAINING_KEYS.items()
            if name in trained and _get(recipe, key) != trained[name]]


def data_change(saved: dict, now: dict) -> str | None:
    """What differs between the data a checkpoint trained on and the shards now (None: the same,
    or nothing recorded to compare)."""
    if not saved.get("index_sha256") or not now.get("index_sha256") or saved["index_sha256"] == now["index_sha256"]:
        return None
    before, after = saved.get("prep") or {}, now.get("prep") or {}
    changed = [f"data.{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]
    counts = f"{saved.get('samples')} samples of {saved.get('clips')} clips -> {now.get('samples')} of {now.get('clips')}"
    return f"index {saved['index_sha256']} -> {now['index_sha256']}, {counts}" + (f"; {', '.join(changed)}" if changed else "")
