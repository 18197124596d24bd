"""One optimizer step: the expert it trains, its micro-batches (noise, sigmas, caption dropout),
the flow-matching loss, backward, clip, step, and the record the run logs.

Every random draw of a micro-batch comes from a generator seeded by (seed, its global position).
The position counts micro-batches across ranks in the order the sampler deals them out, so W
processes with grad_accum A draw the same batches and noise as one process with grad_accum A*W:
the same run, up to float reduction order.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

from ..data.dataset import to_device
from ..models.spec import tokens_per_sample
from ..models.vace import training_batch
from . import flow_matching as fm
from .checkpoint import list_checkpoints
from .errors import TrainingError
from .experts import batch_shift, route


def micro_generator(seed: int, step: int, micro: int, accum: int, rank: int, world: int) -> torch.Generator:
    """The generator of one micro-batch, seeded by its global position: rank r's micro-batch m of
    step s is the sampler's global batch (s * accum + m) * world + r."""
    position = (step * accum + micro) * world + rank
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % 2**63)  # torch takes 64-bit seeds


def expert_of(run, step: int):
    """The trainee that trains step `step` (Wan2.2 A14B: the expert inference runs at a sigma drawn for the step)."""
    t = run.recipe.timesteps
    return route(run.trainees, run.variant, run.boundary, run.recipe.run.seed, step,
                 lambda g: run.draw(1, g, t.sigma_min, t.sigma_max))


