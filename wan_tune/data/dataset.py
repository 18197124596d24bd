"""The shard dataset the trainer reads, and the collate that pads text as the pipeline does."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .shards import ShardReader


class ShardDataset(Dataset):
    """Samples of a shard folder: dicts of tensors in their stored dtype (bf16 halves what crosses
    from worker processes), plus their bucket. Casting and padding happen on the device
    (`to_device`).

    The reader (and its memory-mapped files) is opened lazily in each worker process, so the
    dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, root):
        self.root = root
        self._reader: ShardReader | None = None
        probe = ShardReader(root)
        self.meta = probe.meta
        # VACE: clips with another number of reference images have another context length, so
        # they are another bucket (a batch stacks one shape). Index files from before the column: 0.
        refs = probe.index["references"].fillna(0).astype(int) if "references" in probe.index else [0] * len(probe.index)
        self.buckets = [(*b, r) for b, r in zip(probe.index[["frames", "height", "width"]].itertuples(index=False), refs)]
        self.ids, self.sources = probe.index["id"].tolist(), probe.index["source"].tolist()
        # data.sources: which source each sample came from (index files from before the column: one, "default")
        self.datasets = (probe.index["dataset"].fillna("default").tolist() if "dataset" in probe.index
                         else ["default"] * len(self.ids))
        self.empty_prompt = probe.empty_prompt()
        # Several captions of a clip (`text`, `text.1`, ...): one is drawn per step (index files from before: one)
        self.caption_counts = (probe.index["captions"].fillna(1).astype(int).tolist() if "captions" in probe.index
                               else [1] * len(self.ids))

    def __len__(self) -> int:
        return len(self.buckets)

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def __getitem__(self, key) -> dict:
        """Sample `key`: an index (its first caption), or (index, draw) from the sampler, which picks
        caption `draw % count` of a clip with several."""
        i, draw = key if isinstance(key, tuple) else (key, 0)
        if self._reader is None:
            self._reader = ShardReader(self.root)
        tensors = self._reader.tensors(i)
        others = sorted((k for k in tensors if k.startswith("text.")), key=lambda k: int(k.split(".")[1]))
        if others:
            chosen = draw % (len(others) + 1)
            if chosen:
                tensors["text"] = tensors[others[chosen - 1]]
            for k in others:  # the batch stacks one caption per sample
                del tensors[k]
        return {"index": i, **tensors}


def collate(samples: list[dict]) -> dict:
    """Stack one bucket's samples; text is zero-padded only to the batch's longest prompt here
    (the full pad to max_text_tokens happens on the device, in `to_device`)."""
    out = {"index": torch.tensor([s["index"] for s in samples])}
    out["text"] = pad_text([s["text"] for s in samples], max(s["text"].shape[0] for s in samples))
    for key in samples[0]:
        if key not in ("index", "text"):
            out[key] = torch.stack([s[key] for s in samples])
    return out


def pad_text(embeds: list[torch.Tensor], length: int) -> torch.Tensor:
    """Zero-pad (or cut) text embeddings [L_i, D] to [N, length, D]."""
    dim = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), length, dim)
    for i, e in enumerate(embeds):
        n = min(e.shape[0], length)
        out[i, :n] = e[:n]
    return out


def to_device(batch: dict, device, dtype: torch.dtype, max_text_tokens: int) -> dict:
    """Move a collated batch to the device as `dtype`, text zero-padded to `max_text_tokens`
    exactly as `WanPipeline.encode_prompt` pads it (Wan's cross-attention takes no mask, so
    the pad length matters and must match inference)."""
    # non_blocking: from pinned memory (a GPU run's loader) the copy does not hold the host up.
    out = {k: v.to(device, dtype, non_blocking=True) if v.is_floating_point() else v.to(device, non_blocking=True)
           for k, v in batch.items()}
    text = out["text"]
    if text.shape[1] != max_text_tokens:
        out["text"] = pad_text(list(text), max_text_tokens)
    return out
