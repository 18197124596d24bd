"""Shared set-up for the benchmarks: a transformer folder with random weights and synthetic shards.

Real-size Wan weights cannot be downloaded here, and speed does not depend on their values, so
benchmarks save a random-init transformer of the real architecture (bf16 on disk) and write
shards of random latents / text embeddings of real shapes with wan-tune's own shard writer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from wan_tune.data import shards
from wan_tune.models.variants import get_variant


def model_folder(variant_name: str, root: Path) -> Path:
    """A folder wan-tune loads the variant from: the whole tiny pipeline for tiny variants, else
    <root>/<variant>/transformer/ with random weights of the real architecture. Built once."""
    from diffusers import WanTransformer3DModel

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
    """Shards of `samples` random samples with latents [16, F', H', W'] and text [text_len, D]."""
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
        if v.is_i2v:
            tensors["condition"] = torch.randn(20, f, h, w, generator=g)
            tensors["image_embeds"] = torch.randn(257, v.transformer["image_dim"], generator=g)
        writer.add({"id": f"s{i:06d}", "source": "synthetic", "caption": "benchmark", "frames": frames, "height": height,
                    "width": width, "start_frame": 0, "start_s": 0.0, "end_s": 0.0}, tensors)
    writer.close()
    shards.save_empty_prompt(out, torch.zeros(1, v.transformer["text_dim"]), torch.bfloat16)
    shards.write_meta(out, {"variant": variant_name, "task": v.task, "vae": {}, "settings": {}, "encoders": {}})
    shards.merge_index(out)
    return out


def workdir() -> Path:
    path = Path(tempfile.gettempdir()) / "wan-tune-bench"
    path.mkdir(exist_ok=True)
    return path
