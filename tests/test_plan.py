"""`wan-tune plan`: the memory model against whole-model counts, real CPU steps and measured peaks,
the advice ladder, and the command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from memory_probe import PHASES, measure
from memory_probe import recipe as probe_recipe

from wan_tune.cli import main
from wan_tune.config import load_recipe
from wan_tune.memory.host_arena import packed_bytes
from wan_tune.models.variants import get_variant
from wan_tune.plan import MemoryPlan, Setup, run_shape
from wan_tune.plan.advice import cheapest, floor, ladder
from wan_tune.plan.memory import GIB
from wan_tune.plan.meta_step import count_step

ROOT = Path(__file__).resolve().parents[1]
RECIPE_14B = ROOT / "recipes" / "wan2.1-t2v-14b-lora.yaml"
TINY = ROOT / "recipes" / "demo-tiny.yaml"


@pytest.fixture(scope="module")
def plan_14b() -> MemoryPlan:
    """wan2.1-t2v-14b LoRA at 480x832x81 (the shipped recipe), one plan for all tests: counts are cached."""
    return MemoryPlan(load_recipe(RECIPE_14B))


def rows(breakdown, section: str) -> dict[str, float]:
    return {item: n for sec, item, n in breakdown.rows if sec == section}


# --- shapes ------------------------------------------------------------------------------------


def test_latent_and_tokens_follow_each_vae():
    wan21 = run_shape(load_recipe(RECIPE_14B), get_variant("wan2.1-t2v-14b"))
    assert (wan21.frames, wan21.height, wan21.width) == (81, 480, 832)  # the largest of frames [33, 81]
    assert wan21.latent == (16, 21, 60, 104) and wan21.tokens == 32_760  # DESIGN.md section 8
    ti2v = load_recipe(TINY, ["model.variant=wan2.2-ti2v-5b", "data.frames=[121]", "data.resolutions=[[704,1280]]",
                              "data.task=i2v"])
    shape = run_shape(ti2v, get_variant("wan2.2-ti2v-5b"))
    assert shape.latent == (48, 31, 44, 80) and shape.tokens == 31 * 22 * 40  # 16x VAE, 48 channels
    assert shape.extras == {"condition": (48, 1, 44, 80)}  # the image's latent replaces frame 0
    i2v = run_shape(load_recipe(ROOT / "recipes" / "wan2.1-i2v-14b-480p-lora.yaml"), get_variant("wan2.1-i2v-14b-480p"))
    assert i2v.extras == {"condition": (20, 21, 60, 104), "image_embeds": (257, 1280)}


# --- the meta device counts what a real step holds ---------------------------------------------


@pytest.mark.parametrize("settings", [
    dict(checkpointing=False), dict(checkpointing=True, fp8=True, autocast=torch.bfloat16),
    dict(checkpointing=True, autocast=torch.bfloat16, cuda=True), dict(checkpointing=False, autocast=torch.bfloat16, cuda=True),
])
def test_meta_count_equals_a_real_cpu_step(settings):
    """Emulated fused attention and autocast on the meta device give the bytes of a real CPU step
    (torch's own attention, checkpointing and CPU autocast), to the byte: fp32 as on a CPU, bf16
    autocast over fp8 storage with checkpointing, and CUDA's autocast (its fp32 RMS norms,
    emulated on the CPU by models/precision.py) as on a GPU."""
    autocast, cuda = settings.get("autocast"), settings.get("cuda", False)
    recipe = load_recipe(TINY, [f"train.gradient_checkpointing={str(settings['checkpointing']).lower()}",
                                f"train.fp8_base={str(settings.get('fp8', False)).lower()}", "train.batch_size=1"])
    variant = get_variant("tiny")
    shapes = {"latents": (1, 16, 3, 16, 24), "text": (1, 512, variant.transformer["text_dim"])}
    dtype = torch.float32 if autocast is None else torch.bfloat16
    meta = count_step(recipe, variant, shapes, dtype, autocast, cuda=cuda)
    real = count_step(recipe, variant, shapes, dtype, autocast, device="cpu", cuda=cuda)
    assert meta == real
    assert meta.saved > 0 and meta.peak > meta.saved
    if cuda:  # fp32 q and k: more than CPU autocast holds (audit B2)
        assert meta.peak > count_step(recipe, variant, shapes, dtype, autocast).peak


def test_per_block_extension_equals_the_whole_model():
    """A 2-block count extended to 4 blocks equals a 4-block model's count (with checkpointing,
    where the peak is in the recompute; without it, and at 30 blocks, see the slow 1.3B test)."""
    recipe = load_recipe(TINY, ["train.gradient_checkpointing=true"])
    plan = MemoryPlan(recipe, "cpu")
    shapes = plan.shape.batch_shapes()
    two = count_step(recipe, plan.variant, shapes, torch.float32, None)
    assert two.extend(4) == count_step(recipe, plan.variant, shapes, torch.float32, None, layers=4)


ROUTES = ([(0.5, 2, 5)], [(0.25, 1, 2), (0.5, 4, 7)], [(0.25, 2, 3)])  # spans inside, at the end, two ratios


@pytest.mark.parametrize("ckpt", ["true", "false"])
def test_routed_blocks_are_counted_at_their_kept_tokens(ckpt):
    """Token routing: a routed block adds what a block inside a span adds (a 4-block count with
    blocks 1..3 routed, read at block 2); the plan's 8-block model with routes against the whole
    8-block model routing those spans, counted; and the meta count of a routed step equals a real
    CPU step's."""
    from wan_tune.plan.meta_step import with_routes

    recipe = load_recipe(TINY, [f"train.gradient_checkpointing={ckpt}", "train.batch_size=1"])
    plan = MemoryPlan(recipe, "gpu")
    args = (plan.variant, plan.shape.batch_shapes(), plan.load_dtype, plan.autocast)
    plain = count_step(recipe, *args, cuda=True).extend(8)
    for routes in ROUTES:
        routed = {r: count_step(recipe, *args, cuda=True, layers=4, routes=((r, 1, 3),)) for r, _, _ in routes}
        predicted = with_routes(plain, routed, routes)
        whole = count_step(recipe, *args, cuda=True, layers=8, routes=tuple(routes))
        assert predicted.saved == pytest.approx(whole.saved, rel=0.002), routes
        assert predicted.peak == pytest.approx(whole.peak, rel=0.02), routes  # the span's edges' index copies
        if ckpt == "false":  # without checkpointing, a routed block keeps its kept tokens' activations only
            assert whole.saved < plain.saved and predicted.peak < plain.peak
    real = count_step(recipe, plan.variant, plan.shape.batch_shapes(), torch.float32, None, device="cpu", layers=4,
                      routes=((0.5, 1, 3),))
    assert real == count_step(recipe, plan.variant, plan.shape.batch_shapes(), torch.float32, None, layers=4,
                              routes=((0.5, 1, 3),))


