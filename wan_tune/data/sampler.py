"""Batches of one bucket each, seeded, split across ranks without duplicates, resumable.

Every rank builds the same global list of batches for an epoch (a pure function of seed and
epoch), then takes every world-th batch; all ranks get the same number of batches, so DDP
never waits on a rank that ran out. The number of batches consumed is the whole resume state.

Several sources (`data.sources`) each put a fixed number of draws into every epoch: `repeats` times
their samples, or their `weight`'s share of all samples. A source drawn 2.5 times deals each sample
twice and a seeded half of them a third time, another half each epoch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class BucketBatchSampler:
    buckets: list[tuple]
    """Bucket key of every sample, by index."""
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    epoch: int = 0
    position: int = 0
    """Batches of this epoch already handed out on this rank."""
    held_out: frozenset = frozenset()
    """Indices never dealt out (the held-out samples the trainer scores, `data.holdout`)."""
    groups: list[str] | None = None
    """Source name of every sample (`data.sources`); None: one source."""
    draws: dict[str, int] | None = None
    """Samples drawn from each group per epoch (`draw_counts`); a group not named: each sample once."""
    captions: bool = False
    """Some samples have several captions: batches are dealt as (index, draw) pairs, the draw (from the
    seed, the epoch and the batch's place in it) picking the caption, so a resume draws the same ones."""

    def __post_init__(self):
        self._global: dict[int, list[list[int]]] = {}  # epoch -> every rank's batches (the last few epochs)

    def _pool(self, rng: random.Random) -> list[int]:
        """The epoch's draws: training indices, each group's as often as `draws` says."""
        mine = [i for i in range(len(self.buckets)) if i not in self.held_out]
        if self.groups is None or self.draws is None:
            return mine
        by_group: dict[str, list[int]] = defaultdict(list)
        for i in mine:
            by_group[self.groups[i]].append(i)
        pool = []
        for name in sorted(by_group):
            idx = by_group[name]
            whole, extra = divmod(self.draws.get(name, len(idx)), len(idx))
            pool += idx * whole + sorted(rng.sample(idx, extra))
        return pool

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of `epoch`, in the order they are dealt out (rank r takes r, r + world, ...)."""
        if epoch not in self._global:
            if len(self._global) > 2:
                self._global.pop(min(self._global))
            self._global[epoch] = self._deal(epoch)
        return self._global[epoch]

    def _deal(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}")
        by_bucket: dict[tuple, list[int]] = defaultdict(list)
        for i in self._pool(rng):
            by_bucket[self.buckets[i]].append(i)
        batches = []
        for key in sorted(by_bucket):
            idx = by_bucket[key]
            rng.shuffle(idx)
            # A bucket's remainder smaller than a batch is dropped this epoch (it comes back
            # shuffled next epoch): mixed-size batches would break the one-bucket rule.
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        return batches[: len(batches) // self.world * self.world]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return self.global_batches(epoch)[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self):
        """Endless: batches of the current epoch from `position` on, then the next epochs."""
        while True:
            batches = self.epoch_batches(self.epoch)
            if not batches:
                raise ValueError(
                    f"no full batch of {self.batch_size} on each of {self.world} rank(s): every bucket has fewer clips "
                    "than train.batch_size; lower train.batch_size or add clips"
                )
            while self.position < len(batches):
                batch = batches[self.position]
                if self.captions:
                    rng = random.Random(f"{self.seed}-{self.epoch}-caption-{self.position * self.world + self.rank}")
                    batch = [(i, rng.getrandbits(31)) for i in batch]
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def seek(self, consumed: int) -> None:
        """Resume after `consumed` batches on this rank. The trainer counts consumed batches
        itself: a DataLoader prefetches from this iterator, so `position` runs ahead of training."""
        self.epoch, self.position = self._locate(consumed)

    def _locate(self, consumed: int) -> tuple[int, int]:
        """(epoch, batches into it) after `consumed` batches of this rank."""
        if self.draws is None or self.groups is None:  # every epoch the same length: bucket sizes do not change
            per_epoch = len(self.epoch_batches(0))
            return divmod(consumed, per_epoch) if per_epoch else (0, 0)
        epoch = 0  # a source's extra draws change bucket sizes, so epochs differ in length: walk them
        while True:
            n = len(self._deal(epoch)) // self.world
            if n == 0 or consumed < n:
                return epoch, consumed if n else 0
            consumed, epoch = consumed - n, epoch + 1

    def drawn(self, consumed: int) -> dict[str, int]:
        """Samples drawn from each group over the first `consumed` batches of every rank: what the
        run has trained on so far, the same number on every rank (no communication)."""
        counts: dict[str, int] = defaultdict(int)
        if self.groups is None:
            return {}
        epoch, position = self._locate(consumed)
        for e in range(epoch + 1):
            batches = self._deal(e) if e < epoch else self.global_batches(e)[: position * self.world]
            for batch in batches:
                for i in batch:
                    counts[self.groups[i]] += 1
        return dict(sorted(counts.items()))


def draw_counts(groups: list[str], held_out: frozenset, repeats: dict[str, float], weights: dict[str, float] | None
                ) -> dict[str, int]:
    """Samples each group puts into an epoch: `repeats` x its training samples, or (with `weights`)
    its weight's share of all training samples."""
    sizes: dict[str, int] = defaultdict(int)
    for i, g in enumerate(groups):
        if i not in held_out:
            sizes[g] += 1
    if weights:
        total, weight_sum = sum(sizes.values()), sum(weights.get(g, 0.0) for g in sizes)
        return {g: max(1, round(total * weights.get(g, 0.0) / weight_sum)) if n else 0 for g, n in sizes.items()}
    return {g: max(1, round(n * repeats.get(g, 1.0))) if n else 0 for g, n in sizes.items()}


class DrawCounter:
    """Samples drawn from each group so far, advanced one step's batches at a time (the run's
    `drawn/<source>` figures); starts from `sampler.drawn(consumed)`, so a resume counts on exactly."""

    def __init__(self, sampler: BucketBatchSampler, consumed: int):
        self.sampler = sampler
        self.counts: dict[str, int] = defaultdict(int, {name: 0 for name in sampler.draws or {}})  # each from 0
        self.counts.update(sampler.drawn(consumed))
        self.epoch, self.position = sampler._locate(consumed)

    def advance(self, batches: int) -> dict[str, int]:
        s = self.sampler
        for _ in range(batches):
            dealt = s.global_batches(self.epoch)
            if self.position >= len(dealt) // s.world:
                self.epoch, self.position = self.epoch + 1, 0
                dealt = s.global_batches(self.epoch)
            for batch in dealt[self.position * s.world : (self.position + 1) * s.world]:
                for i in batch:
                    self.counts[s.groups[i]] += 1
            self.position += 1
        return dict(sorted(self.counts.items()))
