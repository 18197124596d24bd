"""The export as a W&B model artifact (`tracking.log_artifacts` other than none): exactly the files
the export's manifest lists, by their paths in the folder, in a W&B run of job type `export`."""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe
from ..training.artifacts import make_artifact, wanted
from ..training.tracking import tracking_problem
from .delivery import manifest_files


def log_export(recipe: Recipe, checkpoint: Path, out: Path, step: int, heldout_loss: float | None, say=print) -> bool:
    """The exported files as the `export` artifact, in a W&B run of job type `export` beside the
    training run (in its folder, offline when the recipe says so). Skipped, with a note, where W&B
    cannot start (no API key)."""

    if not wanted(recipe):
        return False
    problem = tracking_problem(recipe.tracking)
    if problem:
        say(f"not logged to W&B: {problem}")
        return False
    import wandb

    files = manifest_files(out)  # what the export wrote, never the rest of the folder
    with wandb.init(project=recipe.tracking.project, entity=recipe.tracking.entity, name=f"{recipe.run.name}-export",
                    job_type="export", dir=str(checkpoint.parent), mode="offline" if recipe.tracking.offline else None) as run:
        artifact = make_artifact(recipe, "export", files, {"step": step, "heldout_loss": heldout_loss, "checkpoint": checkpoint.name},
                             root=out)
        run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])
    say(f"logged the export to W&B as model artifact {artifact.name}")
    return True