# --- the 14B at 480x832x81 ----------------------------------------------------------------------


def test_14b_numbers_are_sane(plan_14b):
    recipe_setup = plan_14b.breakdown(Setup.of(plan_14b.recipe))
    weights = rows(recipe_setup, "base weights")
    assert sum(weights.values()) == pytest.approx(2 * 14.3e9, rel=0.01)  # bf16 (+ a few fp32 norms): ~28.6 GB
    assert weights["fp32"] < 0.01 * weights["bf16"]
    lora = rows(recipe_setup, "trainable")["LoRA weights fp32"] / 4
    assert lora == plan_14b.count(True, False).trainable and 1e8 < lora < 2e8  # r32 on attention + ffn, 40 blocks
    kept = rows(recipe_setup, "activations")["kept for backward"]
    # Checkpointing keeps a bf16 block input per block (and the non-block parts).
    assert kept == pytest.approx(40 * 32_760 * 5120 * 2, rel=0.1)
    no_ckpt = plan_14b.breakdown(Setup(False, False))
    assert rows(no_ckpt, "activations")["kept for backward"] > 20 * kept
    # DESIGN.md section 8's ~5 PFLOP a step counts the backward at 2x the forward; a LoRA step's
    # backward stops at the activations (1x): 2/3 of it.
    assert plan_14b.flops() == pytest.approx(5e15 * 2 / 3, rel=0.1)


