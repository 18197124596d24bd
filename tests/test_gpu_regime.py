"""The GPU's precision regime on a CPU (#32): bf16 base weights, bf16 autocast, CUDA's fp32 autocast
ops emulated (models/precision.py), through every setting a GPU run can take: what the fp32 suite
never saw (LoRA renders outside autocast, ring attention fed fp32 q/k, FSDP2's input casts, FSDP2's
mixed precision settled by a base render) runs here, and would fail here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from launching import launch, rank_digests

from wan_tune.config import load_recipe
from wan_tune.models.precision import as_inference, cuda_autocast_emulated

ROOT = Path(__file__).resolve().parents[1]
REGIME = ("model.dtype=bf16", "train.mixed_precision=bf16")
EVERY_STEP = ("validation.every=1", "validation.steps=2", "validation.frames=9", "data.holdout=0", "train.batch_size=1",
              "train.steps=2", "checkpoint.every=2", "data.num_workers=0")


def bf16_lora(*extra: str):
    """The tiny transformer as the trainer makes it in the GPU regime (random weights, LoRA B != 0)."""
    from diffusers import WanTransformer3DModel

    from wan_tune.models.loading import load_dtypes
    from wan_tune.models.variants import get_variant
    from wan_tune.training.model_setup import adapt

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*REGIME, *extra])
    variant = get_variant("tiny")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**variant.transformer)
    dtypes = load_dtypes(model, torch.bfloat16)  # as from_pretrained(torch_dtype=bf16) loads it
    for name, p in model.named_parameters():
        p.data = p.data.to(dtypes[name])
    model = adapt(model, recipe, variant, torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model.eval()


def bf16_inputs():
    from conftest import transformer_inputs

    return {k: v if k == "timestep" else v.to(torch.bfloat16) for k, v in transformer_inputs("tiny").items()}


# --- the premises, on a CPU -----------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-base", "fp8-base"])
def test_a_bf16_lora_outside_autocast_is_read_as_inference_reads_it(fp8):
    """Audit A1. Training switches peft's input cast off (train.lora_fp32_inputs=false) and fp8
    storage always does (diffusers wraps each LoRA layer in peft's disable_input_dtype_casting): a
    forward without autocast then meets fp32 LoRA weights with a bf16 input. Renders read the
    weights as inference does instead: the base in bf16, each LoRA's input cast to its weights."""
    model = bf16_lora(f"train.fp8_base={'true' if fp8 else 'false'}")
    inputs = bf16_inputs()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="same dtype"):
            model(**inputs)
        with as_inference([model], lora=True, device_type="cpu", autocast=torch.bfloat16):
            rendered = model(**inputs)[0]
        # peft's own inference path: the same cast, done by peft (what diffusers runs a LoRA with).
        from wan_tune.models.precision import set_lora_input_casting

        set_lora_input_casting(model, True)
        if not fp8:  # under layerwise casting diffusers switches peft's cast off again in each forward
            torch.testing.assert_close(rendered, model(**inputs)[0], rtol=0, atol=0)
    assert rendered.dtype == torch.bfloat16 and torch.isfinite(rendered).all()
    # The LoRA took part: switched off, the output is another one.
    from wan_tune.training.validation import adapters_off

    with torch.no_grad(), adapters_off([model]), as_inference([model], True, "cpu", torch.bfloat16):
        assert not torch.equal(model(**inputs)[0], rendered)


