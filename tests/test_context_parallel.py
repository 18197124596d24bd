"""Context parallelism (train.context_parallel, #24): one clip's tokens across processes, on CPU with
gloo. The model-level check runs diffusers' Ulysses hooks as wan-tune sets them up; the training
checks launch exactly as users do (accelerate + launch/accelerate/multi_cpu.yaml)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 3 * 4 * 6  # the test latent, 3 x 8 x 12, in 1 x 2 x 2 patches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method, variant, kind", [
    ("lora", "tiny", "ulysses"), ("full", "tiny", "ulysses"), ("lora", "tiny-i2v", "ulysses"), ("lora", "tiny-ti2v", "ulysses"),
    ("lora", "tiny", "ring"), ("full", "tiny-i2v", "ring")])
def test_each_rank_holds_half_the_tokens_and_the_group_gradient_is_one_process_s(method, variant, kind):
    """T2V, I2V (the CLIP image tokens stay whole beside the text) and TI2V (the timesteps of each
    rank's tokens go with them); Ulysses and ring attention."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "cp_probe.py"), method, variant, kind]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    # Both ranks print to one pipe: their lines may run together.
    ranks = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", out.stdout)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["tokens"] and set(r["tokens"]) == {TOKENS // 2}  # block 0 works on its half of the clip
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)  # the whole output, gathered on every rank
        assert r["grads"] and r["n"] > (10 if method == "lora" else 40)
        assert r["worst"] < 1e-5, r  # summed over the group: one process's gradient


def _metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["heldout_loss"] for r in lines if "heldout_loss" in r]


def _one_process(tiny_folders, tiny_shards, out: Path, *extra: str, variant: str = "tiny", steps: int = 4) -> Path:
    """The reference: the same recipe trained by one process; returns its run folder."""
    from launching import PLAIN

    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.variant={variant}", f"model.path={tiny_folders[variant]}", f"data.shards={tiny_shards[variant]}",
        f"run.output_dir={out}", "data.num_workers=0", f"train.steps={steps}", "checkpoint.every=2", *PLAIN, *extra])
    return Path(train(recipe, progress=False, say=lambda *_: None)["run_dir"])


def _assert_same_run(got: Path, ref: Path) -> None:
    """4 steps: losses within 1e-5 relative, clipped gradient norms within 1e-4, weights within 1e-4."""
    assert len(_metrics(got)[0]) == 4 and _metrics(got)[0] == pytest.approx(_metrics(ref)[0], rel=1e-5)
    assert _norms(got) == pytest.approx(_norms(ref), rel=1e-4)
    weights, ref_weights = _weights(got), _weights(ref)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.allclose(weights[n], ref_weights[n], rtol=0, atol=1e-4) for n in weights)


