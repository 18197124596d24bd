"""The shard dataset the trainer reads, and the collate that pads text as the pipeline does."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .shards import ShardReader


class ShardDataset(Dataset):
    """Samples of a shard folder: dicts of tensors (cast to `dtype`) plus their bucket.

    The reader (and its memory-mapped files) is opened lazily in each worker process, so the
    dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, root, dtype: torch.dtype = torch.float32):
        self.root, self.dtype = root, dtype
        self._reader: ShardReader | None = None
        probe = ShardReader(root)
        self.meta = probe.meta
        self.buckets = [tuple(b) for b in probe.index[["frames", "height", "width"]].itertuples(index=False)]
        self.empty_prompt = probe.empty_prompt().to(dtype)

    def __len__(self) -> int:
        return len(self.buckets)

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def __getitem__(self, i: int) -> dict:
        if self._reader is None:
            self._reader = ShardReader(self.root)
        tensors = self._reader.tensors(i)
        return {"index": i, **{k: v.to(self.dtype) for k, v in tensors.items()}}


def collate(samples: list[dict], max_text_tokens: int) -> dict:
    """Stack one bucket's samples; text embeddings are zero-padded to `max_text_tokens`, exactly
    as `WanPipeline.encode_prompt` pads them (Wan's cross-attention takes no mask, so the pad
    length matters and must match inference)."""
    out = {"index": torch.tensor([s["index"] for s in samples])}
    out["text"] = pad_text([s["text"] for s in samples], max_text_tokens)
    for key in samples[0]:
        if key not in ("index", "text"):
            out[key] = torch.stack([s[key] for s in samples])
    return out


def pad_text(embeds: list[torch.Tensor], max_text_tokens: int) -> torch.Tensor:
    dim = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), max_text_tokens, dim)
    for i, e in enumerate(embeds):
        n = min(e.shape[0], max_text_tokens)
        out[i, :n] = e[:n]
    return out