def test_fp8_halves_the_linear_weights(plan_14b):
    bf16 = rows(plan_14b.breakdown(Setup(True, False)), "base weights")
    fp8 = rows(plan_14b.breakdown(Setup(True, True)), "base weights")
    assert bf16["bf16"] - fp8["bf16"] == 2 * fp8["fp8"]  # each weight moved to fp8 takes half the bytes
    assert fp8["fp8"] > 0.95 * (bf16["bf16"] / 2)  # nearly all: only FP8_SKIP (embedders, norms, head) stay
    assert fp8["fp32"] == bf16["fp32"]


def test_zero_divides_state_and_weights_by_the_gpus(plan_14b):
    one, two, three = (plan_14b.breakdown(Setup(True, False, None, z, 8)) for z in (0, 2, 3))
    w2, w3 = rows(two, "base weights"), rows(three, "base weights")
    assert w3["bf16"] * 8 == pytest.approx(w2["bf16"])
    assert w2["fp32"] < rows(one, "base weights")["fp32"] / 10  # DeepSpeed casts the fp32 norms to bf16 (not buffers)
    assert w3["ZeRO-3 gathered block"] == pytest.approx(w2["bf16"] / 40, rel=0.05)
    t1, t2 = rows(plan_14b.breakdown(Setup(True, False, None, 2, 1)), "trainable"), rows(two, "trainable")
    for item in ("gradients (16-bit)", "fp32 master weights", "AdamW moments"):
        assert t2[item] * 8 == pytest.approx(t1[item])
    assert t2["LoRA weights (16-bit)"] == t1["LoRA weights (16-bit)"]  # ZeRO-2 keeps whole weights
    assert rows(three, "trainable")["LoRA weights (16-bit)"] * 8 == pytest.approx(t1["LoRA weights (16-bit)"])


def test_offload_keeps_few_blocks_on_the_gpu(plan_14b):
    full, none_kept, some = (plan_14b.breakdown(Setup(True, True, keep)) for keep in (None, 0, 10))
    block = (sum(rows(full, "base weights").values()) - sum(rows(none_kept, "base weights").values())) / (40 - 3)
    on_gpu = {name: sum(rows(b, "base weights").values()) for name, b in (("none", none_kept), ("some", some))}
    assert on_gpu["some"] == pytest.approx(on_gpu["none"] + 10 * block)
    # Every streamed block has a pinned host copy, packed into power-of-two slabs (memory/host_arena.py):
    # a little over the payload, far under one rounded allocation per weight (audit B1).
    assert 40 * block <= none_kept.host <= 1.15 * 40 * block
    sizes = plan_14b.count(True, True).block_frozen_sizes
    assert sum(sizes) == pytest.approx(block, rel=1e-6)
    assert none_kept.host < 0.8 * 40 * sum(1 << (n - 1).bit_length() for n in sizes)
    assert rows(some, "activations") == rows(full, "activations")


def test_activation_offload_moves_the_block_inputs_to_the_host(plan_14b):
    kept, moved = (plan_14b.breakdown(Setup(True, True, activations=a)) for a in (False, True))
    block_input = 32_760 * 5_120 * 2  # tokens x width x bf16: what a checkpointed block keeps for its backward
    assert plan_14b.count(True, True).block_saved == block_input
    gone = rows(kept, "activations")["kept for backward"] - rows(moved, "activations")["kept for backward"]
    assert gone == (40 - 2) * block_input  # all but the block recomputing and the one prefetched
    assert kept.total - moved.total == gone
    # A buffer per block, in slabs: 14 GiB for 12.5 (one pinned allocation each would take 20).
    assert moved.host == packed_bytes([block_input] * 40) == 14 * GIB
    assert rows(moved, "activations")["backward working set"] == rows(kept, "activations")["backward working set"]
    assert "train.activation_offload=true" in Setup(True, True, activations=True).overrides()


