"""Where a run starts: the checkpoint it continues (auto, never, or a given step folder), checked
whole before anything loads, and the restore of weights, optimizers, schedules and data position.

Every random draw of a micro-batch comes from a generator seeded by its global position
(`step.micro_generator`), so the number of batches consumed is the whole data-side resume state:
a resumed run repeats the exact losses of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe
from .checkpoint import checkpoint_damage, load_checkpoint, remove_partial, step_folders
from .errors import CheckpointError, TrainingError
from .optim import apply_changed_settings
from .run_folder import set_aside


def starting_point(accelerator, recipe: Recipe, run_dir: Path, resume: str | None, say) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), decided on rank 0, which first
    removes interrupted saves and moves aside whatever of an earlier run would mix with this one."""
    chosen, error = None, None
    if accelerator.is_main_process:
        for p in remove_partial(run_dir):
            say(f"removed {p.name}: a checkpoint whose save was interrupted")
        try:
            chosen = _resume_point(recipe, run_dir, resume, say)
            moved = set_aside(run_dir, chosen, fresh=(resume or recipe.checkpoint.resume) == "never")
            if moved:
                say(moved)
        except (TrainingError, CheckpointError) as err:
            error = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        chosen, error = broadcast_object_list([str(chosen) if chosen else None, error])
    if error:
        raise TrainingError(error)
    return Path(chosen) if chosen else None


def _resume_point(recipe: Recipe, run_dir: Path, resume: str | None, say=print) -> Path | None:
    """The checkpoint to resume from, trained on the shards as they are (checkpoint.on_new_data)."""
    path = _whole_checkpoint(recipe, run_dir, resume, say)
    if path is not None:
        _check_data(recipe, path, say)
    return path


def _check_data(recipe: Recipe, checkpoint: Path, say) -> None:
    """Stop (or, with checkpoint.on_new_data=continue, say so and go on) when the shards' index is
    not the one the checkpoint trained on: another prep into the same folder swaps the data."""
    from .checkpoint import read_state
    from .facts import data_change, data_facts

    saved = (read_state(checkpoint)[0] or {}).get("data") or {}
    change = data_change(saved, data_facts(recipe.data.shards)) if saved else None
    if change is None:
        return
    if recipe.checkpoint.on_new_data == "continue":
        say(f"warning: {checkpoint.name} trained on other shards ({change}); training on the new ones from here on "
            "(checkpoint.on_new_data=continue)")
        return
    raise TrainingError(f"{recipe.data.shards} changed since {checkpoint.name} was saved ({change}): resuming would train "
                        "on other data. Prep into another data.shards folder, or set checkpoint.on_new_data=continue")


def _whole_checkpoint(recipe: Recipe, run_dir: Path, resume: str | None, say=print) -> Path | None:
    """The checkpoint to resume from. auto: the newest one that is whole; each damaged newer one
    is named and passed over (a run never resumes from, or silently ignores, a broken save)."""
    choice = resume or recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":
        skipped = []
        for path in reversed(step_folders(run_dir)):
            damage = checkpoint_damage(path, deep=True)
            if damage is None:
                for name, why in skipped:
                    say(f"warning: skipped {name} ({why}); resuming from {path.name}, the steps after it are trained again")
                return path
            skipped.append((path.name, damage))
        if skipped:
            raise TrainingError(f"every checkpoint in {run_dir} is damaged ({'; '.join(f'{n}: {w}' for n, w in skipped)}); "
                                "move them away to start again, or set checkpoint.resume=never")
        return None
    path = Path(choice)
    damage = checkpoint_damage(path, deep=True)
    if damage is not None:
        raise TrainingError(f"checkpoint.resume={choice}: cannot resume from it: {damage}")
    return path


def restore(run, checkpoint: Path | None) -> tuple[int, int]:
    """Load `checkpoint` into the run's trainees; returns (step, batches consumed on this rank)
    to go on from; (0, 0) for a fresh start. Optimizer settings changed since are applied."""
    if checkpoint is None:
        return 0, 0
    state = load_checkpoint(run.accelerator, checkpoint, run.trainees)
    step, consumed = state["step"], state["batches_consumed"]
    try:
        apply_changed_settings(run.recipe.train, _saved_train(checkpoint), run.trainees, checkpoint.name, run.say)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    _say_ema(run, state, checkpoint.name)
    # The data is dealt over data-parallel ranks (processes / train.context_parallel): another
    # degree on as many groups goes on with the same batches, bit for bit up to float order.
    saved_cp = state.get("context_parallel", 1)  # written since #24; 1 before
    was, now = state["world_size"] // saved_cp, run.layout.data_world
    if saved_cp != run.layout.cp:
        run.say(f"resuming a run of train.context_parallel={saved_cp} at {run.layout.cp}: each clip's tokens are "
                f"split {run.layout.cp} way(s) from here on")
    if was != now:
        run.say(f"resuming a run of {was} data-parallel rank(s) on {now}: data order changes from here on")
        consumed = consumed * was // now
    run.say(f"resumed from {checkpoint} (step {step})")
    return step, consumed


def _say_ema(run, state: dict, where: str) -> None:
    """train.ema_decay turned on, off or changed at this resume: one line saying what happens."""
    saved, decay = state.get("ema", {}), run.recipe.train.ema_decay
    if decay and not saved:
        run.say(f"train.ema_decay={decay:g}: {where} kept no average; it starts from that checkpoint's weights")
    elif saved and not decay:
        run.say(f"train.ema_decay=0: the average {where} kept is not carried on (later checkpoints hold none)")
    elif saved and any(e["decay"] != decay for e in saved.values()):
        was = next(iter(saved.values()))["decay"]
        run.say(f"resuming with changed settings, applied from here on: train.ema_decay {was:g} -> {decay:g}")


def _saved_train(checkpoint: Path) -> dict:
    """The train section of a checkpoint's recipe.yaml."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(checkpoint / "recipe.yaml"), resolve=True)
    except Exception:  # `${oc.env:...}` of a variable this shell lacks: nothing to compare against
        return {}
    return saved.get("train", {}) if isinstance(saved, dict) else {}
