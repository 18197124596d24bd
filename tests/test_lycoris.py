"""adapter.method=loha / lokr (#35): peft's LyCORIS adapters train and resume bit-exactly, render
in validation, export in ComfyUI's keys (hada_*, lokr_*) whose update, computed by ComfyUI's
formulas, is the trained one; `wan-tune sample` merges them; the formats that cannot hold them
are refused in one line; the plan counts their parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launching import PLAIN
from safetensors.torch import load_file, save_file

from wan_tune.config import ConfigError, load_recipe
from wan_tune.export.adapters import ExportError
from wan_tune.export.run import export
from wan_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "say": lambda *_: None}
METHODS = {"loha": ("adapter.method=loha", "adapter.rank=4", "adapter.alpha=2"),
           "lokr": ("adapter.method=lokr", "adapter.rank=4", "adapter.alpha=2"),
           "lokr-split": ("adapter.method=lokr", "adapter.rank=1", "adapter.alpha=2", "adapter.decompose_both=true",
                          "adapter.lokr_factor=4")}


def _recipe(tiny_folders, tiny_shards, out, *extra):
    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={out}",
        "data.num_workers=0", "train.steps=4", "checkpoint.every=2", *PLAIN, *extra])


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_resumes_and_exports_as_comfyui_reads_it(method, tiny_folders, tiny_shards, tmp_path):
    extra = METHODS[method]
    straight = train(_recipe(tiny_folders, tiny_shards, tmp_path / "a", *extra), **QUIET)
    train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", *extra, "train.steps=2"), **QUIET)
    resumed = train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", *extra), **QUIET)
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert straight["last_losses"] != straight["first_losses"]
    trained = load_file(str(Path(straight["checkpoint"]) / "trainable.safetensors"))
    kind = "hada_" if method == "loha" else "lokr_"
    assert trained and all(f".{kind}" in n for n in trained)
    if method == "lokr-split":  # the small factor split into a rank-1 pair too
        assert any(".lokr_w1_a." in n for n in trained)

    said = []
    checks = export(straight["checkpoint"], ["comfyui"], tmp_path / "export", say=said.append)
    assert [c.ok for c in checks] == [True] and checks[0].modules == len({n.rsplit(".", 2)[0] for n in trained})
    (file,) = (tmp_path / "export").glob("*-comfyui.safetensors")
    written = load_file(str(file))
    assert all(k.startswith("diffusion_model.blocks.") for k in written)
    assert any(k.endswith(".alpha") for k in written) == (method == "loha")  # LoKr: the scale is folded in

    # The self-test can fail: a file with one factor changed is caught.
    from wan_tune.export.lycoris import lycoris_from_trainable
    from wan_tune.export.selftest import check_lycoris_file
    from wan_tune.models.variants import get_variant

    recipe = _recipe(tiny_folders, tiny_shards, tmp_path / "a", *extra)
    adapter = lycoris_from_trainable(trained, recipe.adapter.method, recipe.adapter.rank, recipe.adapter.alpha)
    broken = dict(written)
    key = next(k for k in broken if not k.endswith(".alpha"))
    broken[key] = broken[key] * 1.01
    save_file(broken, str(tmp_path / "broken.safetensors"))
    assert not check_lycoris_file(tmp_path / "broken.safetensors", adapter, get_variant("tiny")).ok


def test_sample_merges_the_update_peft_trained(tiny_folders, tiny_shards, tmp_path):
    """`wan-tune sample --lora` adds each module's update into the weights: base + peft's own delta."""
    from wan_tune.models.loading import load_transformer, recipe_source
    from wan_tune.models.spec import lora_config
    from wan_tune.models.variants import get_variant
    from wan_tune.sampling import _merge_lycoris

    recipe = _recipe(tiny_folders, tiny_shards, tmp_path, *METHODS["loha"], "train.steps=2")
    done = train(recipe, **QUIET)
    export(done["checkpoint"], ["comfyui"], tmp_path / "export", say=lambda *_: None)
    (file,) = (tmp_path / "export").glob("*-comfyui.safetensors")
    merged = load_transformer(recipe_source(recipe), torch.float32)
    assert _merge_lycoris(merged, str(file), 0.5)
    peft_model = load_transformer(recipe_source(recipe), torch.float32)
    peft_model.add_adapter(lora_config(recipe, get_variant("tiny")))
    state = load_file(str(Path(done["checkpoint"]) / "trainable.safetensors"))
    missing = peft_model.load_state_dict(state, strict=False).unexpected_keys
    assert not missing
    layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "hada_w1_a") and "default" in m.hada_w1_a}
    assert layers
    for name, layer in layers.items():
        want = layer.get_base_layer().weight + 0.5 * layer.get_delta_weight("default")
        assert torch.allclose(merged.get_submodule(name).weight, want, atol=1e-6), name


def test_validation_renders_a_loha_run(tiny_folders, tiny_shards, tmp_path):
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, *METHODS["loha"], "train.steps=1", "validation.every=1",
                         "validation.steps=2"), **QUIET)
    renders = sorted((Path(done["run_dir"]) / "validation" / "step-000001").glob("*.mp4"))
    assert renders and all(p.stat().st_size > 0 for p in renders)


def test_formats_that_cannot_hold_them_are_refused(tiny_folders, tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"adapter.lr_ratio: LoRA\+ speeds up .*loha has none"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["adapter.method=loha", "adapter.lr_ratio=4"])
    with pytest.raises(ConfigError, match=r"export.format: kohya holds LoRA pairs only, not lokr"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["adapter.method=lokr", "export.format=kohya"])
    with pytest.raises(ConfigError, match=r"adapter.init_from: reads LoRA pairs; it cannot start a loha adapter"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["adapter.method=loha", "adapter.init_from=x.safetensors"])
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, *METHODS["lokr"], "train.steps=1"), **QUIET)
    with pytest.raises(ExportError, match=r"--format diffusers cannot hold a lokr adapter"):
        export(done["checkpoint"], ["diffusers"], tmp_path / "out", say=lambda *_: None)
    assert not (tmp_path / "out").exists()
    said = []
    export(done["checkpoint"], None, tmp_path / "all", say=said.append)  # the demo's export.format=all
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "all").glob("*.safetensors")) == ["comfyui.safetensors"]
    assert any("left out the kohya format" in s for s in said), said


def test_the_plan_counts_their_parameters():
    from wan_tune.plan.memory import MemoryPlan, Setup

    rows = {}
    for method in ("lora", "loha", "lokr"):
        recipe = load_recipe(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml", [f"adapter.method={method}"])
        plan = MemoryPlan(recipe, "gpu")
        rows[method] = {label: b for _, label, b in plan.breakdown(Setup.of(recipe)).rows}
    lora = rows["lora"]["LoRA weights fp32"]
    assert rows["loha"]["LoRA weights fp32"] == 2 * lora  # two pairs a module
    assert rows["lokr"]["LoRA weights fp32"] < lora / 4


def test_dora_trains_resumes_and_exports_in_the_diffusers_format(tiny_folders, tiny_shards, tmp_path):
    """adapter.method=dora (peft's use_dora): resumes bit-exactly; the diffusers file carries the
    magnitudes and diffusers' loader applies them (the self-test compares both the update and the
    magnitudes); comfyui/kohya are refused with the reason; a merged export is peft's own merge."""
    extra = ("adapter.method=dora", "adapter.rank=4", "adapter.alpha=2", "export.format=diffusers")
    straight = train(_recipe(tiny_folders, tiny_shards, tmp_path / "a", *extra), **QUIET)
    train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", *extra, "train.steps=2"), **QUIET)
    resumed = train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", *extra), **QUIET)
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    trained = load_file(str(Path(straight["checkpoint"]) / "trainable.safetensors"))
    magnitudes = [n for n in trained if ".lora_magnitude_vector." in n]
    assert magnitudes
    checks = export(straight["checkpoint"], None, tmp_path / "export", say=lambda *_: None, merge=True)
    assert all(c.ok for c in checks), checks
    (file,) = (tmp_path / "export").glob("*-diffusers.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in load_file(str(file))) == len(magnitudes)
    with pytest.raises(ExportError, match=r"--format comfyui cannot hold a dora adapter: ComfyUI's dora_scale"):
        export(straight["checkpoint"], ["comfyui"], tmp_path / "c", say=lambda *_: None)
    with pytest.raises(ConfigError, match=r"export.format: comfyui cannot hold peft's DoRA exactly"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["adapter.method=dora", "export.format=comfyui"])

    # The merged transformer is what peft's merge of the trained DoRA gives.
    from safetensors.torch import load_file as load

    from wan_tune.models.loading import load_transformer, recipe_source
    from wan_tune.models.spec import lora_config
    from wan_tune.models.variants import get_variant

    recipe = _recipe(tiny_folders, tiny_shards, tmp_path / "a", *extra)
    model = load_transformer(recipe_source(recipe), torch.float32)
    model.add_adapter(lora_config(recipe, get_variant("tiny")))
    assert not model.load_state_dict(trained, strict=False).unexpected_keys
    (merged_dir,) = (tmp_path / "export").glob("*-merged")
    merged = {}
    for f in merged_dir.rglob("*.safetensors"):
        merged.update(load(str(f)))
    name = magnitudes[0].split(".lora_magnitude_vector.")[0]
    layer = model.get_submodule(name)
    layer.merge(adapter_names=["default"])
    assert torch.allclose(merged[f"{name}.weight"], layer.get_base_layer().weight, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "loha", "lokr"])
