"""Activation offload (train.activation_offload): each checkpointed block's input waits in host
memory between its forward and its recompute. On a CPU the host buffer is another CPU tensor and
the copies are synchronous, but the path is the GPU's: the block inputs really leave the
checkpoint, come back from the buffers, and the results must equal torch's own checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import PLAIN
from test_offload import six_block_model, step

ROOT = Path(__file__).resolve().parents[1]


def _lora_dropout(model, p: float) -> None:
    """LoRA dropout on: the recompute must draw the forward's mask again (RNG state restored)."""
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            for name in list(module.lora_dropout):
                module.lora_dropout[name] = torch.nn.Dropout(p)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32-base", "fp8-base"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "lora-dropout"])
def test_offloaded_inputs_give_the_same_loss_and_gradients(fp8, dropout):
    from wan_tune.memory.activation_offload import ActivationOffload

    reference_model = six_block_model(fp8)
    _lora_dropout(reference_model, dropout)
    torch.manual_seed(5)
    reference = step(reference_model)

    model = six_block_model(fp8)
    _lora_dropout(model, dropout)
    offload = ActivationOffload(model)
    model.enable_gradient_checkpointing(offload)
    for attempt in range(2):  # the second step reuses the host buffers of the first
        torch.manual_seed(5)
        loss, grads = step(model)
        assert torch.equal(loss, reference[0])
        assert grads.keys() == reference[1].keys() and any("blocks.0." in n for n in grads)  # block 0's LoRA too
        for name in grads:
            assert torch.equal(grads[name], reference[1][name]), name
    # One copy out in each block's forward and one back before each recompute, per step.
    assert offload.copies == {"out": 12, "back": 12}
    inputs = 1 * 8 // 2 * 12 // 2 * 3  # tokens of the test latent (3 x 8 x 12, patches 1 x 2 x 2)
    assert sorted(offload.stash.buffers) == list(range(6)) and offload.host_bytes == 6 * inputs * 48 * 4


def test_a_full_fine_tune_gets_the_gradients_of_the_embedders_too():
    """Full fine-tune: the text and time embeddings the blocks take need gradients (the embedders
    train); they come back through the offloaded blocks as through torch's checkpoint."""
    from wan_tune.memory.activation_offload import ActivationOffload

    def full_model():
        model = six_block_model()
        model.requires_grad_(True)
        return model

    reference = step(full_model())
    model = full_model()
    model.enable_gradient_checkpointing(ActivationOffload(model))
    loss, grads = step(model)
    assert torch.equal(loss, reference[0])
    embedders = [n for n in grads if n.startswith("condition_embedder.")]
    assert embedders and all(grads[n].abs().sum() > 0 for n in embedders)
    for name in grads:
        if name in embedders:  # the six blocks' contributions to the text / time embedding add up in another order
            assert torch.allclose(grads[name], reference[1][name], rtol=1e-5, atol=1e-9), name
        else:  # every block's own weights: bit for bit
            assert torch.equal(grads[name], reference[1][name]), name


def test_with_block_offload_too():
    from wan_tune.memory.activation_offload import ActivationOffload
    from wan_tune.memory.block_offload import BlockOffload

    reference = step(six_block_model(True))
    model = six_block_model(True)
    blocks = BlockOffload(model, keep=1, device=torch.device("cpu"))
    activations = ActivationOffload(model)
    model.enable_gradient_checkpointing(activations)
    loss, grads = step(model)
    assert torch.equal(loss, reference[0]) and all(torch.equal(grads[n], reference[1][n]) for n in grads)
    assert blocks.loads == {"forward": 5, "recompute": 5} and activations.copies == {"out": 6, "back": 6}


def test_activation_offload_needs_checkpointing():
    from wan_tune.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="train.activation_offload: moves the block inputs that gradient checkpointing"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["train.activation_offload=true"])


def _run(tiny_folders, tiny_shards, tmp_path, name, *extra, steps=4):
    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path}",
        f"run.name={name}", f"train.steps={steps}", "checkpoint.every=2", "data.num_workers=0",
        "train.gradient_checkpointing=true", "adapter.dropout=0.1", *PLAIN, *extra])
    summary = train(recipe, progress=False, say=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, losses


def test_training_with_activation_offload_equals_training_without_and_resumes_exactly(tiny_folders, tiny_shards, tmp_path):
    plain, plain_losses = _run(tiny_folders, tiny_shards, tmp_path, "plain")
    offloaded, offloaded_losses = _run(tiny_folders, tiny_shards, tmp_path, "offloaded", "train.activation_offload=true")
    assert offloaded_losses == plain_losses and offloaded["weights_sha256"] == plain["weights_sha256"]
    copies = offloaded["model"]._gradient_checkpointing_func.copies
    assert copies == {"out": 2 * 4, "back": 2 * 4}  # 2 blocks, 4 steps: one out, one back each
    # Attention layers checkpointed again inside the blocks' recompute: the same run too.
    attended, attended_losses = _run(tiny_folders, tiny_shards, tmp_path, "attended", "train.attention_checkpointing=true")
    assert attended_losses == plain_losses and attended["weights_sha256"] == plain["weights_sha256"]

    # Stopped at step 2 and resumed: the same run.
    _run(tiny_folders, tiny_shards, tmp_path, "resumed", "train.activation_offload=true", steps=2)
    resumed, resumed_losses = _run(tiny_folders, tiny_shards, tmp_path, "resumed", "train.activation_offload=true")
    assert resumed_losses == plain_losses and resumed["weights_sha256"] == plain["weights_sha256"]


@pytest.mark.slow
def test_two_process_ddp_with_activation_offload_equals_without(tiny_folders, tiny_shards, tmp_path):
    """DDP's gradient hooks fire inside the offloaded blocks' backward (and the nested attention
    checkpoints') as inside torch's checkpoint: both ranks end with the weights of the plain run."""
    from launching import launch, rank_digests

    runs = {}
    for name, extra in (("plain", ()), ("offloaded", ("train.activation_offload=true",)),
                        ("attended", ("train.attention_checkpointing=true",))):
        proc = launch("multi_cpu.yaml", tiny_folders, tiny_shards, tmp_path / name, "train.gradient_checkpointing=true", *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = rank_digests(proc.stdout)
    assert set(runs["plain"]) == {0, 1} and len(set(runs["plain"].values())) == 1
    assert runs["offloaded"] == runs["plain"] and runs["attended"] == runs["plain"]