def train_step(run, step: int, batches, empty_prompt: torch.Tensor, preserve: frozenset = frozenset()) -> dict:
    """Train step `step` (0-based) on `recipe.train.grad_accum` micro-batches from `batches`;
    returns its record for metrics.jsonl (step = step + 1, the mean loss over ranks, lr, speed).
    `preserve`: indices of the samples whose target is the base model's prediction (`role: preserve`)."""
    recipe, accelerator, variant = run.recipe, run.accelerator, run.variant
    # Positions count data-parallel ranks: the ranks of a context-parallel group draw alike.
    rank, world, accum, t = run.layout.data_rank, run.layout.data_world, recipe.train.grad_accum, recipe.timesteps
    t0 = time.perf_counter()
    cuda = accelerator.device.type == "cuda"
    if cuda:  # this step's peak, not the process's (loading, validation renders)
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    step_loss, samples, tokens, grad_norm = 0.0, 0, 0, None
    trainee = expert_of(run, step)
    model, optimizer = trainee.model, trainee.optimizer
    for micro in range(accum):
        batch, kept = next_batch(run, batches, preserve)
        gen = micro_generator(recipe.run.seed, step, micro, accum, rank, world)
        if recipe.adapter.dropout > 0:  # LoRA dropout draws from the global RNG; torch.manual_seed
            # costs ~1 ms (it seeds every device type), so only when something uses it.
            # Under context parallelism each rank draws the masks of its own tokens: offset by its
            # place in the group, or both halves of a clip would get the same masks.
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)) + run.layout.rank % run.layout.cp)
        batch = training_batch(variant, recipe, batch, gen)  # VACE: references ++ clip, dropped inputs
        x0 = batch["latents"]
        n = x0.shape[0]
        drop = torch.rand(n, generator=gen) < recipe.train.caption_dropout
        if drop.any():  # caption dropout: the empty prompt, padded as the pipeline pads it
            # torch.where, not a boolean-mask assignment: that one waits for the GPU (audit B13).
            batch["text"] = torch.where(drop.view(-1, 1, 1).to(accelerator.device), empty_prompt, batch["text"])
        clip_tokens = tokens_per_sample(variant, x0.shape)
        sigmas = run.draw(n, gen, *run.bounds[trainee.name], tokens=clip_tokens)
        noise = torch.randn(x0.shape, generator=gen)
        with accelerator.accumulate(model), routed(run, model, step, micro):  # train.route_ratio: its kept tokens
            base = base_prediction(run, model, batch, sigmas, noise, kept)  # role: preserve (every rank, or none)
            with accelerator.autocast():
                pred, target = fm.predict(model, variant, batch, sigmas.to(accelerator.device),
                                          noise.to(accelerator.device), run.compute_dtype,
                                          recipe.train.loss_mask_conditioned_frames)
                target, weights = preserved(run, target, fm.loss_weights(sigmas, t.loss_weighting), base, kept)
                loss = fm.flow_matching_loss(pred, target, weights.to(pred.device))
            # The backward outside autocast, as torch's AMP guide has it: the checkpoints' recomputes
            # restore the forward's autocast themselves, and no cast cached by the forward's autocast
            # (a LoRA weight's bf16 copy) outlives it into a recompute (audit B8).
            # Each rank of a context-parallel group holds its tokens' share of the gradient and DDP
            # (FSDP2, ZeRO) averages over all ranks: scaled by the degree, that is the mean over groups.
            accelerator.backward(loss * run.layout.loss_scale if run.layout.cp > 1 else loss)
            if accelerator.sync_gradients and recipe.train.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(trainee.params, recipe.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach().float() / accum
        samples += n
        tokens += n * clip_tokens
    if trainee.ema is not None:  # once per optimizer step, after it (the accumulation's last micro-batch)
        trainee.ema.step(trainee.params)
    if run.swap is not None:  # the next step's expert (the routing draw depends on the step alone) swaps in now
        run.swap.prefetch(accelerator.unwrap_model(expert_of(run, step + 1).model))
    _step_schedules(run)
    mean_loss = accelerator.reduce(step_loss.to(accelerator.device), reduction="mean").item()
    if not math.isfinite(mean_loss):
        kept = list_checkpoints(run.run_dir)
        raise TrainingError(
            f"loss is {mean_loss} at step {step + 1}: training stopped. Nothing was saved for this step; "
            f"last good checkpoint: {kept[-1] if kept else 'none yet'}. Lower train.lr, or check the shards."
        )
    seconds = time.perf_counter() - t0
    record = {"step": step + 1, "loss": mean_loss, **_rates(trainee), "step_time": seconds,
              "samples_per_s": samples * world / seconds, "tokens_per_s": tokens * world / seconds,
              # shift=auto: the last micro-batch's, which its bucket's tokens chose
              **({"shift": batch_shift(recipe, variant, clip_tokens)} if t.shift == "auto" else {})}
    if variant.two_experts:  # which expert trained, and its loss under its own name (W&B plots each)
        record.update(expert=trainee.label, **{f"loss/{trainee.label}": mean_loss})
    if grad_norm is not None:  # DeepSpeed clips inside its engine and reports none here
        record["grad_norm"] = float(grad_norm)
    if cuda:  # allocated: what the plan counts; reserved: what the caching allocator holds (fragmentation on top)
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        record["peak_reserved_gb"] = torch.cuda.max_memory_reserved(accelerator.device) / 2**30
    return record


def _step_schedules(run) -> None:
    """lr schedules follow the run's steps, whichever expert trained; once each (shared experts share one)."""
    for scheduler in {id(tr.scheduler): tr.scheduler for tr in run.trainees}.values():
        with warnings.catch_warnings():  # torch warns when an idle expert's schedule moves on
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()


def routed(run, model, step: int, micro: int):
    """train.route_ratio: this micro-batch's forwards and the backward's recomputes route the tokens
    its seed keeps (the seed from the run's seed and the micro-batch's global position, as its noise:
    exact on resume, nothing else's draws move). A no-op without routing."""
    router = getattr(run.accelerator.unwrap_model(model), "_token_router", None)
    if router is None:
        return contextlib.nullcontext()
    lay, accum = run.layout, run.recipe.train.grad_accum
    position = (step * accum + micro) * lay.data_world + lay.data_rank
    return router.routing((run.recipe.run.seed * 2_000_003 + 7 * position + 1) % 2**63)


def next_batch(run, batches, preserve: frozenset) -> tuple[dict, torch.Tensor | None]:
    """The next micro-batch on the device, and which of its samples are of `role: preserve` sources
    (None: the run has none), read from the host's indices before the move: on a GPU, reading them
    back from the device would wait for it once per sample."""
    batch = next(batches)
    kept = torch.tensor([int(i) in preserve for i in batch["index"].tolist()]) if preserve else None
    return to_device(batch, run.accelerator.device, torch.float32, run.recipe.data.max_text_tokens), kept


def base_prediction(run, model, batch: dict, sigmas, noise, kept: torch.Tensor | None) -> torch.Tensor | None:
    """The base model's own prediction for the batch (adapter off, same noise, sigma and conditioning,
    no graph, the step's autocast), when any rank's batch holds a `role: preserve` sample; None
    otherwise. Every rank runs it or none does: the forward of a DDP model broadcasts its buffers, and
    a ZeRO-3 / FSDP2 one gathers its weights, with every rank (one rank alone would hang the others)."""
    from .launch import agree
    from .validation import adapters_off

    if kept is None or not agree(run.accelerator, bool(kept.any())):
        return None
    device = run.accelerator.device
    with torch.no_grad(), adapters_off([model]), run.accelerator.autocast():
        base, _ = fm.predict(model, run.variant, batch, sigmas.to(device), noise.to(device), run.compute_dtype,
                             run.recipe.train.loss_mask_conditioned_frames)
    return base


def preserved(run, target, weights, base: torch.Tensor | None, kept: torch.Tensor | None):
    """(target, weights) with the `role: preserve` samples' target replaced by the base model's
    prediction `base`, and their weight scaled by train.preserve_weight: the adapter learns to leave
    those clips as the base model made them. Without `base` (no preserve sample on any rank), as given.
    `kept`: the batch's preserve samples (a host mask)."""
    if base is None or not kept.any():
        return target, weights
    where = kept.view(-1, *([1] * (target.dim() - 1))).to(target.device)
    scale = torch.where(kept, run.recipe.train.preserve_weight, 1.0)
    return torch.where(where, base.to(target.dtype), target), weights * scale


def _rates(trainee) -> dict[str, float]:
    """The step's lr, and what the optimizer made of it: LoRA+'s up-matrix lr, Prodigy's or
    schedule-free's effective lr, the EMA's decay."""
    lrs, group = trainee.scheduler.get_last_lr(), trainee.optimizer.param_groups[0]
    rates = {"lr": lrs[0]}
    if len(lrs) > 1:  # LoRA+: the up matrices' own lr
        rates["lr_up"] = lrs[1]
    if "d" in group:  # Prodigy: the step size it estimated, times lr
        rates["lr_effective"] = group["d"] * lrs[0]
    elif "scheduled_lr" in group:  # schedule-free: lr through its own warmup
        rates["lr_effective"] = group["scheduled_lr"]
    if trainee.ema is not None:
        rates["ema_decay"] = trainee.ema.current_decay
    return rates
