"""Shared set-up for the benchmarks: a transformer folder with random weights and synthetic shards.

Real-size Wan weights cannot be downloaded here, and speed does not depend on their values, so
benchmarks save a random-init transformer of the real architecture (bf16 on disk) and write
shards of random latents / text embeddings of real shapes with wan-tune's own shard writer.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from wan_tune.data import shards
from wan_tune.models.variants import get_variant


def model_folder(variant_name: str, root: Path) -> Path:
    """A folder wan-tune loads the variant from: the whole tiny pipeline for tiny variants, else
    <root>/<variant>/transformer/ with random weights of the real architecture. Built once."""
    from wan_tune.models.variants import transformer_class

    WanTransformer3DModel = transformer_class(get_variant(variant_name))  # Animate: its own class
    folder = root / variant_name
    if get_variant(variant_name).tiny:
        from wan_tune.models.tiny import save_tiny_pipeline

        if not (folder / "model_index.json").is_file():
            save_tiny_pipeline(folder, variant_name)
        return folder
    if not (folder / "transformer" / "config.json").is_file():
        print(f"building a random-init {variant_name} transformer folder in {folder} (once) ...", flush=True)
        torch.manual_seed(0)
        if torch.cuda.is_available():
            # Built in bf16 on the GPU: a 14B initialises in seconds there (minutes on the host), and
            # an fp32 14B (57 GB) plus its bf16 copy would not fit an 80 GB card.
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device("cuda"):
                    model = WanTransformer3DModel(**get_variant(variant_name).transformer)
            finally:
                torch.set_default_dtype(default)
        else:
            model = WanTransformer3DModel(**get_variant(variant_name).transformer).to(torch.bfloat16)
        model.save_pretrained(folder / "transformer", safe_serialization=True)
        del model
        torch.cuda.empty_cache()
    return folder


def synthetic_shards(variant_name: str, root: Path, samples: int, latent_fhw: tuple[int, int, int], text_len: int = 32) -> Path:
    """Shards of `samples` random samples with latents [16, F', H', W'] and text [text_len, D] (I2V and
    Animate: their conditioning as prep stores it)."""
    v = get_variant(variant_name)
    out = root / f"shards-{variant_name}-{samples}-{'x'.join(map(str, latent_fhw))}"
    if (out / shards.INDEX_FILE).is_file():
        return out
    f, h, w = latent_fhw
    frames, height, width = (f - 1) * 4 + 1, h * 8, w * 8
    g = torch.Generator().manual_seed(0)
    writer = shards.ShardWriter(out, 0, per_file=16, dtype=torch.bfloat16)
    for i in range(samples):
        tensors = {"latents": torch.randn(16, f, h, w, generator=g), "text": torch.randn(text_len, v.transformer["text_dim"], generator=g)}
        if v.animate:  # what prep stores for Animate (models/animate.py), the face as its 8-bit frames
            size = v.transformer["motion_encoder_size"]
            tensors.update(reference=torch.randn(20, 1, h, w, generator=g), segment=torch.randn(20, f, h, w, generator=g),
                           pose=torch.randn(16, f, h, w, generator=g),
                           face=torch.randint(0, 256, (3, frames, size, size), generator=g, dtype=torch.uint8),
                           image_embeds=torch.randn(257, v.transformer["image_dim"], generator=g))
        elif v.is_i2v:
            tensors["condition"] = torch.randn(20, f, h, w, generator=g)
            tensors["image_embeds"] = torch.randn(257, v.transformer["image_dim"], generator=g)
        writer.add({"id": f"s{i:06d}", "source": "synthetic", "caption": "benchmark", "frames": frames, "height": height,
                    "width": width, "start_frame": 0, "start_s": 0.0, "end_s": 0.0}, tensors)
    writer.close()
    shards.save_empty_prompt(out, torch.zeros(1, v.transformer["text_dim"]), torch.bfloat16)
    shards.write_meta(out, {"variant": variant_name, "task": v.shard_task(v.task), "vae": {}, "settings": {}, "encoders": {}})
    shards.merge_index(out)
    return out


def workdir() -> Path:
    """Where benchmarks keep model folders, shards and runs: $WAN_TUNE_BENCH_DIR (bench/gpu_suite.sh
    points it at a folder it deletes at the end), else <tmp>/wan-tune-bench, kept between runs."""
    path = Path(os.environ.get("WAN_TUNE_BENCH_DIR") or Path(tempfile.gettempdir()) / "wan-tune-bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The largest RSS of this process since the last `reset`, sampled every 2 ms on a thread.

    The sample and the reset hold one lock: without it, a sample that read the old peak before a
    reset writes it back after, and the load's peak leaks into the steps' (seen on a busy
    2-core machine: 1.3B steps "measured" at 7.94 GiB, their load peak, against 6.06 alone)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            with self._lock:
                self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def reset(self) -> int:
        """The peak so far; start a new one from now."""
        with self._lock:
            peak, self.peak = max(self.peak, rss_bytes()), rss_bytes()
        return peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def run_steps(model, variant, batch: dict, steps: int, dtype: torch.dtype) -> tuple[list[float], list[float]]:
    """`steps` optimizer steps of the trainer's step code (its `predict`, flow-matching loss,
    backward, AdamW) on one batch, seeded; returns (losses, seconds per step)."""
    from wan_tune.models.spec import trainable_parameters
    from wan_tune.training import flow_matching as fm

    opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    losses, seconds = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        sigmas, noise = torch.rand(1, generator=g), torch.randn(batch["latents"].shape, generator=g)
        pred, target = fm.predict(model, variant, batch, sigmas, noise, dtype)
        loss = fm.flow_matching_loss(pred, target, torch.ones(1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, seconds