# --- advice -------------------------------------------------------------------------------------


def test_ladder_goes_from_fastest_to_most_frugal(plan_14b):
    labels = [label for label, _ in ladder(plan_14b, 0, 8)]
    assert labels == ["none", "ckpt", "+fp8", "+act. offload", "+FFN chunks", "+attn. ckpt", "+ZeRO-2", "+ZeRO-3",
                      "+CP 2", "+CP 4", "+CP 8", "+offload"]  # 40 heads, 32,760 tokens: 2, 4 and 8 divide both
    gpu8 = [plan_14b.breakdown(s).total for label, s in ladder(plan_14b, 0, 8) if label.startswith(("+ZeRO-3", "+CP"))]
    assert gpu8 == sorted(gpu8, reverse=True)  # each degree divides further what ZeRO-3 cannot
    totals = [plan_14b.breakdown(s).total for _, s in ladder(plan_14b)]
    assert totals == sorted(totals, reverse=True)
    assert cheapest(plan_14b, 10_000) == Setup(False, False)  # room for anything: no saving needed


def test_a_budget_only_offload_meets_gets_the_most_blocks_that_fit(plan_14b):
    moved = plan_14b.breakdown(Setup(True, True, activations=True, ffn_chunks=4, attention=True)).total
    floor_total = plan_14b.breakdown(Setup(True, True, 0, activations=True, ffn_chunks=4, attention=True)).total
    budget = (moved + floor_total) / 2 / GIB
    fit = cheapest(plan_14b, budget)
    assert fit is not None and fit.offload_keep is not None and fit.checkpointing and fit.fp8
    assert plan_14b.breakdown(fit).total <= budget * GIB
    assert plan_14b.breakdown(replace(fit, offload_keep=fit.offload_keep + 1)).total > budget * GIB
    assert "train.offload=blocks" in fit.overrides() and f"train.offload_keep={fit.offload_keep}" in fit.overrides()


def test_an_impossible_budget_names_the_floor(plan_14b, capsys):
    assert cheapest(plan_14b, 1.0) is None
    assert floor(plan_14b) == Setup(True, True, 0, activations=True, ffn_chunks=4, attention=True)
    assert main(["plan", str(RECIPE_14B), "--gpu-memory", "1"]) == 1
    out = capsys.readouterr().out
    low = plan_14b.breakdown(Setup(True, True, 0, activations=True, ffn_chunks=4, attention=True)).total / GIB
    assert "nothing fits in 1 GiB (0.0 GiB usable: 1.1 GiB kept for the CUDA context" in out
    assert f"the floor is {low:.1f} GiB" in out and "train.offload_keep=0" in out


def test_fits_keeps_headroom_for_the_cuda_context_and_fragmentation(plan_14b, capsys):
    """Audit B6: a budget the floor fits with less than the default headroom to spare does not
    fit (1 GiB + 5% of the card are kept free), unless --headroom says otherwise."""
    low = plan_14b.breakdown(floor(plan_14b)).total / GIB
    budget = low + 1.0  # 1 GiB over the floor: less than the default 1 GiB + 5%
    args = ["plan", str(RECIPE_14B), "--gpu-memory", f"{budget:.3f}"]
    assert main(args) == 1
    kept = 1.0 + 0.05 * float(f"{budget:.3f}")
    assert f"GiB usable: {kept:.1f} GiB kept for the CUDA context, kernel workspaces and fragmentation" in capsys.readouterr().out
    assert main([*args, "--headroom", "0.5"]) == 0
    assert "fits in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main([*args, "--headroom", "-1"])
    assert done.value.code == 2


