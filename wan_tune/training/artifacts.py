"""W&B model artifacts (`tracking.log_artifacts`): each checkpoint's adapter (`all`), the best one by
held-out loss (`best`; the last one when the run has no held-out clips), or none; the exported
files are logged by export (export/artifact.py). Each artifact carries the step and held-out loss as metadata, so the
W&B model registry can rank them."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import Recipe


def wanted(recipe: Recipe) -> bool:
    return recipe.tracking.backend == "wandb" and recipe.tracking.log_artifacts != "none"


def artifact_name(recipe: Recipe, kind: str) -> str:
    """W&B artifact names take letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^\w.-]", "-", f"{recipe.run.name}-{kind}")


def make_artifact(recipe: Recipe, kind: str, files: list[Path], metadata: dict, root: Path | None = None):
    """The artifact of `files`, each named by its path under `root` (its own name without one)."""
    import wandb

    artifact = wandb.Artifact(artifact_name(recipe, kind), type="model", metadata={
        "variant": recipe.model.variant, "method": recipe.adapter.method, **metadata})
    for file in files:
        artifact.add_file(str(file), name=str(file.relative_to(root)) if root else file.name)
    return artifact


def log_checkpoint(run, path: Path, step: int, heldout_loss: float | None, best: bool) -> bool:
    """Log the checkpoint at `path` as the `adapter` artifact if the recipe's setting asks for it;
    returns whether it was logged. Rank 0 only (the tracker lives there)."""
    recipe = run.recipe
    mode = recipe.tracking.log_artifacts
    if not (wanted(recipe) and run.main) or (mode == "best" and not best):
        return False
    files = sorted(path.glob("trainable*.safetensors")) + [path / "recipe.yaml", path / "state.json"]
    aliases = [f"step-{step}", "latest"] + (["best"] if best and heldout_loss is not None else [])
    artifact = make_artifact(recipe, "adapter", files, {"step": step, "heldout_loss": heldout_loss, "checkpoint": path.name})
    run.accelerator.get_tracker("wandb", unwrap=True).log_artifact(artifact, aliases=aliases)
    run.say(f"logged {path.name} to W&B as model artifact {artifact.name} ({', '.join(aliases)})")
    return True
