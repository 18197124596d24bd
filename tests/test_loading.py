"""Loading every layout users hold, on tiny models saved in each: identical weights and outputs."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import WanTransformer3DModel
from huggingface_hub import constants
from safetensors.torch import save_file

from conftest import transformer_inputs
from wan_tune.models.keymap import state_dict_to_original
from wan_tune.models.loading import (
    ModelLoadError,
    load_image_encoder,
    load_text_encoder,
    load_transformer,
    load_vae,
    resolve_source,
)
from wan_tune.models.tiny import build_tiny_pipeline


def forward(model, variant):
    with torch.no_grad():
        return model(**transformer_inputs(variant), return_dict=False)[0]


def assert_same_transformer(a, b, variant):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    out_a, out_b = forward(a, variant), forward(b, variant)
    assert out_a.shape == (1, 16, 3, 8, 12)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("variant", ["tiny", "tiny-i2v"])
def test_folder_and_single_file_load_the_saved_model(tiny_folders, tmp_path, variant):
    folder = tiny_folders[variant]
    in_memory = build_tiny_pipeline(variant, seed=0).transformer  # what was saved
    from_folder = load_transformer(resolve_source(variant, path=str(folder)))  # layout (b)
    file = tmp_path / "wan_original.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict_to_original(in_memory.state_dict()).items()}, file)
    from_file = load_transformer(resolve_source(variant, path=str(folder), transformer_file=str(file)))  # (c)
    # Both layouts give the saved weights, and bit-identical outputs to the model that was saved.
    assert_same_transformer(in_memory, from_folder, variant)
    assert_same_transformer(in_memory, from_file, variant)


def test_hub_id_resolves_from_the_local_hub_cache(tiny_folders, monkeypatch, tmp_path):
    # Layout (a): a hub id whose snapshot is in the HF cache loads with no network at all.
    cache = tmp_path / "hub"
    snapshot = cache / "models--studio--tiny-wan" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_folders["tiny"], snapshot)
    (cache / "models--studio--tiny-wan" / "refs").mkdir()
    (cache / "models--studio--tiny-wan" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    source = resolve_source("tiny", path="studio/tiny-wan")
    assert source.folder == snapshot
    reference = WanTransformer3DModel.from_pretrained(tiny_folders["tiny"], subfolder="transformer")
    assert_same_transformer(reference, load_transformer(source), "tiny")


def test_unreachable_hub_id_says_what_to_download():
    with pytest.raises(ModelLoadError) as info:
        resolve_source("wan2.1-t2v-1.3b")  # tests run with HF_HUB_OFFLINE=1 and an empty cache
    msg = str(info.value)
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg and "model.path=" in msg
    assert "Traceback" not in msg


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a folder"):
        resolve_source("tiny", path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="not a diffusers-format Wan folder"):
        resolve_source("tiny", path=str(tmp_path))


def test_weights_of_another_variant_are_refused(tiny_folders):
    source = resolve_source("tiny", path=str(tiny_folders["tiny-i2v"]))
    with pytest.raises(ModelLoadError, match="in_channels: variant 'tiny' has 16, the weights have 36"):
        load_transformer(source)


def test_bad_single_files_are_explained(tiny_folders, tmp_path):
    folder = str(tiny_folders["tiny"])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_transformer(resolve_source("tiny", path=folder, transformer_file=str(junk)))
    diffusers_keys = tmp_path / "diffusers_keys.safetensors"
    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, diffusers_keys)
    with pytest.raises(ModelLoadError, match="has diffusers keys"):
        load_transformer(resolve_source("tiny", path=folder, transformer_file=str(diffusers_keys)))
    i2v = WanTransformer3DModel.from_pretrained(tiny_folders["tiny-i2v"], subfolder="transformer")
    other = tmp_path / "i2v_original.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict_to_original(i2v.state_dict()).items()}, other)
    with pytest.raises(ModelLoadError, match="does not hold model.variant='tiny'"):
        load_transformer(resolve_source("tiny", path=folder, transformer_file=str(other)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("tiny", path=folder, transformer_file=str(tmp_path / "missing.safetensors"))


def test_other_components_load_and_match_the_pipeline(tiny_folders):
    source = resolve_source("tiny-i2v", path=str(tiny_folders["tiny-i2v"]))
    pipe = build_tiny_pipeline("tiny-i2v", seed=0)
    tokenizer, encoder = load_text_encoder(source)
    ids = tokenizer(["a red circle moving left"], return_tensors="pt")
    assert ids.input_ids[0, -1].item() == tokenizer.eos_token_id  # umT5-like: </s> appended
    with torch.no_grad():
        assert torch.equal(encoder(**ids).last_hidden_state, pipe.text_encoder(**ids).last_hidden_state)
    vae = load_vae(source)
    assert vae.config.z_dim == 16 and len(vae.config.latents_mean) == 16
    processor, image_encoder = load_image_encoder(source)
    pixels = processor(images=torch.zeros(3, 64, 96), return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[-1] == 32  # tiny image_dim
    t2v = resolve_source("tiny", path=str(tiny_folders["tiny"]))
    with pytest.raises(ModelLoadError, match="has no image encoder"):
        load_image_encoder(t2v)


def test_tiny_without_path_is_built_once_in_wan_tune_home(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_TUNE_HOME", str(tmp_path))
    first = resolve_source("tiny")
    assert first.folder == tmp_path / "models" / "tiny"
    stamp = (first.folder / "model_index.json").stat().st_mtime_ns
    assert resolve_source("tiny").folder == first.folder
    assert (first.folder / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("variant", ["tiny", "tiny-i2v"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_streamed_load_equals_load_then_cast_in_every_layout(tiny_folders, tmp_path, variant, dtype):
    """train.fp8_base reads weights one at a time into fp8; the model (base weights, dtypes, LoRA
    init) and its output are bit-identical to loading in full precision and casting after."""
    from wan_tune.config import load_recipe
    from wan_tune.models.precision import DTYPES
    from wan_tune.training.model_setup import adapt, load_for_training
    from wan_tune.models.variants import get_variant

    folder = tiny_folders[variant]
    recipe = load_recipe("recipes/demo-tiny.yaml", [f"model.variant={variant}", f"model.path={folder}", "train.fp8_base=true",
                                                     f"model.dtype={dtype}", "validation.every=0"])
    torch.manual_seed(0)
    cast_after = adapt(load_transformer(resolve_source(variant, path=str(folder)), DTYPES[dtype]), recipe, get_variant(variant),
                       DTYPES[dtype])
    sharded = tmp_path / "sharded"  # a diffusers folder in several files, as the 14B models are published
    shutil.copytree(folder, sharded, ignore=shutil.ignore_patterns("transformer"))
    build_tiny_pipeline(variant, seed=0).transformer.save_pretrained(sharded / "transformer", max_shard_size="20KB")
    assert len(list((sharded / "transformer").glob("*.safetensors"))) > 3
    single = tmp_path / "wan_original.safetensors"  # ComfyUI's layout, with its key prefix
    save_file({f"model.diffusion_model.{k}": v.contiguous()
               for k, v in state_dict_to_original(build_tiny_pipeline(variant, seed=0).transformer.state_dict()).items()}, single)
    layouts = {"folder": [], "sharded": [f"model.path={sharded}"], "single file": [f"model.transformer_file={single}"]}
    for layout, extra in layouts.items():
        torch.manual_seed(0)
        streamed = load_for_training(load_recipe("recipes/demo-tiny.yaml", [
            f"model.variant={variant}", f"model.path={folder}", "train.fp8_base=true", f"model.dtype={dtype}",
            "validation.every=0", *extra]))
        sa, sb = cast_after.state_dict(), streamed.state_dict()
        assert sa.keys() == sb.keys(), layout
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].float(), sb[k].float()), f"{layout}: {k}"
        assert sum(v.dtype == torch.float8_e4m3fn for v in sb.values()) >= 8  # the linear weights really are fp8
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):  # as the trainer runs it
            inputs = {k: v.to(DTYPES[dtype]) for k, v in transformer_inputs(variant).items()}
            assert torch.equal(cast_after(**inputs, return_dict=False)[0], streamed(**inputs, return_dict=False)[0]), layout


def test_fp8_streamed_load_names_what_is_wrong(tiny_folders, tmp_path):
    from wan_tune.memory.fp8_base import FP8_SKIP
    from wan_tune.memory.fp8_base import load_transformer_fp8

    folder = tiny_folders["tiny"]
    sd = state_dict_to_original(build_tiny_pipeline("tiny", seed=0).transformer.state_dict())
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("head.")}, partial)
    with pytest.raises(ModelLoadError, match=r"weight\(s\) of the tiny transformer are missing, e.g. scale_shift_table, proj_out"):
        load_transformer_fp8(resolve_source("tiny", path=str(folder), transformer_file=str(partial)), torch.float32,
                             "transformer", FP8_SKIP)
    bin_only = tmp_path / "bin"
    shutil.copytree(folder, bin_only)
    (bin_only / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="streams weights from safetensors"):
        load_transformer_fp8(resolve_source("tiny", path=str(bin_only)), torch.float32, "transformer", FP8_SKIP)


def test_an_empty_model_filled_from_the_files_is_the_loaded_one(tiny_folders, tmp_path):
    """FSDP2's load (parallel/sharded_load.py) on one process, where every weight is read whole: the
    LoRA'd model equals load_for_training's, bit for bit, from a folder and from an original single
    file; a file that lacks weights is named."""
    from wan_tune.config import load_recipe
    from wan_tune.parallel.sharded_load import fill_shards
    from wan_tune.training.model_setup import load_for_training

    folder = tiny_folders["tiny-i2v"]
    single = tmp_path / "wan_original.safetensors"
    sd = state_dict_to_original(build_tiny_pipeline("tiny-i2v", seed=0).transformer.state_dict())
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, single)
    for extra in ([], [f"model.transformer_file={single}"]):
        recipe = load_recipe("recipes/demo-tiny.yaml", ["model.variant=tiny-i2v", f"model.path={folder}",
                                                         "validation.every=0", *extra])
        torch.manual_seed(0)
        want = load_for_training(recipe).state_dict()
        torch.manual_seed(0)
        model = load_for_training(recipe, empty=True)
        assert fill_shards(model, resolve_source("tiny-i2v", path=str(folder), transformer_file=str(single) if extra else None)) > 0
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), extra
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("head.")}, partial)
    model = load_for_training(load_recipe("recipes/demo-tiny.yaml", ["model.variant=tiny-i2v", f"model.path={folder}",
                                                                      "validation.every=0"]), empty=True)
    with pytest.raises(ModelLoadError, match=r"weight\(s\) of the tiny-i2v transformer are missing"):
        fill_shards(model, resolve_source("tiny-i2v", path=str(folder), transformer_file=str(partial)))
