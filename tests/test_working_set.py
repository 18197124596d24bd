"""A smaller backward working set (#23): what one block's recompute holds, cut without changing results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_offload import step

ROOT = Path(__file__).resolve().parents[1]


def _bf16_model(fp32_inputs: bool):
    """The tiny architecture in bf16 with LoRA (fp32 adapters), as a GPU run holds it."""
    from diffusers import WanTransformer3DModel

    from wan_tune.config import load_recipe
    from wan_tune.models.spec import adapt
    from wan_tune.models.variants import get_variant

    variant = get_variant("tiny")
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [f"train.lora_fp32_inputs={str(fp32_inputs).lower()}",
                                                              "train.gradient_checkpointing=true"])
    torch.manual_seed(0)
    model = WanTransformer3DModel(**dict(variant.transformer, num_layers=3)).to(torch.bfloat16)
    model = adapt(model, recipe, variant, torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def test_lora_inputs_stay_in_the_autocast_dtype_with_the_same_results():
    seen: dict[bool, set] = {}
    results = {}
    for fp32_inputs in (True, False):
        model = _bf16_model(fp32_inputs)
        dtypes = seen.setdefault(fp32_inputs, set())
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_pre_hook(lambda _m, args: dtypes.add(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fp32_inputs] = step(model)
    assert seen == {True: {torch.float32}, False: {torch.bfloat16}}  # peft's fp32 copy is made, or not
    (loss_a, grads_a), (loss_b, grads_b) = results[True], results[False]
    assert torch.equal(loss_a, loss_b)  # autocast casts the fp32 copy straight back: the same matmuls
    assert grads_a.keys() == grads_b.keys() and all(g.dtype == torch.float32 for g in grads_b.values())
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_the_plan_counts_the_smaller_working_set():
    from wan_tune.config import load_recipe
    from wan_tune.plan.memory import GIB, MemoryPlan, Setup

    sets = {}
    for fp32_inputs in (True, False):
        plan = MemoryPlan(load_recipe(ROOT / "recipes" / "wan2.1-t2v-14b-lora.yaml",
                                      [f"train.lora_fp32_inputs={str(fp32_inputs).lower()}"]))
        rows = {item: b for sec, item, b in plan.breakdown(Setup(True, False)).rows if sec == "activations"}
        sets[fp32_inputs] = rows["backward working set"]
    print(f"14B LoRA 480p, bf16 base, checkpointing: working set {sets[True] / GIB:.2f} GiB with fp32 LoRA inputs, "
          f"{sets[False] / GIB:.2f} without")
    assert sets[False] < 0.8 * sets[True]


def _fp32_model(chunks: int, layers: int = 6, full: bool = False):
    """The tiny architecture (LoRA on attention + ffn, checkpointing), its FFN in `chunks` slices."""
    from diffusers import WanTransformer3DModel

    from wan_tune.config import load_recipe
    from wan_tune.models.spec import adapt
    from wan_tune.models.variants import get_variant

    variant = get_variant("tiny")
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [f"train.ffn_chunks={chunks}", "train.gradient_checkpointing=true",
                                                              f"adapter.method={'full' if full else 'lora'}"])
    torch.manual_seed(0)
    model = adapt(WanTransformer3DModel(**dict(variant.transformer, num_layers=layers)), recipe, variant, torch.float32)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_ffn_chunks_give_the_same_outputs_and_gradients_within_reordered_sums(full):
    reference = step(_fp32_model(0, full=full))
    model = _fp32_model(3, full=full)
    calls = []
    model.blocks[0].ffn.net[0].register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[1]))
    loss, grads = step(model)
    tokens = 3 * 4 * 6  # the test latent, 3 x 8 x 12, in 1 x 2 x 2 patches
    # Forward, the block's recompute, then each slice's own recompute: three slices each time.
    assert calls == [tokens // 3] * 9
    assert torch.allclose(loss, reference[0], rtol=1e-6, atol=0)
    assert grads.keys() == reference[1].keys()
    for name in grads:  # each slice's gradient sum is added in turn: the same sum in another order
        assert torch.allclose(grads[name], reference[1][name], rtol=1e-4, atol=1e-7), name


def test_ffn_chunks_with_activation_offload_and_the_module_names_kept():
    from wan_tune.training.activation_offload import ActivationOffload

    plain = _fp32_model(2)
    reference = step(plain)
    model = _fp32_model(2)
    model.enable_gradient_checkpointing(ActivationOffload(model))
    loss, grads = step(model)
    assert torch.equal(loss, reference[0]) and all(torch.equal(grads[n], reference[1][n]) for n in grads)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _fp32_model(0).named_parameters()]


def test_the_plan_counts_ffn_chunks():
    from wan_tune.config import load_recipe
    from wan_tune.plan.memory import GIB, MemoryPlan, Setup

    recipe = load_recipe(ROOT / "recipes" / "wan2.1-t2v-14b-lora.yaml", ["train.ffn_chunks=4", "train.activation_offload=true"])
    plan = MemoryPlan(recipe)
    assert Setup.of(recipe) == Setup(True, False, None, activations=True, ffn_chunks=4)
    assert "train.ffn_chunks=4" in Setup.of(recipe).overrides()
    sets = {}
    for chunks in (0, 4):
        rows = plan.breakdown(Setup(True, True, 0, activations=True, ffn_chunks=chunks)).rows
        sets[chunks] = {item: b for sec, item, b in rows if sec == "activations"}["backward working set"]
    print(f"14B LoRA 480p, fp8 + activation offload: working set {sets[0] / GIB:.2f} GiB, {sets[4] / GIB:.2f} with 4 FFN chunks")
    assert sets[4] < 0.9 * sets[0]
