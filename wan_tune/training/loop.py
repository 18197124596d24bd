"""The training loop, top to bottom: setup -> resume -> steps -> checkpoints -> cleanup.

Launch-agnostic: plain `python`, `accelerate launch` (DDP, DeepSpeed ZeRO, FSDP) or SLURM all
arrive here; accelerate decides what `prepare` wraps. Every random draw of a micro-batch comes
from a generator seeded by (seed, its global position), so a resumed run repeats the exact losses
of an uninterrupted one without saving any RNG state. The position counts micro-batches across
ranks in the order the sampler deals them out, so W processes with grad_accum A draw the same
batches and noise as one process with grad_accum A*W: the same run, up to float reduction order.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..atomic import writable_problem
from ..config import Recipe, to_yaml
from ..data.dataset import ShardDataset, collate, pad_text, to_device
from ..data.sampler import BucketBatchSampler
from ..dist import use_cpu
from ..models.loading import recipe_source
from ..models.spec import load_for_training, tokens_per_sample, trainable_parameters
from ..models.variants import get_variant, trained_experts
from . import flow_matching as fm
from .experts import make_trainee, route, sigma_bounds, sigma_sampler
from .offload import BlockOffload, ExpertSwap
from .checkpoint import (
    CheckpointError, best_checkpoint, checkpoint_damage, list_checkpoints, load_checkpoint, prune_checkpoints,
    remove_partial, save_checkpoint, step_folders,
)
from .heldout import Scoreboard, format_heldout, make_heldout
from .metrics import METRICS_FILE, open_metrics
from .optim import apply_changed_settings, make_optimizer, make_scheduler
from .run_folder import RunLock, set_aside
from .sharding import fsdp_on_cpu, local_share, sharding, unpartitioned_loading, weights_digest
from .tracking import init_tracking, tracking_problem


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what was kept."""


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) and Ctrl-C (SIGINT) ask for a clean stop after the
    current step, with a checkpoint. A second Ctrl-C stops at once (KeyboardInterrupt): the
    checkpoints already written are whole. `restore` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, say=print):
        self.received: str | None = None
        self.say = say
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.say("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers share the terminal's Ctrl-C; the main process decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _accelerator(recipe: Recipe, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    cpu = use_cpu()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and multi else []  # gloo: multi-process on CPU
    tracker = None if recipe.tracking.backend == "none" else recipe.tracking.backend
    accelerator = Accelerator(
        cpu=cpu and not deepspeed,  # cpu=True would drop DeepSpeed; DeepSpeed finds the CPU by itself
        mixed_precision="no" if cpu else recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )
    if cpu and multi:
        fsdp_on_cpu(accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = recipe.train.batch_size  # we feed batches ourselves
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = recipe.train.max_grad_norm or 0.0
        if cpu:  # torch AdamW instead of DeepSpeed's CPU Adam: no ~50 s JIT build per op
            ds["zero_force_ds_cpu_optimizer"] = False
    return accelerator


def _micro_generator(seed: int, step: int, micro: int, accum: int, rank: int, world: int) -> torch.Generator:
    """The generator of one micro-batch, seeded by its global position: rank r's micro-batch m of
    step s is the sampler's global batch (s * accum + m) * world + r."""
    position = (step * accum + micro) * world + rank
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % 2**63)  # torch takes 64-bit seeds


def train(recipe: Recipe, resume: str | None = None, progress: bool = True, say=print) -> dict:
    """Run (or continue) the recipe's training; returns a summary (rank 0). The run folder is
    locked while it runs (a second run on it is refused), and signal handlers are restored after."""
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    problem = writable_problem(run_dir)
    if problem:
        raise TrainingError(f"run.output_dir: {problem}; checkpoints go there, so set run.output_dir to a writable folder")
    accelerator = _accelerator(recipe, run_dir)
    say = say if accelerator.is_main_process else (lambda *_: None)
    lock = RunLock(run_dir)
    busy = lock.acquire() if accelerator.is_main_process else None
    if _agree(accelerator, busy is not None):
        raise TrainingError(busy or f"{run_dir} is in use by another run (rank 0 says which)")
    stop = StopSignal(say)
    try:
        return _train(recipe, resume, progress, say, accelerator, run_dir, stop)
    finally:
        stop.restore()
        lock.release()


def _train(recipe: Recipe, resume: str | None, progress: bool, say, accelerator, run_dir: Path, stop: StopSignal) -> dict:
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    problem = tracking_problem(recipe.tracking) if main else None
    if _agree(accelerator, problem is not None):
        raise TrainingError(problem or "tracking is not set up on rank 0")
    variant = get_variant(recipe.model.variant)
    names = trained_experts(variant, recipe.model.experts)
    partitioned = accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
    if len(names) > 1 and partitioned:
        raise TrainingError(
            "training both Wan2.2 A14B experts in one run works with one process or DDP; under DeepSpeed / FSDP "
            "train one expert per run (model.experts=[high_noise], then [low_noise])"
        )
    if recipe.train.offload != "none" and partitioned:
        raise TrainingError(
            f"train.offload={recipe.train.offload} works with one process or DDP; under DeepSpeed / FSDP the weights "
            "are already sharded over the GPUs: set train.offload=none (or launch without DeepSpeed / FSDP)"
        )

    # --- data -------------------------------------------------------------------------------
    dataset = ShardDataset(recipe.data.shards)
    if dataset.meta["variant"] != variant.name and not (variant.tiny and dataset.meta["variant"].startswith("tiny")):
        raise TrainingError(
            f"{recipe.data.shards} was prepped for {dataset.meta['variant']!r} but model.variant={variant.name!r}; rerun prep"
        )
    if (dataset.meta["task"] == "i2v") != variant.image_conditioned(dataset.meta["task"]):
        raise TrainingError(f"{recipe.data.shards} holds {dataset.meta['task']} data; {variant.name} needs {variant.task}")
    z_dim = dataset.meta.get("vae", {}).get("z_dim", variant.vae_z_dim)
    if z_dim != variant.vae_z_dim:
        raise TrainingError(f"{recipe.data.shards} holds {z_dim}-channel latents (prepped with {dataset.meta['variant']}'s VAE); "
                            f"{variant.name} takes {variant.vae_z_dim}: prep the footage again for it, into another data.shards")
    heldout = make_heldout(dataset, recipe.data.holdout, recipe.eval.sigmas, recipe.eval.seed, recipe.data.max_text_tokens)
    kept_out = frozenset(heldout.indices if heldout else ())
    sampler = BucketBatchSampler(dataset.buckets, recipe.train.batch_size, recipe.run.seed, rank, world, held_out=kept_out)
    if len(sampler) == 0:
        sizes = Counter(b for i, b in enumerate(dataset.buckets) if i not in kept_out)
        raise TrainingError(
            f"train.batch_size={recipe.train.batch_size} but the largest bucket of {recipe.data.shards} holds "
            f"{max(sizes.values(), default=0)} training clip(s) (a batch is one bucket; {world} process(es) need "
            f"{world} batch(es) a step): lower train.batch_size, or add clips"
        )
    start = _starting_point(accelerator, recipe, run_dir, resume, say)  # before any model loads: a refusal costs nothing
    if heldout is not None:
        clips = len({dataset.sources[i] for i in kept_out})
        say(f"held out {len(kept_out)} of {len(dataset)} samples ({clips} clip(s)) for the held-out loss (data.holdout)")

    # --- models, optimizers (one per trained expert; only those are loaded) ------------------
    boundary = recipe_source(recipe, components=()).boundary_ratio  # the folder's model_index.json
    trainees, n_trainable = [], 0
    swap = ExpertSwap(accelerator.device) if len(names) > 1 else None
    for name in names:
        torch.manual_seed(recipe.run.seed)  # LoRA init: the same for an expert trained alone or beside the other
        model = load_for_training(recipe, use_cpu=use_cpu(), expert=name)
        # Before prepare, which moves to the GPU whatever is still on the model.
        blocks = BlockOffload(model, recipe.train.offload_keep, accelerator.device) if recipe.train.offload == "blocks" else None
        if swap is not None:
            swap.add(model, blocks)
        if recipe.train.compile:  # regional: one compiled block serves all 30-40, compiling in seconds, not minutes
            model.compile_repeated_blocks(fullgraph=False)
        params = list(trainable_parameters(model).values())
        n_trainable += sum(p.numel() for p in params)
        optimizer = make_optimizer(params, recipe.train, say)
        scheduler = make_scheduler(optimizer, recipe.train)
        model, optimizer = accelerator.prepare(model, optimizer)
        trainee = make_trainee(variant, name, boundary, model, optimizer, scheduler)
        # FSDP2 replaces the parameters by sharded ones: clip what the optimizer now holds.
        trainee.params = list(trainable_parameters(accelerator.unwrap_model(model)).values())
        trainees.append(trainee)
    t = recipe.timesteps
    try:
        bounds = {tr.name: sigma_bounds(tr, t.sigma_min, t.sigma_max) for tr in trainees}
    except ValueError as err:
        raise TrainingError(f"{err}: widen the range or pick the other expert (model.experts)") from None
    compute_dtype = accelerator.unwrap_model(trainees[0].model).dtype  # the base weights' dtype (LoRA params are fp32)
    sharded = sharding(accelerator)
    if sharded:
        held, total = local_share(accelerator.unwrap_model(trainees[0].model))
        say(f"{sharded}: rank 0 holds {held:,} of the model's {total:,} weights ({held / total:.1%})")
    if variant.two_experts:
        say(f"experts: {', '.join(f'{tr.label} (sigma {bounds[tr.name][0]:g}-{bounds[tr.name][1]:g})' for tr in trainees)}; "
            f"boundary {boundary}")

    # --- resume -----------------------------------------------------------------------------
    start_step, consumed = 0, 0
    checkpoint = start
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, trainees)
        start_step, consumed = state["step"], state["batches_consumed"]
        try:
            apply_changed_settings(recipe.train, _saved_train(checkpoint), trainees, checkpoint.name, say)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        if state["world_size"] != world:
            say(f"resuming a {state['world_size']}-process run on {world}: data order changes from here on")
            consumed = consumed * state["world_size"] // world
        say(f"resumed from {checkpoint} (step {start_step})")
    sampler.seek(consumed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=recipe.data.num_workers,
        collate_fn=collate, worker_init_fn=_ignore_sigint,
        persistent_workers=recipe.data.num_workers > 0,
    )
    batches = iter(loader)
    empty_padded = pad_text([dataset.empty_prompt], recipe.data.max_text_tokens)[0].to(accelerator.device, torch.float32)

    if recipe.tracking.backend != "none":
        init_tracking(accelerator, recipe, run_dir)
    validator = None
    if recipe.validation.every and (main or sharded):
        from .validation import Validator, clip_first_frames

        # Sharded weights: every rank runs the same pipeline (its forwards gather the shards
        # together), rank 0 writes the videos.
        try:
            first_frames = None
            if variant.image_conditioned(recipe.data.task) and not recipe.validation.images:
                first_frames = clip_first_frames(recipe, recipe.data.shards, heldout.indices if heldout else [],
                                                 len(recipe.validation.prompts))
            with unpartitioned_loading(accelerator):
                validator = Validator(recipe, accelerator.device, compute_dtype, trained=names, first_frames=first_frames)
        except ValueError as err:
            raise TrainingError(str(err)) from None
    if recipe.validation.every:  # the base model's renders for the contact sheets, once per run
        render_base = _agree(accelerator, main and validator.base_missing(run_dir / "validation"))
        if validator is not None:
            live = {tr.name: accelerator.unwrap_model(tr.model) for tr in trainees}
            note = validator.prepare_base(live, run_dir / "validation", render_base, lora=recipe.adapter.method == "lora",
                                          untrained=start_step == 0, write=main)
            if note:
                say(note)
    shift = recipe.timesteps.shift if recipe.timesteps.shift is not None else variant.flow_shift
    draw = sigma_sampler(recipe, shift)
    say(f"training {recipe.adapter.method}: {n_trainable:,} trainable parameters, {len(dataset) - len(kept_out)} samples, "
        f"{world} process(es), steps {start_step} -> {recipe.train.steps}")

    # --- steps ------------------------------------------------------------------------------
    recipe_yaml = to_yaml(recipe)
    bar = tqdm(total=recipe.train.steps, initial=start_step, desc="train", unit="step", disable=not (progress and main))
    step, last_saved, run_losses = start_step, None, []
    metrics = open_metrics(run_dir / METRICS_FILE, start_step, say) if main else None
    board = Scoreboard(run_dir, run_dir / METRICS_FILE, say) if heldout is not None and main else None

    def score(at: int) -> None:
        """The held-out loss of the current weights (every rank: sharded forwards gather)."""
        live = {tr.name: accelerator.unwrap_model(tr.model) for tr in trainees}
        result = heldout.losses(live, variant, boundary, accelerator, compute_dtype)
        say(format_heldout(at, result))
        if recipe.tracking.backend != "none":
            accelerator.log(result, step=at)
        if main:
            metrics.write(json.dumps({"step": at, **result}) + "\n")
            metrics.flush()
            best = board.add(at, result["heldout_loss"])
            if best is not None and best["step"] == at:
                say(f"best so far by held-out loss: {best['checkpoint']} (run folder's best.json)")
                prune_checkpoints(run_dir, recipe.checkpoint.keep_last, best_checkpoint(run_dir))  # the old best may go now

    # The starting weights' score, unless a run that got this far logged it already.
    if heldout is not None and _agree(accelerator, main and start_step not in board.scores):
        score(start_step)
    try:
        while step < recipe.train.steps:
            t0 = time.perf_counter()
            step_loss, samples, tokens, grad_norm = 0.0, 0, 0, None
            trainee = route(trainees, variant, boundary, recipe.run.seed, step, lambda g: draw(1, g, t.sigma_min, t.sigma_max))
            model, optimizer = trainee.model, trainee.optimizer
            for micro in range(recipe.train.grad_accum):
                batch = to_device(next(batches), accelerator.device, torch.float32, recipe.data.max_text_tokens)
                consumed += 1
                gen = _micro_generator(recipe.run.seed, step, micro, recipe.train.grad_accum, rank, world)
                if recipe.adapter.dropout > 0:  # LoRA dropout draws from the global RNG; torch.manual_seed
                    # costs ~1 ms (it seeds every device type), so only when something uses it.
                    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
                x0 = batch["latents"]
                n = x0.shape[0]
                drop = torch.rand(n, generator=gen) < recipe.train.caption_dropout
                if drop.any():  # caption dropout: the empty prompt, padded as the pipeline pads it
                    batch["text"][drop.to(accelerator.device)] = empty_padded
                sigmas = draw(n, gen, *bounds[trainee.name])
                noise = torch.randn(x0.shape, generator=gen)
                with accelerator.accumulate(model), accelerator.autocast():
                    pred, target = fm.predict(model, variant, batch, sigmas.to(accelerator.device), noise.to(accelerator.device), compute_dtype)
                    loss = fm.flow_matching_loss(pred, target, fm.loss_weights(sigmas, t.loss_weighting).to(pred.device))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.train.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainee.params, recipe.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float() / recipe.train.grad_accum
                samples += n
                tokens += n * tokens_per_sample(variant, x0.shape)
            for tr in trainees:  # lr schedules follow the run's steps, whichever expert trained
                with warnings.catch_warnings():  # torch warns when an idle expert's schedule moves on
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    tr.scheduler.step()
            step += 1
            mean_loss = accelerator.reduce(step_loss.to(accelerator.device), reduction="mean").item()
            if not math.isfinite(mean_loss):
                kept = list_checkpoints(run_dir)
                raise TrainingError(
                    f"loss is {mean_loss} at step {step}: training stopped. Nothing was saved for this step; "
                    f"last good checkpoint: {kept[-1] if kept else 'none yet'}. Lower train.lr, or check the shards."
                )
            seconds = time.perf_counter() - t0
            record = {"step": step, "loss": mean_loss, "lr": trainee.scheduler.get_last_lr()[0], "step_time": seconds,
                      "samples_per_s": samples * world / seconds, "tokens_per_s": tokens * world / seconds}
            if variant.two_experts:  # which expert trained, and its loss under its own name (W&B plots each)
                record.update(expert=trainee.label, **{f"loss/{trainee.label}": mean_loss})
            if grad_norm is not None:  # DeepSpeed clips inside its engine and reports none here
                record["grad_norm"] = float(grad_norm)
            if torch.cuda.is_available():
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            run_losses.append(mean_loss)
            if main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if recipe.tracking.backend != "none" and step % recipe.tracking.log_every == 0:
                accelerator.log({k: v for k, v in record.items() if k not in ("step", "expert")}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", s_step=f"{seconds:.2f}")

            stopping = _agree(accelerator, stop.received is not None)
            saving = step % recipe.checkpoint.every == 0 or step == recipe.train.steps or stopping
            if saving:
                last_saved = save_checkpoint(accelerator, run_dir, step, trainees, consumed, recipe_yaml,
                                             recipe.checkpoint.keep_last, keep=best_checkpoint(run_dir))
            # Not while stopping (a preempted job has little time): the resumed run scores that step first.
            if heldout is not None and not stopping and (step % recipe.eval.every == 0 if recipe.eval.every else saving):
                score(step)
            if recipe.validation.every and step % recipe.validation.every == 0:
                if validator is not None:
                    from .validation import log_videos

                    live = {tr.name: accelerator.unwrap_model(tr.model) for tr in trainees}
                    paths = validator.render(live, step, run_dir / "validation", write=main)
                    if main:
                        log_videos(accelerator, recipe, paths, step)
                        say(f"validation videos: {paths[0].parent}")
                accelerator.wait_for_everyone()
            if stopping:
                say(f"received {stop.received or 'a stop signal on another rank'}: saved {last_saved}; "
                    f"rerun the same command to resume")
                break
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if recipe.tracking.backend != "none":
            accelerator.end_training()
    return {"run_dir": str(run_dir), "step": step, "checkpoint": str(last_saved) if last_saved else None,
            "trainable": n_trainable, "first_losses": run_losses[:10], "last_losses": run_losses[-10:],
            "stopped_by": stop.received, "main": main, "rank": rank, "world": world,
            "heldout": dict(sorted(board.scores.items())) if board is not None else {},
            "best": str(best_checkpoint(run_dir) or "") or None,
            "weights_sha256": "-".join(weights_digest(accelerator, tr.model) for tr in trainees),
            "model": accelerator.unwrap_model(trainees[0].model),
            "models": {tr.label: accelerator.unwrap_model(tr.model) for tr in trainees}}


def _agree(accelerator, flag: bool) -> bool:
    """True on every rank if any rank got a stop signal (all must checkpoint together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _starting_point(accelerator, recipe: Recipe, run_dir: Path, resume: str | None, say) -> Path | None:
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


def _saved_train(checkpoint: Path) -> dict:
    """The train section of a checkpoint's recipe.yaml, as written (no interpolation resolved)."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(checkpoint / "recipe.yaml"), resolve=True)
    except Exception:  # `${oc.env:...}` of a variable this shell lacks: nothing to compare against
        return {}
    return saved.get("train", {}) if isinstance(saved, dict) else {}


def _resume_point(recipe: Recipe, run_dir: Path, resume: str | None, say=print) -> Path | None:
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