def test_cuda_autocast_emulation_hands_attention_fp32_q_and_k_as_a_gpu_does():
    """Audit A2/B2's premise: CUDA autocast runs rms_norm in fp32 (its fp32 list), CPU autocast in
    bf16. Emulated, Wan's q/k norms return fp32 on the CPU as on a GPU, in the backward's recompute
    too, and torch's CPU flash kernel refuses fp32 q/k beside a bf16 v as CUDA's flash backward does."""
    model = bf16_lora("train.gradient_checkpointing=true").train()
    seen = []
    model.blocks[0].attn1.norm_q.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    inputs = bf16_inputs()
    with torch.autocast("cpu", torch.bfloat16):
        model(**inputs)[0].float().mean().backward()
    assert seen == [torch.bfloat16, torch.bfloat16]  # the forward, and the checkpoint's recompute
    seen.clear()
    with cuda_autocast_emulated(), torch.autocast("cpu", torch.bfloat16):
        model(**inputs)[0].float().mean().backward()
        q = torch.nn.RMSNorm(128, dtype=torch.bfloat16)(torch.randn(1, 2, 8, 128, dtype=torch.bfloat16))
        v = torch.nn.Linear(128, 128, dtype=torch.bfloat16)(torch.randn(1, 2, 8, 128, dtype=torch.bfloat16))
    assert seen == [torch.float32, torch.float32]
    assert q.dtype == torch.float32 and v.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="expected scalar type"):
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, v, 0.0, False)
    from wan_tune.parallel.cp_attention import one_dtype

    with torch.autocast("cpu", torch.bfloat16):  # what every context-parallel call now hands its kernel
        assert {t.dtype for t in one_dtype(q, q, v)} == {torch.bfloat16}
    assert {t.dtype for t in one_dtype(q, q, q)} == {torch.float32}  # no autocast: v's dtype
    with torch.autocast("cpu", torch.bfloat16):  # and the emulation is gone outside its context
        assert torch.nn.RMSNorm(128, dtype=torch.bfloat16)(v).dtype == torch.bfloat16


def test_the_emulation_follows_the_installed_torchs_cuda_list(monkeypatch):
    """CUDA's fp32 list grows between releases: torch 2.11 on an H200 returned bf16 from Wan's q/k
    norms under bf16 autocast (tests/test_gpu.py, 2026-12-04), 2.13 returns fp32. The emulation
    registers only the ops this torch's CUDA autocast has a kernel for."""
    from wan_tune.models import precision

    assert precision.on_cuda_fp32_list("layer_norm.default") and not precision.on_cuda_fp32_list("relu.default")
    monkeypatch.setattr(precision, "on_cuda_fp32_list", lambda name: name != "rms_norm.default")  # torch 2.11's
    x = torch.randn(1, 2, 8, 128, dtype=torch.bfloat16)
    with cuda_autocast_emulated(), torch.autocast("cpu", torch.bfloat16):
        assert torch.nn.RMSNorm(128, dtype=torch.bfloat16)(x).dtype == torch.bfloat16
        assert torch.nn.LayerNorm(128, dtype=torch.bfloat16)(x).dtype == torch.float32


# --- every setting through train -> validation -> export, in-process ------------------------------


@pytest.fixture(scope="module")
def regime_data(tiny_folders, tiny_shards, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """{variant: (model folder, shards, footage)}: the tiny T2V / I2V ones, and FLF2V, TI2V (with
    images), A14B and VACE prepped here (2 clips each). Validation of image-conditioned variants
    reads the first frames from the footage."""
    from data_prep.prep import run_prep
    from wan_tune.media.synthetic import make_clips
    from wan_tune.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("regime")
    data = {v: (tiny_folders[v], tiny_shards[v], tiny_shards[v].parent / "clips") for v in ("tiny", "tiny-i2v")}
    for v in ("tiny-flf2v", "tiny-ti2v", "tiny-a14b", "tiny-vace", "tiny-animate"):
        folder = save_tiny_pipeline(root / v, v, seed=0)
        clips = make_clips(root / f"clips-{v}", 2, frames=20, height=96, width=128, fps=24 if v == "tiny-ti2v" else 16,
                           vace=v == "tiny-vace", animate=v == "tiny-animate")[0].parent
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.variant={v}", f"model.path={folder}", f"data.source={clips}", f"data.shards={root / f'shards-{v}'}",
            "data.shard_dtype=fp32", "data.max_clips_per_video=1", *(["data.task=i2v"] if v == "tiny-ti2v" else [])])
        run_prep(recipe, progress=False, say=lambda *_: None)
        data[v] = (folder, root / f"shards-{v}", clips)
    # the tiny clips as two sources, the second one's target the base model's prediction (role: preserve)
    folder, _, clips = data["tiny"]
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={folder}", *preserve_sources(clips), f"data.shards={root / 'shards-preserve'}",
        "data.shard_dtype=fp32", "data.max_clips_per_video=1"])
    run_prep(recipe, progress=False, say=lambda *_: None)
    data["tiny-preserve"] = (folder, root / "shards-preserve", clips)
    return data