def test_context_parallelism_divides_one_clip_s_activations(plan_14b):
    """A rank of a group of 4 holds a quarter of the tokens: what the blocks keep and the working set
    shrink about 4x, the weights and optimizer state not at all; the all-to-all copies and the
    gathered output come on top; the FLOPs per GPU are a quarter."""
    base = Setup(True, False, None, 3, 8, True, 4, True)
    one, four = plan_14b.breakdown(base), plan_14b.breakdown(replace(base, cp=4))
    a1, a4 = rows(one, "activations"), rows(four, "activations")
    assert a4["kept for backward"] == pytest.approx(a1["kept for backward"] / 4, rel=0.02)
    assert a4["backward working set"] == pytest.approx(a1["backward working set"] / 4, rel=0.05)
    assert rows(four, "trainable") == rows(one, "trainable") and rows(four, "base weights") == rows(one, "base weights")
    extra = rows(four, "ctx. parallel")
    q_bytes = 32_760 // 4 * 5120 * 2  # one rank's q in bf16
    assert extra == {"all-to-all copies": 9 * q_bytes, "whole output, gathered": 3 * 32_760 * 64 * 4}
    assert not rows(one, "ctx. parallel")
    assert plan_14b.flops(4) == pytest.approx(plan_14b.flops() / 4)
    assert "train.context_parallel=4" in replace(base, cp=4).overrides() and "context_parallel" not in base.overrides()
    # Ring attention: the same share of the tokens; the whole clip's keys and values come on top instead.
    ring = MemoryPlan(load_recipe(RECIPE_14B, ["train.context_parallel_kind=ring"]))
    r4 = ring.breakdown(replace(base, cp=4))
    assert rows(r4, "activations") == a4
    assert rows(r4, "ctx. parallel") == {"whole clip's K and V": 2 * 32_760 * 5120 * 2,
                                         "fp32 ring gradients": 5 * 32_760 // 4 * 5120 * 4,
                                         "whole output, gathered": 3 * 32_760 * 64 * 4}
    assert ring.cp_degrees(12) == [2, 3, 4, 6, 12]  # no heads to divide: 32,760 = 2^3 x 3^2 x 5 x 7 x 13


