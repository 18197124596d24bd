"""`pytest -m gpu`: the audit's minimal GPU checks (../shared/audits/gpu-paths-2026-12-04.md), as
tests that a machine with CUDA runs and every other machine skips. Under 5 minutes on one H100/H200:
tiny models only. What each proves is in its docstring; the CPU suite emulates what it can of each
(tests/test_gpu_regime.py), these show the real thing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REGIME = ("model.dtype=bf16", "train.mixed_precision=bf16")


def tiny_bf16_lora(*extra: str):
    from test_gpu_regime import bf16_lora

    return bf16_lora(*extra).cuda()


def test_a1_a_bf16_lora_renders_outside_autocast_on_cuda():
    """A1: the forward without autocast that renders run: peft's input cast off meets fp32 LoRA
    weights with bf16 activations on CUDA too; as_inference reads them as diffusers does."""
    from test_gpu_regime import bf16_inputs

    from wan_tune.models.precision import as_inference

    model = tiny_bf16_lora()
    inputs = {k: v.cuda() for k, v in bf16_inputs().items()}
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(**inputs)
        with as_inference([model], lora=True, device_type="cuda", autocast=torch.bfloat16):
            out = model(**inputs)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_a2_cuda_autocast_hands_attention_fp32_q_k_and_the_cpu_emulation_agrees():
    """A2/B2's premise: under CUDA autocast Wan's q/k RMS norms return fp32 where this torch has
    rms_norm on CUDA's fp32 list (after 2.11: torch 2.11 on an H200 returned bf16); torch's flash
    backward refuses fp32 q/k beside a bf16 v; one_dtype makes them one dtype. The CPU emulation
    (models/precision.py) gives the same dtypes as CUDA for the same module."""
    from wan_tune.models.precision import cuda_autocast_emulated, on_cuda_fp32_list
    from wan_tune.parallel.cp_attention import one_dtype

    norm = torch.nn.RMSNorm(128, dtype=torch.bfloat16)
    x = torch.randn(1, 64, 8, 128, dtype=torch.bfloat16)
    with torch.autocast("cuda", torch.bfloat16):
        q = norm.cuda()(x.cuda())
    with cuda_autocast_emulated(), torch.autocast("cpu", torch.bfloat16):
        emulated = norm.cpu()(x)
    assert q.dtype == emulated.dtype == (torch.float32 if on_cuda_fp32_list("rms_norm.default") else torch.bfloat16)
    q = q.detach().float().transpose(1, 2).contiguous().requires_grad_()  # fp32 q/k, as a newer torch hands them
    v = torch.randn_like(q, dtype=torch.bfloat16).requires_grad_()
    out = torch.randn_like(v)
    lse = torch.zeros(1, 8, 64, device="cuda")
    with pytest.raises(RuntimeError, match="(?i)fp16|bf16|dtype"):
        torch.ops.aten._scaled_dot_product_flash_attention_backward(
            out, q.detach(), q.detach(), v.detach(), out, lse, None, None, 64, 64, 0.0, False,
            torch.empty(2, dtype=torch.uint64, device="cuda"), torch.empty(0, device="cuda"))
    with torch.autocast("cuda", torch.bfloat16):
        qq, kk, vv = one_dtype(q, q, v)
    assert {qq.dtype, kk.dtype, vv.dtype} == {torch.bfloat16}
    torch.nn.functional.scaled_dot_product_attention(qq, kk, vv).float().sum().backward()


def _tiny_data(tmp_path: Path, variant: str = "tiny") -> tuple[Path, Path, Path]:
    from data_prep.prep import run_prep
    from wan_tune.config import load_recipe
    from wan_tune.media.synthetic import make_clips
    from wan_tune.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / variant, variant, seed=0)
    clips = make_clips(tmp_path / "clips", 2, frames=20, height=96, width=128, fps=16, animate=variant == "tiny-animate")[0].parent
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.variant={variant}", f"model.path={folder}", f"data.source={clips}", f"data.shards={tmp_path / 'shards'}",
        "data.max_clips_per_video=1"])
    run_prep(recipe, progress=False, say=lambda *_: None)
    return folder, tmp_path / "shards", clips


def _train(tmp_path: Path, config: str, *extra: str, module: str = "wan_tune.train", variant: str = "tiny") -> subprocess.CompletedProcess:
    folder, shards, clips = _tiny_data(tmp_path, variant)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate" / config),
           "--num_processes", "1", "-m", module, str(ROOT / "recipes" / "demo-tiny.yaml"), f"model.variant={variant}",
           f"model.path={folder}", f"data.source={clips}",
           f"data.shards={shards}", f"run.output_dir={tmp_path / 'runs'}", "data.num_workers=0", "data.holdout=0",
           "train.batch_size=1", "train.steps=2", "validation.every=1", "validation.steps=2", *REGIME, *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_a1_one_gpu_lora_run_renders_every_step(tmp_path):
    """A1 end to end: `train` on one GPU, bf16 base under bf16 autocast, validation every step."""
    proc = _train(tmp_path, "single_gpu.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "base bf16, autocast bf16" in proc.stdout
    assert len(list((tmp_path / "runs" / "demo-tiny" / "validation").glob("step-*/00.mp4"))) == 2
    steps = [json.loads(line) for line in (tmp_path / "runs" / "demo-tiny" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_mem_gb"] for r in steps if "peak_mem_gb" in r]
    assert peaks and all(0 < p <= r for p, r in zip(peaks, [r["peak_reserved_gb"] for r in steps if "peak_mem_gb" in r]))


def test_animate_lora_with_face_adapters_renders_every_step(tmp_path):
    """Wan2.2-Animate (#38) on one GPU: LoRAs on the blocks and face adapters, both checkpointed, the
    motion encoder's fp32 QR under bf16 autocast, a render of a clip's pose and face every step."""
    proc = _train(tmp_path, "single_gpu.yaml", "train.gradient_checkpointing=true",
                  "adapter.targets=[attention,ffn,face_adapters]", variant="tiny-animate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "runs" / "demo-tiny" / "validation").glob("step-*/00.png"))) == 2


def test_a3_fsdp2_feeds_wan_fp32_timesteps_and_rope_tables(tmp_path):
    """A3: accelerate's FSDP2 policy would cast the timestep and the RoPE tables to bf16; the
    probe (tests/regime_probe.py) reads what the time embedder and block 0 receive."""
    proc = _train(tmp_path, "fsdp2.yaml", module="regime_probe")
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads(m) for m in re.findall(r"\[probe\] (\{[^{}]*\})", proc.stdout)]
    assert seen and seen[0]["timestep"] == "torch.float32" and seen[0]["rope"] == ["torch.float32"] * 2, seen
    assert seen[0]["reduce_dtype"] == "torch.float32"


def test_b8_checkpointed_blocks_give_every_lora_its_gradient_under_cuda_autocast():
    """B8: under bf16 autocast on CUDA, every block's LoRA gradients from wan-tune's block
    checkpoint (activation offload, attention checkpoints) equal torch's checkpoint's and are not zero."""
    from test_gpu_regime import bf16_inputs

    from wan_tune.memory.activation_offload import ActivationOffload, BlockCheckpoint

    inputs = {k: v.cuda() for k, v in bf16_inputs().items()}

    def grads(make_checkpoint):
        model = tiny_bf16_lora("train.gradient_checkpointing=true").train()
        if make_checkpoint is not None:
            model.enable_gradient_checkpointing(make_checkpoint(model))
        with torch.autocast("cuda", torch.bfloat16):
            out = model(**inputs)[0]
        out.float().square().mean().backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    reference = grads(None)
    for make in (ActivationOffload, BlockCheckpoint):
        got = grads(make)
        for name, g in got.items():
            assert g.abs().sum() > 0, (make.__name__, name)
            torch.testing.assert_close(g, reference[name], rtol=2e-2, atol=1e-3)


def test_b1_pinned_host_memory_is_what_the_plan_counts():
    """B1: torch's pinned allocator rounds each allocation up to a power of two; activation
    offload's buffers come from a HostArena of power-of-two slabs instead. What is pinned for 40
    real-length block inputs (tiny width) equals the arena's slabs, which the plan counts
    (packed_bytes), and stays within 7% of the payload (one pinned tensor each: 8 MiB for 6)."""
    from wan_tune.memory.activation_offload import HostStash
    from wan_tune.memory.host_arena import packed_bytes

    stash = HostStash(slots=40)
    x = torch.empty(1, 32_760, 96, dtype=torch.bfloat16, device="cuda")  # 6.0 MiB
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    for slot in range(40):
        stash.put(slot, x)
    torch.cuda.synchronize()
    pinned = torch.cuda.host_memory_stats()["allocated_bytes.current"] - before
    payload = 40 * x.numel() * x.element_size()
    print(f"pinned {pinned / 2**20:.1f} MiB for a payload of {payload / 2**20:.1f} MiB")
    assert pinned == stash.arena.reserved_bytes == packed_bytes([x.numel() * x.element_size()] * 40)
    assert pinned <= 1.07 * payload
