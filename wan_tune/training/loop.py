"""The training loop, top to bottom: build the run -> resume -> steps (with the checkpoint,
held-out and validation cadence) -> finish.

Each stage is a named call into a module that owns it: `launch` (the Accelerator, stop signals),
`run_folder` (the lock), `run_data` (shards, held-out clips, batches), `resume` (where to start),
`run` (models and optimizers), `step` (one optimizer step), `runlog` (metrics and held-out scores),
`checkpoint`, `validation`.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe, to_yaml
from ..data.atomic import writable_problem
from ..data.progress import progress_bar
from ..models.precision import describe as describe_precision
from ..models.variants import get_variant, trained_experts
from ..parallel.context_parallel import layout, token_problem
from ..parallel.sharding import sharding, weights_digest
from .artifacts import log_checkpoint
from .checkpoint import best_checkpoint, save_checkpoint
from .ema import averaged, exports_ema
from .errors import TrainingError
from .facts import recorded_facts
from .init_from import check_init_files
from .launch import agree, check_launch, make_accelerator
from .resume import restore, starting_point
from .run import build_run, renders_together
from .run_data import open_data
from .run_folder import claimed
from .runlog import RunLog
from .step import train_step
from .tracking import init_tracking
from .validation import make_validator, start_validation, validate

__all__ = ["TrainingError", "train"]


def train(recipe: Recipe, resume: str | None = None, progress: bool = True, say=print) -> dict:
    """Run (or continue) the recipe's training; returns a summary (complete on rank 0)."""
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    problem = writable_problem(run_dir)
    if problem:
        raise TrainingError(f"run.output_dir: {problem}; checkpoints go there, so set run.output_dir to a writable folder")
    accelerator = make_accelerator(recipe, run_dir)
    say = say if accelerator.is_main_process else (lambda *_: None)
    variant = get_variant(recipe.model.variant)
    experts = trained_experts(variant, recipe.model.experts)
    with claimed(accelerator, run_dir, say) as stop:  # the run folder is this run's until it returns
        # --- build the run: everything that can refuse does so before a model loads ----------
        check_launch(recipe, accelerator, experts)
        lay = layout(recipe, accelerator)  # the groups of train.context_parallel read one batch together
        data = open_data(recipe, variant, lay.data_rank, lay.data_world)
        problem = token_problem(variant, data.dataset.buckets, lay.cp)
        if problem:
            raise TrainingError(problem)
        checkpoint = starting_point(accelerator, recipe, run_dir, resume, say)
        data.announce(say)
        # Before the model: the validation prompts are encoded while the GPU holds nothing else.
        validator = make_validator(recipe, accelerator, experts, data.heldout, renders_together(sharding(accelerator), lay))
        if checkpoint is None:
            check_init_files(recipe, variant, experts)  # before any model loads
        run = build_run(recipe, accelerator, run_dir, variant, experts, say, lay, fresh=checkpoint is None)
        step, consumed = restore(run, checkpoint)
        batches = data.batches(consumed, pin=accelerator.device.type == "cuda")
        empty_prompt = data.empty_prompt(accelerator.device)
        if recipe.tracking.backend != "none":
            init_tracking(accelerator, recipe, run_dir)
        start_validation(run, validator, step)
        say(f"training {recipe.adapter.method}: {run.trainable:,} trainable parameters, {data.training_samples} samples, "
            f"{accelerator.num_processes} process(es){lay.describe()}, {describe_precision(recipe)}, "
            f"steps {step} -> {recipe.train.steps}")

        # --- steps ---------------------------------------------------------------------------
        recipe_yaml, facts, last_saved = to_yaml(recipe), recorded_facts(recipe, checkpoint), checkpoint
        if step >= recipe.train.steps:
            say(f"nothing to train: {checkpoint} is at step {step} and train.steps is {recipe.train.steps}; "
                "raise train.steps to train on from it")
        bar = progress_bar(total=recipe.train.steps, initial=step, desc="train", unit="step", disable=not (progress and run.main))
        log = RunLog(run, data.heldout, step, data.draw_counter(consumed))
        log.score_start(step)
        try:
            while step < recipe.train.steps:
                weights_for(run, training=True)
                record = train_step(run, step, batches, empty_prompt, data.preserve)
                step, consumed = step + 1, consumed + recipe.train.grad_accum
                log.step(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", s_step=f"{record['step_time']:.2f}", refresh=False)
                bar.update(1)  # redraws (in a log: at most every 30 s), the postfix with it

                stopping = agree(accelerator, stop.received is not None)
                saving = step % recipe.checkpoint.every == 0 or step == recipe.train.steps or stopping
                # Not while stopping (a preempted job has little time): the resumed run scores that step first.
                scoring = data.heldout is not None and not stopping and (
                    step % recipe.eval.every == 0 if recipe.eval.every else saving)
                rendering = bool(recipe.validation.every) and step % recipe.validation.every == 0
                if saving or scoring or rendering:
                    weights_for(run, training=False)  # schedule-free: its averaged weights, once for all three
                if saving:
                    last_saved = save_checkpoint(accelerator, run_dir, step, run.trainees, consumed, recipe_yaml,
                                                 recipe.checkpoint.keep_last, keep=best_checkpoint(run_dir), cp=lay.cp,
                                                 facts=facts)
                if scoring:
                    log.score(step)
                if saving and last_saved is not None:
                    _log_artifact(run, log, last_saved, step, final=step == recipe.train.steps or stopping)
                if rendering:
                    with averaged(run.trainees, exports_ema(recipe)):  # the weights export will write
                        validate(run, validator, step)
                if stopping:
                    say(f"received {stop.received or 'a stop signal on another rank'}: saved {last_saved}; "
                        f"rerun the same command to resume")
                    break
        finally:
            bar.close()
            log.close()
        return _summary(run, log, step, last_saved, stop.received)


def weights_for(run, training: bool) -> None:
    """Schedule-free AdamW trains one point and averages another: the steps need its training
    weights, held-out scores, renders and checkpoints the average (a no-op for other optimizers).
    One switch per step's bookkeeping, never one per use: each switch rounds, and a resumed run
    (which starts from the saved average) must meet the straight run's weights bit for bit."""
    for tr in run.trainees:
        tr.optimizer.train() if training else tr.optimizer.eval()


def _log_artifact(run, log: RunLog, saved: Path, step: int, final: bool) -> None:
    """`tracking.log_artifacts`: this checkpoint when it is the new best (or every one); without
    held-out clips, `best` logs the run's last checkpoint."""
    best = best_checkpoint(run.run_dir)
    is_best = best is not None and best.name == saved.name if log.heldout is not None else final
    log_checkpoint(run, saved, step, log.scores().get(step), is_best)


def _summary(run, log: RunLog, step: int, last_saved: Path | None, stopped_by: str | None) -> dict:
    accelerator = run.accelerator
    window = min(10, max(1, len(log.losses) // 2))  # first and last 10 steps; halves of a shorter run
    return {"run_dir": str(run.run_dir), "step": step, "checkpoint": str(last_saved) if last_saved else None,
            "trainable": run.trainable, "first_losses": log.losses[:window], "last_losses": log.losses[-window:],
            "stopped_by": stopped_by, "main": run.main, "rank": accelerator.process_index,
            "world": accelerator.num_processes, "heldout": log.scores(),
            "best": str(best_checkpoint(run.run_dir) or "") or None,
            "weights_sha256": "-".join(weights_digest(accelerator, tr.model) for tr in run.trainees),
            "model": accelerator.unwrap_model(run.trainees[0].model),
            "models": {tr.label: accelerator.unwrap_model(tr.model) for tr in run.trainees}}
