"""Batches of one bucket each, seeded, split across ranks without duplicates, resumable.

Every rank builds the same global list of batches for an epoch (a pure function of seed and
epoch), then takes every world-th batch; all ranks get the same number of batches, so DDP
never waits on a rank that ran out. The number of batches consumed is the whole resume state.
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

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}")
        by_bucket: dict[tuple, list[int]] = defaultdict(list)
        for i, b in enumerate(self.buckets):
            if i not in self.held_out:
                by_bucket[b].append(i)
        batches = []
        for key in sorted(by_bucket):
            idx = by_bucket[key]
            rng.shuffle(idx)
            # A bucket's remainder smaller than a batch is dropped this epoch (it comes back
            # shuffled next epoch): mixed-size batches would break the one-bucket rule.
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        per_rank = len(batches) // self.world
        return batches[self.rank : per_rank * self.world : self.world]

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
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def seek(self, consumed: int) -> None:
        """Resume after `consumed` batches on this rank. The trainer counts consumed batches
        itself: a DataLoader prefetches from this iterator, so `position` runs ahead of training."""
        per_epoch = len(self.epoch_batches(0))  # the same every epoch: bucket sizes do not change
        self.epoch, self.position = divmod(consumed, per_epoch) if per_epoch else (0, 0)