def test_the_14b_full_fine_tune_at_720p_fits_eight_80gb_gpus_with_context_parallelism(capsys):
    """The shipped recipe (train.context_parallel=2, which the plan takes when --cp is not given):
    under ZeRO-3 alone it would need activation offload (29 GiB of pinned host RAM per GPU); two
    GPUs per clip fit with checkpointing alone and nothing on the host."""
    args = ["plan", str(ROOT / "recipes" / "wan2.1-t2v-14b-720p-cp-full.yaml"), "--gpu-memory", "80", "--gpus", "8",
            "--zero", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 GPUs, ZeRO-3, context parallel 2, Ulysses (4 clips at a time)" in out
    assert "train.activation_offload=false" in out and "train.context_parallel=2" in out
    assert "launch/accelerate/zero3.yaml --num_processes 8" in out
    assert main([*args, "--cp", "1"]) == 0
    assert "train.activation_offload=true" in capsys.readouterr().out
    assert main([*args, "--cp", "3"]) == 2
    err = capsys.readouterr().err
    assert "--cp 3 must divide --gpus (8), the 40 attention heads (Ulysses) and the clip's 75,600 tokens; degrees that do: 2, 4, 8" in err
    assert main([str(a) for a in ["plan", TINY, "--cpu", "--cp", "2"]]) == 2
    assert "context parallelism needs several" in capsys.readouterr().err


# --- command line -------------------------------------------------------------------------------


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--gpu-memory", "--gpus", "--zero", "--cp", "--cpu", "--headroom", "cheapest settings"):
        assert option in out


def test_exit_status(plan_14b, capsys):
    assert main(["plan", str(RECIPE_14B), "--gpu-memory", "80"]) == 0  # the fixture's counts serve
    out = capsys.readouterr().out
    assert "fits in 80 GiB" in out and "train.gradient_checkpointing=true train.fp8_base=false" in out
    assert "TFLOP of matmuls" in out and "kept for backward" in out
    assert main(["plan", str(RECIPE_14B)]) == 0  # no budget: the table only
    assert main(["plan", str(TINY), "train.lr=-1"]) == 2  # recipe errors, from `check`'s loader
    assert "train.lr" in capsys.readouterr().err
    assert main(["plan", str(TINY), "--cpu", "--gpus", "2"]) == 2
    with pytest.raises(SystemExit) as done:
        main(["plan", str(TINY), "--gpu-memory", "-3"])
    assert done.value.code == 2


# --- measured CPU peaks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured():
    """{(variant, latent): measure(...)}: one child process per model, both settings (computed on first use)."""
    cache = {}

    def get(variant: str, latent: tuple[int, int, int]) -> dict:
        if (variant, latent) not in cache:
            cache[variant, latent] = measure(variant, latent)
        return cache[variant, latent]

    return get


def _predicted(variant: str, latent: tuple[int, int, int], phase: str) -> float:
    r = probe_recipe(variant, latent, phase)
    return MemoryPlan(r, "cpu").breakdown(Setup.of(r)).total


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_cpu_prediction_matches_measured_peak_tiny(phase, measured):
    predicted, got = _predicted("tiny", (9, 64, 96), phase), measured("tiny", (9, 64, 96))["steps"][phase]
    print(f"tiny, latent 9x64x96, {phase}: predicted {predicted / 2**20:.1f} MiB, measured {got / 2**20:.1f} MiB")
    assert got == pytest.approx(predicted, rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_cpu_prediction_matches_measured_peak_1_3b(phase, measured):
    """The real 1.3B architecture (random weights, written once like bench/common.py does) at a
    1x32x32 latent: 256 tokens, ~5.4 GiB of fp32 weights, ~1.5 GiB of activations without checkpointing."""
    latent = (1, 32, 32)
    predicted, got = _predicted("wan2.1-t2v-1.3b", latent, phase), measured("wan2.1-t2v-1.3b", latent)["steps"][phase]
    print(f"wan2.1-t2v-1.3b, latent 1x32x32, {phase}: predicted {predicted / GIB:.2f} GiB, measured {got / GIB:.2f} GiB")
    assert got == pytest.approx(predicted, rel=0.15)


@pytest.mark.slow
def test_per_block_extension_equals_the_whole_1_3b():
    """The plan's 2-block extension against the whole 30-block model on the meta device, in the
    GPU's dtypes (bf16 base, bf16 autocast) at 480x832x81."""
    plan = MemoryPlan(load_recipe(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml"))
    for ckpt in (False, True):
        recipe = replace(plan.recipe, train=replace(plan.recipe.train, gradient_checkpointing=ckpt))
        whole = count_step(recipe, plan.variant, plan.shape.batch_shapes(), plan.load_dtype, plan.autocast, layers=30, cuda=True)
        assert plan.count(ckpt, False) == whole, ckpt
        # token routing over blocks 2..-2 (27 of 30) at 0.5: the plan's count against the whole routed model
        routed = MemoryPlan(load_recipe(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml", ["train.route_ratio=0.5"]))
        whole = count_step(recipe, plan.variant, plan.shape.batch_shapes(), plan.load_dtype, plan.autocast, layers=30,
                           cuda=True, routes=((0.5, 2, 28),))
        count = routed.count(ckpt, False)
        assert count.saved == pytest.approx(whole.saved, rel=1e-3) and count.peak == pytest.approx(whole.peak, rel=1e-3)


def test_a_render_holds_the_untrained_expert_and_the_plan_counts_it():
    """Audit B3: a one-expert A14B run renders validation with the other expert on the GPU (from
    host memory, for the round): the peak is the larger of the step's activations and that expert;
    block offload streams it (its non-block weights and 3 blocks); without validation nothing."""
    a14b = ROOT / "recipes" / "wan2.2-t2v-a14b-lora.yaml"
    one = MemoryPlan(load_recipe(a14b, ["model.experts=[low_noise]"]))
    s = Setup(True, True)
    b = one.breakdown(s)
    render = rows(b, "validation")["untrained expert (renders)"]
    count = one.count(True, True)
    assert render == sum(count.frozen.values())  # the other expert, stored as this one is (fp8)
    resident = sum(n for sec, _, n in b.rows if sec not in ("activations", "optimizer", "validation"))
    assert b.total == resident + max(sum(rows(b, "activations").values()), rows(b, "optimizer")["AdamW step temporaries"], render)
    streamed = one.breakdown(replace(s, offload_keep=0))
    assert rows(streamed, "validation")["untrained expert (renders)"] == pytest.approx(
        render - (40 - 3) * sum(count.block_frozen.values()))
    assert not rows(MemoryPlan(load_recipe(a14b, ["model.experts=[low_noise]", "validation.every=0"])).breakdown(s), "validation")
    assert not rows(MemoryPlan(load_recipe(a14b)).breakdown(s), "validation")  # both trained: both are live


@pytest.mark.parametrize("ckpt", ["true", "false"])
def test_animate_face_adapters_and_encoders_are_counted(ckpt):
    """Wan2.2-Animate: the plan's 4-block model with face adapters after blocks 0 and 2, extended to 15
    blocks with one after every 5th, against the whole 15-block model counted (its face video as 8-bit
    frames, its motion encoder, its pose latents and the reference's extra latent frame in the batch);
    and the meta count of an Animate step equals a real CPU step's."""
    recipe = load_recipe(TINY, ["model.variant=tiny-animate", f"train.gradient_checkpointing={ckpt}", "train.batch_size=1"])
    plan = MemoryPlan(recipe, "gpu")
    assert plan.shape.latent[1] == 4 and plan.shape.extras["face"] == (3, 9, 512, 512)  # 3 latent frames + the reference
    variant = replace(plan.variant, transformer={**plan.variant.transformer, "inject_face_latents_blocks": 5})
    args = (variant, plan.shape.batch_shapes(), plan.load_dtype, plan.autocast)
    predicted = count_step(recipe, *args, cuda=True, layers=4).extend(15)
    whole = count_step(recipe, *args, cuda=True, layers=15, face_every=None)
    assert predicted.adapters == 3 and predicted.frozen == whole.frozen and predicted.trainable == whole.trainable
    assert predicted.saved == pytest.approx(whole.saved, rel=0.002)
    assert predicted.peak == pytest.approx(whole.peak, rel=0.02)
    assert predicted.adapter.block_saved > 0
    # the tiny itself (2 blocks, an adapter after each): the plan's count shrunk to it, against it whole
    tiny = count_step(recipe, plan.variant, *args[1:], cuda=True, layers=2, face_every=None)
    assert plan.count(ckpt == "true", False).saved == pytest.approx(tiny.saved, rel=0.002)
    real = count_step(recipe, plan.variant, plan.shape.batch_shapes(), torch.float32, None, device="cpu")
    assert real == count_step(recipe, plan.variant, plan.shape.batch_shapes(), torch.float32, None)


def test_animate_plan_counts_the_motion_encoder_and_fits_the_14b(capsys):
    """`wan-tune plan` for the Animate 14B recipe: the reference's latent frame in the tokens, the motion
    encoder's convolutions over every face frame in the FLOPs (forward only: frozen, fed no gradient),
    and the checkpointed face adapters keeping their inputs only."""
    from wan_tune.models.variants import transformer_class
    from wan_tune.plan.flops import motion_encoder_flops, step_flops

    recipe_path = ROOT / "recipes" / "wan2.2-animate-14b-lora.yaml"
    plan = MemoryPlan(load_recipe(recipe_path))
    assert plan.shape.tokens == 21 * 30 * 52 and plan.shape.extras["face"] == (3, 77, 512, 512)
    with torch.device("meta"):
        model = transformer_class(plan.variant)(**plan.variant.transformer)
    per_frame = motion_encoder_flops(model)
    assert 1e10 < per_frame < 1e11  # tens of GFLOP per 512 px face frame
    without = step_flops(model, plan.shape.tokens, False, plan.shape.text_tokens)
    assert plan.flops() == pytest.approx(without + 77 * per_frame, rel=1e-9)
    count = plan.count(True, False)
    assert count.adapters == 8 and count.adapter.block_saved == count.block_saved  # an input each, as a block
    assert main(["plan", str(recipe_path), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "face video 77 x 512x512 px" in out and "fits in 80 GiB" in out