def test_each_method_trains_the_same_under_the_memory_settings(method, tiny_folders, tiny_shards, tmp_path):
    """Activation offload, attention checkpoints and block offload change no result (bit for bit),
    FFN chunks only the order of sums; an fp8 base (LoHa, LoKr; refused for DoRA) keeps the adapter in fp32."""
    import json

    def run(name, *extra):
        done = train(_recipe(tiny_folders, tiny_shards, tmp_path / name, f"adapter.method={method}", "adapter.rank=4",
                             "export.format=all", "train.steps=3", "train.gradient_checkpointing=true", *extra), **QUIET)
        lines = (Path(done["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        return done, [json.loads(line)["loss"] for line in lines]

    plain, plain_losses = run("plain")
    saving, saving_losses = run("saving", "train.activation_offload=true", "train.attention_checkpointing=true",
                                "train.offload=blocks")
    assert saving_losses == plain_losses and saving["weights_sha256"] == plain["weights_sha256"]
    _, chunked_losses = run("chunked", "train.ffn_chunks=2")
    assert chunked_losses == pytest.approx(plain_losses, rel=1e-5)
    if method == "dora":
        with pytest.raises(ConfigError, match="train.fp8_base: DoRA reads the base weights"):
            run("fp8", "train.fp8_base=true")
        return
    fp8, fp8_losses = run("fp8", "train.fp8_base=true")
    frozen = [p.dtype for p in fp8["model"].parameters() if not p.requires_grad and p.dim() == 2]
    assert torch.float8_e4m3fn in frozen
    assert all(p.dtype == torch.float32 for p in fp8["model"].parameters() if p.requires_grad)
    assert fp8_losses == pytest.approx(plain_losses, rel=0.1) and fp8_losses != plain_losses


def test_the_plan_counts_the_whole_size_update_matmuls():
    """LoHa / LoKr apply a whole-size update as a second matmul per adapted layer: three more
    matmuls of the layer's size a step (forward, input gradient, update gradient)."""
    from wan_tune.plan.memory import MemoryPlan
    from wan_tune.models.variants import get_variant, transformer_class

    recipes = {m: load_recipe(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml", [f"adapter.method={m}"])
               for m in ("lora", "loha", "lokr")}
    flops = {m: MemoryPlan(r, "gpu").flops() for m, r in recipes.items()}
    plan = MemoryPlan(recipes["lora"], "gpu")
    variant = get_variant("wan2.1-t2v-1.3b")
    with torch.device("meta"):
        model = transformer_class(variant)(**variant.transformer)
    text_side = ("attn2.to_k", "attn2.to_v")
    adapted = sum(2 * m.in_features * m.out_features * (plan.shape.text_tokens if n.endswith(text_side) else plan.shape.tokens)
                  for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks."))
    assert flops["loha"] == flops["lokr"] == pytest.approx(flops["lora"] + 3 * adapted * plan.shape.batch)