def preserve_sources(clips: Path) -> tuple[str, str]:
    return ("data.source=null", f"data.sources=[{{path: '{clips}', name: brand, weight: 1}}, "
                                f"{{path: '{clips}', name: prior, role: preserve, weight: 3}}]")


CKPT = ("train.gradient_checkpointing=true",)
CASES = {
    "lora": ("tiny", ()),
    "full": ("tiny", ("adapter.method=full",)),
    "i2v": ("tiny-i2v", ()),
    "flf2v": ("tiny-flf2v", ()),
    "ti2v-5b": ("tiny-ti2v", ("data.task=i2v",)),
    "a14b-both-experts": ("tiny-a14b", ()),
    "a14b-one-expert": ("tiny-a14b", ("model.experts=[low_noise]",)),
    "a14b-one-expert-fp8": ("tiny-a14b", ("model.experts=[low_noise]", "train.fp8_base=true")),
    "a14b-one-expert-offload": ("tiny-a14b", ("model.experts=[low_noise]", *CKPT, "train.offload=blocks",
                                              "train.offload_keep=0")),
    "vace": ("tiny-vace", ()),
    "activation-offload": ("tiny", (*CKPT, "train.activation_offload=true")),
    "ffn-chunks": ("tiny", (*CKPT, "train.ffn_chunks=2")),
    "attention-checkpoints": ("tiny", (*CKPT, "train.attention_checkpointing=true")),
    "block-offload": ("tiny", (*CKPT, "train.offload=blocks", "train.offload_keep=1")),
    "fp8-base": ("tiny", ("train.fp8_base=true",)),
    "no-autocast": ("tiny", ("train.mixed_precision=no",)),
    "fp8-no-autocast": ("tiny", ("train.fp8_base=true", "train.mixed_precision=no")),
    # #35: the adapter methods and the averaged weights render and export in the regime too.
    "loha": ("tiny", ("adapter.method=loha", "adapter.rank=4")),
    "lokr-fp8": ("tiny", ("adapter.method=lokr", "adapter.rank=4", "train.fp8_base=true")),
    "dora": ("tiny", ("adapter.method=dora",)),
    "ema": ("tiny", ("train.ema_decay=0.5",)),
    "schedule-free": ("tiny", ("train.optimizer=schedulefree_adamw",)),
    # #36/#37: the base model's prediction under the step's autocast (adapters off, bf16 weights), a
    # resolution-dependent shift, and token routing's bf16 rotary tables and index copies.
    "preserve": ("tiny-preserve", ("train.preserve_weight=0.5", "timesteps.shift=auto")),
    "routed": ("tiny", (*CKPT, "train.route_ratio=0.5", "train.route_start=0", "train.route_end=1")),
    "routes-fp8": ("tiny", ("train.fp8_base=true",
                            "train.routes=[{ratio: 0.5, start: 0, end: 0}, {ratio: 0.25, start: 1, end: 1}]")),
    # #38: Wan2.2-Animate with LoRAs on its face adapters (checkpointed with the blocks), renders of a
    # clip's pose and face; and with the memory settings a 14B needs on one GPU.
    "animate": ("tiny-animate", (*CKPT, "adapter.targets=[attention,ffn,face_adapters]", "animate.drop_face=0.5")),
    "animate-offload-fp8": ("tiny-animate", (*CKPT, "train.fp8_base=true", "train.activation_offload=true",
                                             "train.ffn_chunks=2", "train.offload=blocks", "train.offload_keep=0")),
}


