"""Held-out flow loss at fixed sigmas: a number that says whether step 3,000 beats step 1,500.

The training loss jumps with every step's random sigma and noise. This one does not: a few
samples the trainer never sees (`data.holdout`), each noised at the same fixed sigmas
(`eval.sigmas`) with noise drawn from a generator seeded by the sample's id and the sigma, give
the plain flow-matching MSE (no loss weighting, no caption dropout). For the same weights it is
the same number on every resume and every world size: each sample's loss is computed alone
(batch of one), the ranks' losses are gathered, and every rank averages them in one fixed order.

Held-out samples are chosen by clip (`source`), so the windows of one video never sit on both
sides, and by a hash of the clip's path (not its position), so a rerun of prep holds out the same clips.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import collate, to_device
from ..models.animate import animate_batch
from ..models.vace import vace_batch
from ..parallel.sharding import reshard
from . import flow_matching as fm


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for a string (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def choose_holdout(sources: list[str], share: float, seed: int) -> list[int]:
    """Indices of the held-out samples: whole clips, about `share` of the samples (at least one
    clip when share > 0), the clips with the smallest hash of (seed, path) first."""
    if share <= 0 or not sources:
        return []
    by_clip: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_clip.setdefault(s, []).append(i)
    wanted = max(1, round(share * len(sources)))
    chosen: list[int] = []
    for clip in sorted(by_clip, key=lambda c: _unit_hash(f"{seed}:{c}")):
        if len(chosen) >= wanted:
            break
        chosen += by_clip[clip]
    return sorted(chosen)


def sample_noise_seed(seed: int, sample_id: str, j: int) -> int:
    return int(_unit_hash(f"{seed}:{sample_id}:{j}") * 2**62)


@dataclass
class HeldOut:
    """The held-out samples of a run and the sigmas they are scored at."""

    dataset: object
    indices: list[int]
    ids: list[str]
    sigmas: list[float]
    seed: int
    max_text_tokens: int
    mask_conditioned: bool = False  # train.loss_mask_conditioned_frames: scored over the frames trained on

    def __len__(self) -> int:
        return len(self.indices)

    @torch.no_grad()
    def losses(self, models: dict, variant, boundary, accelerator, dtype: torch.dtype, cp: int = 1) -> dict[str, float]:
        """{"heldout_loss": mean over sigmas and samples, "heldout_loss@<sigma>": mean over samples}.
        `models`: {expert: module} of the trained experts; a sigma no trained expert owns (one
        A14B expert trained alone) is not scored. Every rank must call this (sharded weights
        gather in each forward, so all ranks run the same number of forwards). `cp`: the ranks of a
        context-parallel group (train.context_parallel) score the same clips together."""
        rank, world = accelerator.process_index // cp, accelerator.num_processes // cp
        scored = [(j, s) for j, s in enumerate(self.sigmas) if variant.expert_for(s, boundary) in models]
        n = len(self.indices)
        per_rank = math.ceil(n / world)
        device = accelerator.device
        out = torch.full((per_rank, len(scored)), float("nan"), dtype=torch.float64, device=device)
        was_training = {name: m.training for name, m in models.items()}
        for m in models.values():
            m.eval()  # LoRA dropout off
        try:
            for slot in range(per_rank):
                k = rank + slot * world
                padded = k >= n  # a rank with nothing left repeats its last sample, discarded below
                i = self.indices[min(k, n - 1)]
                batch = to_device(collate([self.dataset[i]]), device, torch.float32, self.max_text_tokens)
                if variant.vace:  # every input, no dropout, the pipeline's default weight: the same score each time
                    batch = vace_batch(batch)
                elif variant.animate:  # the reference's slot before the clip, the face kept
                    batch = animate_batch(batch)
                sid = self.ids[min(k, n - 1)]
                for col, (j, sigma) in enumerate(scored):
                    g = torch.Generator().manual_seed(sample_noise_seed(self.seed, sid, j))
                    noise = torch.randn(batch["latents"].shape, generator=g).to(device)
                    model = models[variant.expert_for(sigma, boundary)]
                    with accelerator.autocast():
                        pred, target = fm.predict(model, variant, batch, torch.tensor([sigma], device=device), noise, dtype,
                                                  self.mask_conditioned)
                        loss = fm.flow_matching_loss(pred, target, torch.ones(1, device=device))
                    if not padded:
                        out[slot, col] = loss.double()
        finally:
            for name, m in models.items():
                m.train(was_training[name])
                reshard(m)
        # Rank r's slot s holds sample r + s * world: gather, then put every sample back in order.
        gathered = accelerator.gather(out.unsqueeze(0)) if accelerator.num_processes > 1 else out.unsqueeze(0)
        gathered = gathered[::cp]  # one row per group: its ranks scored the same clips
        rows = gathered.cpu().reshape(world, per_rank, len(scored)).transpose(0, 1).reshape(world * per_rank, len(scored))[:n]
        result = {f"heldout_loss@{s:g}": float(rows[:, col].mean()) for col, (_, s) in enumerate(scored)}
        result["heldout_loss"] = float(rows.mean()) if scored else float("nan")
        names = [self.dataset.datasets[i] for i in self.indices]
        if len(set(names)) > 1 and scored:  # data.sources: each source's own score beside the whole
            for name in sorted(set(names)):
                result[f"heldout_loss/{name}"] = float(rows[[k for k, d in enumerate(names) if d == name]].mean())
        return result


def holdout_indices(dataset, shares: dict[str, float], default: float, seed: int) -> list[int]:
    """Each source's held-out share (`shares` by source name; `default` for a name not there) of its
    own samples. A `data.sources` clip is known by `<source>/<path>`, so the same file in two
    sources is two clips; the one source of `data.source` keeps its paths (and its held-out clips)."""
    chosen: list[int] = []
    for name in sorted(set(dataset.datasets)):
        mine = [i for i, d in enumerate(dataset.datasets) if d == name]
        clips = [dataset.sources[i] if name == "default" else f"{name}/{dataset.sources[i]}" for i in mine]
        chosen += [mine[j] for j in choose_holdout(clips, shares.get(name, default), seed)]
    return sorted(chosen)


def make_heldout(dataset, shares: dict[str, float], default: float, sigmas: list[float], seed: int, max_text_tokens: int,
                 mask_conditioned: bool = False) -> HeldOut | None:
    indices = holdout_indices(dataset, shares, default, seed)
    if not indices:
        return None
    return HeldOut(dataset, indices, [dataset.ids[i] for i in indices], list(sigmas), seed, max_text_tokens,
                   mask_conditioned)


EMA_SCORE = "heldout_loss_ema"
"""The held-out loss of train.ema_decay's average (beside `heldout_loss`, the raw weights')."""


def format_heldout(step: int, result: dict[str, float]) -> str:
    per_sigma = ", ".join(f"{k.split('@')[1]}: {v:.4f}" for k, v in result.items() if k.startswith("heldout_loss@"))
    ema = f"; EMA {result[EMA_SCORE]:.4f}" if EMA_SCORE in result else ""
    return f"held-out loss at step {step}: {result['heldout_loss']:.4f} (by sigma {per_sigma}){ema}"


class Scoreboard:
    """The held-out losses of a run so far, by step (read back from metrics.jsonl on a resume),
    and `best.json`: the checkpoint with the lowest one (`key`: the raw weights' score, or the
    EMA's when export writes the average). A damaged best.json is written again
    from the log when the board opens."""

    def __init__(self, run_dir: Path, metrics: Path, say=print, key: str = "heldout_loss"):
        from .checkpoint import BEST_FILE, CheckpointError, best_checkpoint
        from .metrics import heldout_by_step

        self.run_dir, self.key = Path(run_dir), key
        self.scores: dict[int, float] = heldout_by_step(metrics, key)
        try:
            best_checkpoint(self.run_dir)
        except CheckpointError as err:
            (self.run_dir / BEST_FILE).unlink()
            self._write()
            say(f"warning: {str(err).split(';')[0]}: rewrote it from {Path(metrics).name}")

    def add(self, step: int, loss: float) -> dict | None:
        """Record a score; rewrite best.json; return its content (None while no scored step has a checkpoint)."""
        self.scores[step] = loss
        return self._write()

    def _write(self) -> dict | None:
        from ..data.atomic import write_json
        from .checkpoint import BEST_FILE, step_dir

        kept = {s: v for s, v in self.scores.items() if (step_dir(self.run_dir, s) / "state.json").is_file()}
        if not kept:
            return None
        step = min(kept, key=lambda s: (kept[s], s))  # ties: the earlier step
        best = {"step": step, "checkpoint": step_dir(self.run_dir, step).name, "heldout_loss": kept[step],
                "weights": "ema" if self.key == EMA_SCORE else "raw"}
        write_json(self.run_dir / BEST_FILE, best)
        return best
