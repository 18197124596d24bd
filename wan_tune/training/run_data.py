"""A run's data: the shards (checked against the model before it loads), the held-out clips, and
the batches of this rank from where the run stands."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.utils.data import DataLoader

from ..config import Recipe
from ..config.sources import by_name
from ..data.dataset import ShardDataset, collate, pad_text
from ..data.sampler import BucketBatchSampler, DrawCounter, draw_counts
from ..models.variants import Variant
from .errors import TrainingError
from .heldout import HeldOut, make_heldout
from .launch import ignore_sigint


@dataclass
class RunData:
    recipe: Recipe
    dataset: ShardDataset
    heldout: HeldOut | None
    sampler: BucketBatchSampler

    @cached_property
    def preserve(self) -> frozenset:
        """Indices of the samples of `role: preserve` sources (their target: the base model's prediction)."""
        roles = {n: s.role for n, s in by_name(self.recipe).items()}
        return frozenset(i for i, name in enumerate(self.dataset.datasets) if roles.get(name) == "preserve")

    @property
    def kept_out(self) -> frozenset:
        return self.sampler.held_out

    @property
    def training_samples(self) -> int:
        return len(self.dataset) - len(self.kept_out)

    def announce(self, say) -> None:
        if self.sampler.draws:
            say("samples drawn per epoch by source: " + ", ".join(f"{n} {k}" for n, k in sorted(self.sampler.draws.items())))
        if self.heldout is not None:
            clips = len({self.dataset.sources[i] for i in self.kept_out})
            say(f"held out {len(self.kept_out)} of {len(self.dataset)} samples ({clips} clip(s)) for the held-out loss "
                "(data.holdout)")

    def draw_counter(self, consumed: int) -> DrawCounter | None:
        """Counts the samples drawn per source (`drawn/<name>` in the step records); None with one source."""
        return DrawCounter(self.sampler, consumed) if self.sampler.groups is not None else None

    def batches(self, consumed: int, pin: bool = False):
        """This rank's batches from `consumed` on, endless (epochs follow one another); `pin` (a GPU
        run): in pinned memory, so their copy to the GPU does not hold the host up."""
        self.sampler.seek(consumed)
        workers = self.recipe.data.num_workers
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
                            worker_init_fn=ignore_sigint, persistent_workers=workers > 0, pin_memory=pin)
        return iter(loader)

    def empty_prompt(self, device) -> torch.Tensor:
        """The empty prompt's embedding padded as the pipeline pads it: what caption dropout trains on."""
        return pad_text([self.dataset.empty_prompt], self.recipe.data.max_text_tokens)[0].to(device, torch.float32)


def open_data(recipe: Recipe, variant: Variant, rank: int, world: int) -> RunData:
    """The recipe's shards, refused in one line when they cannot train this variant or fill a batch."""
    dataset = ShardDataset(recipe.data.shards)
    meta = dataset.meta
    if meta["variant"] != variant.name and not (variant.tiny and meta["variant"].startswith("tiny")):
        raise TrainingError(f"{recipe.data.shards} was prepped for {meta['variant']!r} but model.variant={variant.name!r}; rerun prep")
    task = meta["task"]  # t2v, i2v or flf2v; TI2V-5B trains on either of the first two
    if task != variant.shard_task("i2v" if task == "flf2v" else task):
        raise TrainingError(f"{recipe.data.shards} holds {task} data; {variant.name} trains on "
                            f"{variant.shard_task(recipe.data.task)} data: prep the footage for it, into another data.shards")
    z_dim = meta.get("vae", {}).get("z_dim", variant.vae_z_dim)
    if z_dim != variant.vae_z_dim:
        raise TrainingError(f"{recipe.data.shards} holds {z_dim}-channel latents (prepped with {meta['variant']}'s VAE); "
                            f"{variant.name} takes {variant.vae_z_dim}: prep the footage again for it, into another data.shards")
    sources = by_name(recipe)
    heldout = make_heldout(dataset, {n: s.holdout for n, s in sources.items()}, recipe.data.holdout, recipe.eval.sigmas,
                           recipe.eval.seed, recipe.data.max_text_tokens, recipe.train.loss_mask_conditioned_frames)
    kept_out = frozenset(heldout.indices if heldout else ())
    groups, draws = None, None
    if len(set(dataset.datasets)) > 1 or recipe.data.sources:  # data.sources: each drawn by its repeats or weight
        groups = dataset.datasets
        weights = {n: s.weight for n, s in sources.items() if s.weight is not None} or None
        draws = draw_counts(groups, kept_out, {n: s.repeats for n, s in sources.items()}, weights)
    sampler = BucketBatchSampler(dataset.buckets, recipe.train.batch_size, recipe.run.seed, rank, world, held_out=kept_out,
                                 groups=groups, draws=draws, captions=max(dataset.caption_counts, default=1) > 1)
    if len(sampler) == 0:
        sizes = Counter(b for i, b in enumerate(dataset.buckets) if i not in kept_out)
        raise TrainingError(
            f"train.batch_size={recipe.train.batch_size} but the largest bucket of {recipe.data.shards} holds "
            f"{max(sizes.values(), default=0)} training clip(s) (a batch is one bucket; {world} process(es) need "
            f"{world} batch(es) a step): lower train.batch_size, or add clips"
        )
    return RunData(recipe, dataset, heldout, sampler)
