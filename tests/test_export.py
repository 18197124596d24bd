"""Export: every format loads in diffusers to the trained model's outputs; merge; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import transformer_inputs
from launching import PLAIN
from wan_tune.cli import main
from wan_tune.config import load_recipe
from wan_tune.export.adapters import ExportError
from wan_tune.export.run import export, read_checkpoint
from wan_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
# alpha != rank, so a format that loses alpha shows up as a wrong output.
LORA = ["train.steps=6", "adapter.rank=4", "adapter.alpha=8", "train.lr=2e-2", "checkpoint.every=6"]


@pytest.fixture(scope="module")
def trained(tiny_folders, tiny_shards, tmp_path_factory):
    """{variant: (summary, checkpoint)} for short tiny LoRA runs."""
    out = {}
    for variant in ("tiny", "tiny-i2v"):
        root = tmp_path_factory.mktemp(f"run-{variant}")
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.variant={variant}", f"model.path={tiny_folders[variant]}", f"data.shards={tiny_shards[variant]}",
            f"run.output_dir={root}", "data.num_workers=0", *PLAIN, *LORA])
        summary = train(recipe, progress=False, say=lambda *_: None)
        out[variant] = (summary, Path(summary["checkpoint"]))
    return out


def forward(model, variant):
    with torch.no_grad():
        return model(**transformer_inputs(variant), return_dict=False)[0]


@pytest.mark.parametrize("variant", ["tiny", "tiny-i2v"])
def test_every_format_loads_in_diffusers_to_the_trained_outputs(trained, tiny_folders, tmp_path, variant):
    summary, ckpt = trained[variant]
    in_memory = summary["model"].eval()
    expected = forward(in_memory, variant)
    base_out = forward(WanTransformer3DModel.from_pretrained(tiny_folders[variant], subfolder="transformer"), variant)
    assert (expected - base_out).abs().max() > 1e-3  # the LoRA really changes the output

    checks = export(ckpt, ["comfyui", "diffusers", "kohya"], tmp_path, merge=True, say=lambda *_: None)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    cls = WanImageToVideoPipeline if variant == "tiny-i2v" else WanPipeline
    for fmt in ("comfyui", "diffusers", "kohya"):
        (file,) = tmp_path.glob(f"*-{fmt}.safetensors")
        pipe = cls.from_pretrained(tiny_folders[variant])
        pipe.load_lora_weights(str(file))
        got = forward(pipe.transformer, variant)
        # Tolerance 1e-5 absolute (fp32); seen: <= 2e-6 (summation order of the folded scale).
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{variant} {fmt}")
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        assert meta["wan_tune.variant"] == variant and meta["wan_tune.rank"] == "4" and meta["wan_tune.alpha"] == "8"
        assert meta["wan_tune.steps"] == "6" and meta["wan_tune.trigger_word"] == "wtune"

    # The merged transformer equals base + (alpha/rank) * B @ A, and gives the trained outputs.
    base = WanTransformer3DModel.from_pretrained(tiny_folders[variant], subfolder="transformer").state_dict()
    merged_dir = next(tmp_path.glob("*-merged"))
    merged = WanTransformer3DModel.from_pretrained(merged_dir / "transformer")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    module = "blocks.1.attn2.to_v"
    a, b = weights[f"{module}.lora_A.default.weight"], weights[f"{module}.lora_B.default.weight"]
    torch.testing.assert_close(merged.state_dict()[f"{module}.weight"], base[f"{module}.weight"] + 2.0 * b @ a, rtol=0, atol=1e-6)
    untouched = "blocks.0.norm2.weight"
    assert torch.equal(merged.state_dict()[untouched], base[untouched])
    torch.testing.assert_close(forward(merged, variant), expected, rtol=0, atol=1e-5)
    original = load_file(str(merged_dir / "transformer_original.safetensors"))
    assert "blocks.1.cross_attn.v.weight" in original and "head.head.weight" in original


def test_self_test_catches_what_diffusers_would_silently_drop(trained, tmp_path):
    from wan_tune.export.adapters import adapter_from_trainable
    from wan_tune.export.selftest import check_adapter_file
    from wan_tune.models.variants import get_variant

    summary, ckpt = trained["tiny"]
    export(ckpt, ["diffusers"], tmp_path, say=lambda *_: None)
    (good,) = tmp_path.glob("*-diffusers.safetensors")
    adapter = adapter_from_trainable(load_file(str(ckpt / "trainable.safetensors")), 4, 8.0, {})
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    no_prefix = tmp_path / "no_prefix.safetensors"  # diffusers ignores these keys without an error
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, no_prefix, metadata=meta)
    no_alpha = tmp_path / "no_alpha.safetensors"  # alpha lost: the update is off by alpha/rank = 2
    save_file(tensors, no_alpha, metadata={"format": "pt"})
    assert check_adapter_file(good, adapter, get_variant("tiny")).ok
    dropped = check_adapter_file(no_prefix, adapter, get_variant("tiny"))
    assert not dropped.ok and "applied the LoRA to 0 of 20 modules" in dropped.problem
    scaled = check_adapter_file(no_alpha, adapter, get_variant("tiny"))
    assert not scaled.ok and scaled.max_rel_error == pytest.approx(0.5, rel=1e-4)


def test_kohya_is_refused_when_targets_do_not_cover_every_block(tiny_folders, tiny_shards, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path}",
        "data.num_workers=0", "train.steps=2", "adapter.targets=[attention]", *PLAIN])
    ckpt = Path(train(recipe, progress=False, say=lambda *_: None)["checkpoint"])
    with pytest.raises(ExportError, match=r"kohya format refused.*ffn\.net\.0\.proj.*--format comfyui"):
        export(ckpt, ["kohya"], tmp_path / "out", say=lambda *_: None)
    assert all(c.ok for c in export(ckpt, ["comfyui", "diffusers"], tmp_path / "out", say=lambda *_: None))


def test_full_finetune_exports_both_layouts(tiny_folders, tiny_shards, tmp_path, recipe_file):
    path = recipe_file("run: {name: full}\nmodel: {variant: tiny, dtype: fp32}\nadapter: {method: full}\n"
                       "train: {steps: 2, batch_size: 2, mixed_precision: 'no', gradient_checkpointing: false}\n"
                       "tracking: {backend: none}\n")
    recipe = load_recipe(path, [f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}",
                                f"run.output_dir={tmp_path}", "data.num_workers=0"])
    summary = train(recipe, progress=False, say=lambda *_: None)
    assert main(["export", summary["checkpoint"], "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "full-step000002"
    assert (folder / "transformer" / "config.json").is_file()
    trained_sd = summary["model"].state_dict()
    reloaded = WanTransformer3DModel.from_pretrained(folder / "transformer").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in trained_sd.items())
    # Again into the same folder: its own files are replaced; one put in its model folder is in the way.
    assert main(["export", summary["checkpoint"], "--out", str(tmp_path / "out")]) == 0
    (folder / "transformer" / "notes.txt").write_text("ours")
    assert main(["export", summary["checkpoint"], "--out", str(tmp_path / "out")]) == 1
    assert (folder / "transformer" / "notes.txt").read_text() == "ours"


def test_broken_checkpoints_and_foreign_loras_get_clear_errors(trained, tmp_path, capsys):
    _, ckpt = trained["tiny"]
    bad = tmp_path / "bad" / ckpt.name  # its own step in its folder name (another is refused first)
    shutil.copytree(ckpt, bad)
    (bad / "state.json").unlink()
    assert main(["export", str(bad)]) == 1
    assert "missing state.json" in capsys.readouterr().err

    shutil.copy(ckpt / "state.json", bad / "state.json")
    (bad / "trainable.safetensors").write_text("not a tensor file")
    with pytest.raises(ExportError, match="trainable.safetensors does not match its size and CRC-32 in state.json"):
        read_checkpoint(bad)
    state = json.loads((bad / "state.json").read_text())
    for key in ("files", "checksum", "format_version"):  # a checkpoint of a wan-tune that recorded no digests:
        state.pop(key)                                    # the file itself is checked
    (bad / "state.json").write_text(json.dumps(state))
    with pytest.raises(ExportError, match="trainable.safetensors is not a readable safetensors file"):
        read_checkpoint(bad)

    # An I2V adapter whose recipe claims the T2V variant: shapes and modules do not fit.
    _, i2v_ckpt = trained["tiny-i2v"]
    foreign = tmp_path / "foreign" / i2v_ckpt.name
    shutil.copytree(i2v_ckpt, foreign)
    text = (foreign / "recipe.yaml").read_text().replace("variant: tiny-i2v", "variant: tiny")
    (foreign / "recipe.yaml").write_text(text)
    said = []  # state.json says what was trained: the edit is named, the I2V adapter exports as I2V
    assert all(c.ok for c in export(foreign, ["comfyui"], tmp_path / "i2v", say=said.append))
    assert any("model.variant: 'tiny' there, 'tiny-i2v' trained" in s for s in said), said
    state = json.loads((foreign / "state.json").read_text())
    for key in ("training", "checksum", "format_version"):  # as a wan-tune before the record wrote it
        state.pop(key)
    (foreign / "state.json").write_text(json.dumps(state))
    with pytest.raises(ExportError, match="does not fit tiny: module blocks.0.attn2.add_k_proj"):
        export(foreign, ["comfyui"], tmp_path / "x", say=lambda *_: None)
    assert main(["export", str(tmp_path / "nowhere")]) == 1
    assert "not a checkpoint folder" in capsys.readouterr().err
    json.loads((ckpt / "state.json").read_text())  # the original is untouched


def test_sample_renders_with_and_without_the_lora(trained, tiny_folders, tmp_path):
    import decord
    from PIL import Image

    _, ckpt = trained["tiny"]
    export(ckpt, ["comfyui"], tmp_path, say=lambda *_: None)
    (lora,) = tmp_path.glob("*-comfyui.safetensors")
    common = ["sample", "--base", str(tiny_folders["tiny"]), "--prompt", "wtune style, a red circle", "--frames", "9",
              "--steps", "2", "--height", "48", "--width", "64", "--seed", "3"]
    assert main([*common, "--lora", str(lora), "--out", str(tmp_path / "with.mp4")]) == 0
    assert main([*common, "--out", str(tmp_path / "base.mp4")]) == 0
    assert main([*common, "--lora", str(lora), "--lora-scale", "0", "--out", str(tmp_path / "zero.mp4")]) == 0
    clips = {n: decord.VideoReader(str(tmp_path / f"{n}.mp4")).get_batch(range(9)).asnumpy().astype(int) for n in ("with", "base", "zero")}
    assert clips["with"].shape == (9, 48, 64, 3)
    assert abs(clips["with"] - clips["base"]).mean() > 0.5  # the LoRA changes the video
    assert abs(clips["zero"] - clips["base"]).mean() < 0.5  # scale 0 is the base model (codec noise only)
    sheet = Image.open(tmp_path / "with.png")
    assert sheet.size == (64 * 8, 48)  # 8 frames side by side


def test_sample_refuses_mismatches_clearly(trained, tiny_folders, tmp_path, capsys):
    _, i2v_ckpt = trained["tiny-i2v"]
    export(i2v_ckpt, ["comfyui"], tmp_path, say=lambda *_: None)
    (lora,) = tmp_path.glob("*-comfyui.safetensors")
    base = ["sample", "--prompt", "x", "--frames", "9", "--steps", "1", "--out", str(tmp_path / "o.mp4")]
    assert main([*base, "--base", str(tiny_folders["tiny"]), "--lora", str(lora)]) == 1
    assert "trained for tiny-i2v, but --base" in capsys.readouterr().err
    assert main([*base, "--base", str(tiny_folders["tiny-i2v"])]) == 1
    assert "give the first frame with --image" in capsys.readouterr().err
    assert main([*base, "--base", str(tiny_folders["tiny"]), "--frames", "10"]) == 1
    assert "4k+1" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_text("junk")
    assert main([*base, "--base", str(tiny_folders["tiny"]), "--lora", str(tmp_path / "junk.safetensors")]) == 1
    assert "not a safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["tiny", "tiny-i2v"])
def test_adapters_outside_the_blocks_load_alike_in_every_format_that_can_hold_them(tiny_folders, tiny_shards, tmp_path, variant):
    from wan_tune.config.loader import ConfigError

    outside = ["condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1"]
    if variant == "tiny-i2v":
        outside.append("condition_embedder.image_embedder.ff.net.0.proj")
    base = [f"model.variant={variant}", f"model.path={tiny_folders[variant]}", f"data.shards={tiny_shards[variant]}",
            f"run.output_dir={tmp_path}", "data.num_workers=0", *PLAIN, *LORA,
            f"adapter.targets=[attention, {', '.join(outside)}]"]
    # kohya cannot carry them: `check` says so before anything trains (export.format=all leaves it out).
    with pytest.raises(ConfigError, match=r"export.format.*kohya cannot carry adapters outside the transformer blocks"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*base, "export.format=kohya"])
    summary = train(load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*base, "export.format=comfyui"]),
                    progress=False, say=lambda *_: None)
    ckpt = Path(summary["checkpoint"])
    expected = forward(summary["model"].eval(), variant)
    weights = load_file(str(ckpt / "trainable.safetensors"))
    pairs = {k.split(".lora_")[0] for k in weights}
    assert set(outside) <= pairs  # they really trained

    checks = export(ckpt, ["comfyui", "diffusers"], tmp_path / "out", say=lambda *_: None)
    assert all(c.ok and c.modules == len(pairs) for c in checks), checks  # every module, outside ones too
    cls = WanImageToVideoPipeline if variant == "tiny-i2v" else WanPipeline
    for fmt in ("comfyui", "diffusers"):
        (file,) = (tmp_path / "out").glob(f"*-{fmt}.safetensors")
        pipe = cls.from_pretrained(tiny_folders[variant])
        pipe.load_lora_weights(str(file))
        torch.testing.assert_close(forward(pipe.transformer, variant), expected, rtol=0, atol=1e-5, msg=f"{variant} {fmt}")
    # comfyui: no alpha outside the blocks, the scale (alpha/rank = 2) folded into lora_up; alpha kept inside.
    comfy = load_file(str(next((tmp_path / "out").glob("*-comfyui.safetensors"))))
    b = weights["condition_embedder.time_proj.lora_B.default.weight"]
    assert "diffusion_model.time_projection.1.alpha" not in comfy
    torch.testing.assert_close(comfy["diffusion_model.time_projection.1.lora_up.weight"], b * 2)
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 8

    # Exported anyway as kohya: refused with the reason, and no file is left behind.
    with pytest.raises(ExportError, match=r"kohya format refused: it cannot carry adapters outside the transformer blocks"):
        export(ckpt, ["comfyui", "kohya"], tmp_path / "refused", say=lambda *_: None)
    assert not list((tmp_path / "refused").glob("*.safetensors"))