@pytest.mark.parametrize("case", CASES)
def test_each_setting_trains_renders_every_step_and_exports_in_the_gpu_regime(case, regime_data, tmp_path):
    from wan_tune.export.run import export
    from wan_tune.training.loop import train

    variant, extra = CASES[case]
    folder, shards, clips = regime_data[variant]
    sources = preserve_sources(clips) if variant == "tiny-preserve" else (f"data.source={clips}",)
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.variant={variant.replace('-preserve', '')}", f"model.path={folder}", f"data.shards={shards}", *sources,
        f"run.output_dir={tmp_path}",
        *REGIME, *EVERY_STEP, *extra], warn=lambda _: None)
    said = []
    with cuda_autocast_emulated():
        summary = train(recipe, progress=False, say=said.append)
        checks = export(summary["checkpoint"], out=tmp_path / "export", say=lambda *_: None)
    start = next(line for line in said if line.startswith("training "))
    base = "fp32 (master weights)" if "adapter.method=full" in extra else "bf16"
    autocast = "no autocast" if "train.mixed_precision=no" in extra else "autocast bf16"
    assert f"base {base}, {autocast}" in start and ("fp8 storage" in start) == ("train.fp8_base=true" in extra)
    assert "CUDA's fp32 autocast ops emulated" in start
    run = Path(summary["run_dir"])
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if variant == "tiny-preserve":  # a preserve sample was drawn: the base forward ran in the regime
        records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert records[-1]["drawn/prior"] > 0 and all("shift" in r for r in records)
    for step in (1, 2):  # a render every step, each with its contact sheet (base above step)
        assert (run / "validation" / f"step-{step:06d}" / "00.mp4").is_file()
        assert (run / "validation" / f"step-{step:06d}" / "00.png").is_file()
    assert checks and all(c.ok for c in checks), checks


# --- several processes: DDP, FSDP2 (its bf16 policy), ZeRO-2/3, Ulysses and ring -----------------


def probe_launch(config: str, tiny_folders, tiny_shards, out: Path, *extra: str):
    """`launch` with CUDA's fp32 autocast ops emulated in every process, and the dtype probe:
    tests/regime_probe.py runs the trainer with hooks that print what the time embedder and block 0's
    attention receive. `tiny_folders` / `tiny_shards`: {variant: path} (one entry: that variant)."""
    env = {"WAN_TUNE_CUDA_AUTOCAST": "1"}
    variant = next(iter(tiny_folders)) if len(tiny_folders) == 1 else "tiny"
    return launch(config, tiny_folders, tiny_shards, out, *REGIME, *EVERY_STEP, *extra, env=env, module="regime_probe",
                  variant=variant)


def probed(stdout: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"\[probe\] (\{[^{}]*\})", stdout)]  # ranks share one pipe