def _norms(run_dir: Path) -> list[float]:
    """The clipped gradient norms: AdamW hides a gradient off by a constant factor, the norm does not."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in lines if "loss" in r]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "step-000004" / "trainable.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full", "lokr", "schedulefree-lora-plus"])
def test_two_processes_on_one_clip_train_like_one_process_and_resume(method, tiny_folders, tiny_shards, tmp_path):
    """cp=2 on 2 processes (so data-parallel 1): the per-step losses of one process within 1e-5, the
    weights within 1e-4 after 4 steps, through a stop at step 2 and a resume; LoRA with the
    held-out loss and validation renders (every rank renders, the groups split the clip), and a full
    fine-tune whose first two steps ran in one process (a checkpoint resumes at another degree)."""
    from launching import launch

    extra = {"full": ["adapter.method=full"], "lokr": ["adapter.method=lokr", "adapter.rank=4", "export.format=all"],
             "schedulefree-lora-plus": ["train.optimizer=schedulefree_adamw", "adapter.lr_ratio=4", "train.lr=1e-3"]
             }.get(method, []) + (["data.holdout=0.25", "validation.every=4"] if method != "full" else [])
    ref = _one_process(tiny_folders, tiny_shards, tmp_path / "one", *extra)
    cp_dir = tmp_path / "cp"
    if method == "full":  # steps 1-2 in one process, no context parallelism
        _one_process(tiny_folders, tiny_shards, cp_dir, *extra, steps=2)
    for steps in ((4,) if method == "full" else (2, 4)):  # stopped at step 2, resumed
        proc = launch("multi_cpu.yaml", tiny_folders, tiny_shards, cp_dir, "train.context_parallel=2", *extra,
                      f"train.steps={steps}")
        assert proc.returncode == 0, proc.stderr[-4000:]
    if method == "full":
        assert "resuming a run of train.context_parallel=1 at 2: each clip's tokens are split 2 way(s)" in proc.stdout
        assert "data order changes" not in proc.stdout
    got = cp_dir / ref.name
    # AdamW turns the reordered sums of the gradients into weight differences of up to ~3e-5 (weights ~0.02-0.16)
    _assert_same_run(got, ref)
    heldout, ref_heldout = _metrics(got)[1], _metrics(ref)[1]
    assert heldout == pytest.approx(ref_heldout, rel=1e-5)
    if method != "full":  # the group renders the validation sheet one process renders
        import numpy as np
        from PIL import Image

        sheets = [np.asarray(Image.open(d / "validation" / "step-000004" / "00.png")).astype(float) for d in (got, ref)]
        assert ref_heldout and sheets[0].shape == sheets[1].shape and np.abs(sheets[0] - sheets[1]).mean() < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("v, kind", [("tiny-i2v", "ulysses"), ("tiny", "ring")])
def test_image_to_video_and_ring_attention_train_on_two_processes_like_one(v, kind, tiny_folders, tiny_shards, tmp_path):
    """I2V: the condition latents split with the noisy ones, the CLIP image tokens stay whole. Ring
    attention: keys and values pass round the group (torch's CPU flash kernel, parallel/cp_attention.py).
    Gradient checkpointing on, through a stop at step 2 and a resume."""
    from launching import launch

    ref = _one_process(tiny_folders, tiny_shards, tmp_path / "one", "train.gradient_checkpointing=true", variant=v)
    for steps in (2, 4):
        proc = launch("multi_cpu.yaml", tiny_folders, tiny_shards, tmp_path / "cp", "train.context_parallel=2",
                      f"train.context_parallel_kind={kind}", "train.gradient_checkpointing=true", f"train.steps={steps}",
                      variant=v)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"(1 data-parallel x 2 context-parallel, {kind})" in proc.stdout
    _assert_same_run(tmp_path / "cp" / ref.name, ref)


@pytest.mark.slow
def test_two_groups_of_two_train_like_one_process_with_two_micro_batches(tiny_folders, tiny_shards, tmp_path):
    """dp 2 x cp 2 on 4 processes: each group trains its own batch (ranks 0-1 the first, 2-3 the
    second), DDP averages the groups' gradients. The same run as one process accumulating the two
    batches (train.grad_accum=2: the sampler deals them in that order), through a resume."""
    from launching import launch

    ref = _one_process(tiny_folders, tiny_shards, tmp_path / "one", "train.grad_accum=2")
    for steps in (2, 4):
        proc = launch("multi_cpu.yaml", tiny_folders, tiny_shards, tmp_path / "cp", "train.context_parallel=2",
                      f"train.steps={steps}", processes=4)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "4 process(es) (2 data-parallel x 2 context-parallel, ulysses)" in proc.stdout
    _assert_same_run(tmp_path / "cp" / ref.name, ref)


@pytest.mark.slow
@pytest.mark.parametrize("config, method", [("fsdp2_cpu.yaml", "full"), ("zero3_cpu.yaml", "lora")])
def test_sharded_weights_with_context_parallelism_train_like_one_process(config, method, tiny_folders, tiny_shards,
                                                                       tmp_path):
    """FSDP2 and ZeRO-3 shard the weights over both ranks of the group; each block gathers them,
    then diffusers' hooks split its tokens."""
    from launching import launch

    extra = ["adapter.method=full"] if method == "full" else []
    ref = _one_process(tiny_folders, tiny_shards, tmp_path / "one", *extra)
    proc = launch(config, tiny_folders, tiny_shards, tmp_path / "cp", "train.context_parallel=2", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kind = config.split("_")[0]
    held = re.search(rf"{kind}: rank 0 holds ([\d,]+) of the model's ([\d,]+) weights", proc.stdout)
    assert held and int(held[1].replace(",", "")) < 0.6 * int(held[2].replace(",", ""))  # really sharded
    assert "2 process(es) (1 data-parallel x 2 context-parallel, ulysses)" in proc.stdout
    _assert_same_run(tmp_path / "cp" / ref.name, ref)


def test_a_degree_that_does_not_fit_is_refused_in_one_line():
    from wan_tune.config import ConfigError, load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe(ROOT / "recipes" / "wan2.1-t2v-14b-lora.yaml", ["train.context_parallel=3"])
    text = str(err.value)
    assert "40 attention heads" in text and "(2, 4, 5, 8, 10, 20, 40), or train.context_parallel_kind=ring" in text
    load_recipe(ROOT / "recipes" / "wan2.1-t2v-14b-lora.yaml", ["train.context_parallel=3",
                                                                "train.context_parallel_kind=ring"])  # any degree
    with pytest.raises(ConfigError, match="train.offload.*blocks does not run with train.context_parallel=2"):
        load_recipe(ROOT / "recipes" / "wan2.2-t2v-a14b-lora.yaml", ["train.context_parallel=2", "train.offload=blocks"])


def test_ring_attention_blocks_are_checkpointed_by_wan_tune_s_own_function():
    """diffusers' ring backward reads its saved tensors twice (its own read, then the kernel's
    backward op: on a GPU, `_native_flash`'s), which torch's checkpoint refuses."""
    from wan_tune.config import load_recipe
    from wan_tune.memory.activation_offload import BlockCheckpoint, block_checkpoint

    def chosen(*overrides):
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["train.gradient_checkpointing=true", *overrides])
        model = torch.nn.Module()
        model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        return block_checkpoint(model, recipe.train)

    assert chosen() is None  # torch's checkpoint, diffusers' default
    assert chosen("train.context_parallel=2") is None  # Ulysses reads them once
    assert isinstance(chosen("train.context_parallel=2", "train.context_parallel_kind=ring"), BlockCheckpoint)


def test_token_counts_the_degree_does_not_divide_are_named():
    from wan_tune.models.variants import get_variant
    from wan_tune.parallel.context_parallel import token_problem

    v = get_variant("wan2.1-t2v-14b")
    assert token_problem(v, [(81, 480, 832), (81, 720, 1280)], 2) is None  # 32,760 and 75,600 tokens
    problem = token_problem(v, [(81, 480, 832), (9, 464, 816)], 8)  # 3 x 29 x 51 = 4,437 tokens
    assert problem.startswith("train.context_parallel=8 must divide every clip's token count")
    assert "9x464x816 (4437 tokens)" in problem and "81x480x832" not in problem
    assert problem.endswith("or use a degree that fits these clips (none above 1)")  # 4,437 = 3 x 3 x 17 x 29
    # 3 x 30 x 51 = 4,590 tokens: 2, 5 and 10 divide it and the 40 heads, 4 does not
    assert token_problem(v, [(81, 480, 832), (9, 480, 816)], 4).endswith("fits these clips (2, 5, 10)")