LAUNCHES = {
    "ddp": ("multi_cpu.yaml", ()),
    "fsdp2-lora": ("fsdp2_cpu.yaml", ()),
    "fsdp2-full": ("fsdp2_cpu.yaml", ("adapter.method=full",)),
    "zero2": ("zero2_cpu.yaml", ()),
    "zero3": ("zero3_cpu.yaml", ()),
    "ulysses": ("multi_cpu.yaml", ("train.context_parallel=2",)),
    "ring": ("multi_cpu.yaml", ("train.context_parallel=2", "train.context_parallel_kind=ring", *CKPT)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAUNCHES)
def test_each_launch_trains_and_renders_every_step_in_the_gpu_regime(name, tiny_folders, tiny_shards, tmp_path):
    """Audit A2 (ring: fp32 q/k into the flash kernel) and A3 (FSDP2 casting the timestep and the
    RoPE tables to bf16) fail here without their fixes; the probe says what each module received."""
    config, extra = LAUNCHES[name]
    proc = probe_launch(config, tiny_folders, tiny_shards, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "base bf16, autocast bf16" in proc.stdout or "fp32 (master weights), autocast bf16" in proc.stdout
    assert "CUDA's fp32 autocast ops emulated" in proc.stdout
    digests = rank_digests(proc.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    run = tmp_path / "demo-tiny"
    assert sorted(p.parent.name for p in (run / "validation").glob("step-*/00.mp4")) == ["step-000001", "step-000002"]
    seen = probed(proc.stdout)
    assert {r["rank"] for r in seen} == {0, 1}
    for r in seen:
        # diffusers' inference feeds fp32 timesteps and RoPE tables: so must training, every launch.
        assert r["timestep"] == "torch.float32" and r["rope"] == ["torch.float32", "torch.float32"], r
        if name.startswith("fsdp2"):  # gradients reduce in fp32, as DDP's do
            assert r["reduce_dtype"] == "torch.float32" and r["param_dtype"] == "torch.bfloat16", r


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "zero3_cpu.yaml", "fsdp2_cpu.yaml"])
def test_animate_trains_alike_on_every_rank_in_the_gpu_regime(config, regime_data, tmp_path):
    """Wan2.2-Animate under DDP, ZeRO-3 (each layer's weights gathered around its forward, the face
    adapters' recompute in the backward too) and FSDP2: LoRAs on the blocks and the face adapters,
    gradient checkpointing, a render of a clip's pose and face every step; the ranks end with the same
    weights."""
    folder, shards, clips = regime_data["tiny-animate"]
    proc = probe_launch(config, {"tiny-animate": folder}, {"tiny-animate": shards}, tmp_path, f"data.source={clips}",
                        *CKPT, "adapter.targets=[attention,ffn,face_adapters]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = rank_digests(proc.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    renders = sorted(p.parent.name for p in (tmp_path / "demo-tiny" / "validation").glob("step-*/00.png"))
    assert renders == ["step-000001", "step-000002"]


def test_ranks_outwait_a_long_render():
    """Audit B4: under DDP only rank 0 renders, the others wait in their next collective; NCCL's
    default 10 minutes would kill a run whose render takes longer. Both backends get 2 hours."""
    from datetime import timedelta

    from wan_tune.training.launch import process_group_kwargs

    gpu, cpu = process_group_kwargs(cpu=False), process_group_kwargs(cpu=True)
    assert (gpu.backend, cpu.backend) == ("nccl", "gloo")
    assert gpu.timeout == cpu.timeout and gpu.timeout >= timedelta(hours=2)


@pytest.mark.parametrize("setting", ["train.activation_offload=true", "train.attention_checkpointing=true"])
def test_every_block_s_lora_gets_its_gradient_from_wan_tune_s_checkpoint_under_bf16_autocast(setting):
    """Audit B8 on a CPU: with bf16 autocast (CUDA's fp32 ops emulated) in the forward and the
    backward outside it, as the trainer runs them, wan-tune's block checkpoint (its forward without
    grad, so autocast's cast cache must not serve the recompute) gives every block's LoRA the
    gradients torch's checkpoint gives, none of them zero."""
    inputs = bf16_inputs()

    def grads(*extra):
        model = bf16_lora("train.gradient_checkpointing=true", *extra).train()
        with cuda_autocast_emulated():
            with torch.autocast("cpu", torch.bfloat16):
                out = model(**inputs)[0]
            out.float().square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reference, got = grads(), grads(setting)
    assert got.keys() == reference.keys() and {n.split(".")[1] for n in got} == {"0", "1"}  # both blocks
    for name, g in got.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, reference[name], rtol=0, atol=0)
