"""Block offload (train.offload=blocks) and the idle-expert swap: the mechanics on CPU.

On a CPU the "device" is the host, so nothing is copied, but the mechanism is the real one: an
offloaded parameter holds an empty placeholder, so a block that ran without being loaded first
would fail, and the results must equal a run without offload bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import PLAIN

ROOT = Path(__file__).resolve().parents[1]


def six_block_model(fp8: bool = False, seed: int = 0, variant: str = "tiny"):
    """The tiny architecture (of `variant`) with 6 blocks (prefetching needs more than two), LoRA
    on attention and ffn, gradient checkpointing on: what `load_for_training` makes of it."""
    from diffusers import WanTransformer3DModel

    from wan_tune.config import load_recipe
    from wan_tune.training.model_setup import adapt
    from wan_tune.models.variants import get_variant

    variant = get_variant(variant)
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [f"model.variant={variant.name}", f"train.fp8_base={'true' if fp8 else 'false'}",
                                                              "train.gradient_checkpointing=true"])
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**dict(variant.transformer, num_layers=6))
    model = adapt(model, recipe, variant, torch.float32)
    for name, p in model.named_parameters():  # B starts at 0; make the LoRA matter for the gradients
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def step(model, variant: str = "tiny"):
    from conftest import transformer_inputs

    out = model(**transformer_inputs(variant), return_dict=False)[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-base", "fp8-base"])
@pytest.mark.parametrize("keep, arena", [(0, False), (2, False), (0, True)], ids=["keep0", "keep2", "keep0-arena"])
def test_block_offload_gives_the_same_loss_and_gradients(fp8, keep, arena):
    """`arena`: the host copies in one HostArena's slabs, as a GPU's are (views, pinned there)."""
    from wan_tune.memory.block_offload import BlockOffload

    reference = step(six_block_model(fp8))
    model = six_block_model(fp8)
    offload = BlockOffload(model, keep=keep, device=torch.device("cpu"), arena=arena)
    if arena:  # every host copy lies in the arena's slabs
        slabs = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in offload.arena.slabs]
        assert all(any(a <= h.data_ptr() < b for a, b in slabs) for g in offload.groups if g for h in g.host)
    streamed = 6 - keep
    # Between steps the streamed blocks hold placeholders only: the weights are elsewhere.
    for i, block in enumerate(model.blocks):
        sizes = [p.numel() for p in block.parameters() if not p.requires_grad]
        assert (max(sizes) == 0) == (i >= keep), f"block {i}"

    resident = []  # streamed blocks on the device each time a block starts (after our hook ran)
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: resident.append(sum(g.resident for g in offload.groups if g)))
    for attempt in range(2):  # twice: the second step starts from the state the first left
        loss, grads = step(model)
        assert torch.equal(loss, reference[0])
        assert grads.keys() == reference[1].keys()
        for name in grads:
            assert torch.equal(grads[name], reference[1][name]), name
    # The hooks fired before every streamed block's forward and before its recompute in the backward.
    assert offload.loads == {"forward": 2 * streamed, "recompute": 2 * streamed}
    # The block running, the one prefetched, and the one whose backward is finishing: never more.
    assert max(resident) <= 3
    # After the step only block 0, if streamed, is still loaded: the next forward starts with it.
    # (A kept block before the first streamed one drops it in the backward and prefetches it again.)
    assert [i for i, g in enumerate(offload.groups) if g and g.resident] == ([0] if keep == 0 else [])

    for h in offload.handles:  # proof the placeholders are real: without the hooks the model cannot run
        h.remove()
    with pytest.raises(RuntimeError):
        step(model)


def test_offload_settings_are_checked():
    from wan_tune.config import ConfigError, load_recipe

    base = ROOT / "recipes" / "demo-tiny.yaml"
    cases = {
        ("train.offload=blocks", "train.gradient_checkpointing=false"): "needs train.gradient_checkpointing=true",
        ("train.offload=blocks", "train.offload_keep=2", "train.gradient_checkpointing=true"): "has 2 blocks: keep 0 to 1",
        ("train.offload_keep=1",): "set that too",
        ("train.offload=blocks", "adapter.method=full", "train.gradient_checkpointing=true"): "full fine-tune trains them all",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_recipe(base, list(overrides))
    ok = load_recipe(base, ["train.offload=blocks", "train.offload_keep=1", "train.gradient_checkpointing=true"])
    assert ok.train.offload_keep == 1


def test_training_with_block_offload_equals_training_without(tiny_folders, tiny_shards, tmp_path):
    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    def run(name, *extra):
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path}",
            f"run.name={name}", "train.steps=3", "checkpoint.every=1000", "data.num_workers=0",
            "train.gradient_checkpointing=true", *PLAIN, *extra])
        summary = train(recipe, progress=False, say=lambda *_: None)
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, losses

    plain, plain_losses = run("plain")
    streamed, streamed_losses = run("streamed", "train.offload=blocks")
    assert streamed_losses == plain_losses
    assert streamed["weights_sha256"] == plain["weights_sha256"]
    # The run's model keeps streaming: its blocks' frozen weights are not on the "device" now,
    # but for the first block, which the next forward starts with.
    for i, block in enumerate(streamed["model"].blocks):
        assert all((p.numel() == 0) == (i > 0) for p in block.parameters() if not p.requires_grad)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tiny_folders, tiny_shards, tmp_path):
    """train.compile=true: every block runs through torch.compile (inductor builds CPU code here),
    with block offload hooks in between, and the losses match the eager run; with activation offload,
    attention checkpoints and FFN chunks too."""
    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    def run(name, *extra):
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path}",
            f"run.name={name}", "train.steps=2", "checkpoint.every=1000", "data.num_workers=0",
            "train.gradient_checkpointing=true", "train.offload=blocks", *PLAIN, *extra])
        summary = train(recipe, progress=False, say=lambda *_: None)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return summary, [json.loads(line)["loss"] for line in lines]

    eager, eager_losses = run("eager")
    compiled, compiled_losses = run("compiled", "train.compile=true")
    assert all(b._compiled_call_impl is not None for b in compiled["model"].blocks)
    assert all(b._compiled_call_impl is None for b in eager["model"].blocks)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    # The activation settings under compile: wan-tune's block checkpoint around compiled blocks,
    # the nested attention and FFN checkpoints inside their recompute. The second loss follows the
    # first step's gradients.
    memory = ("train.activation_offload=true", "train.attention_checkpointing=true", "train.ffn_chunks=2")
    _, eager_memory_losses = run("eager-memory", *memory)
    _, compiled_memory_losses = run("compiled-memory", "train.compile=true", *memory)
    assert compiled_memory_losses == pytest.approx(eager_memory_losses, rel=1e-4)
    assert eager_memory_losses == pytest.approx(eager_losses, rel=1e-4)


def test_the_idle_expert_keeps_nothing_on_the_device():
    """Wan2.2 A14B, both experts trained with block offload: after a step BlockOffload keeps block 0
    for the next forward; when the other expert's step comes instead, that block leaves too (B14)."""
    from wan_tune.memory.block_offload import BlockOffload, ExpertSwap

    swap = ExpertSwap(torch.device("cpu"))
    experts, offloads = [six_block_model(), six_block_model(seed=1)], []
    for model in experts:
        offloads.append(BlockOffload(model, keep=0, device=torch.device("cpu")))
        swap.add(model, offloads[-1])
    step(experts[0])
    assert offloads[0].groups[0].resident and swap.groups[0].resident
    step(experts[1])
    assert not any(g.resident for g in offloads[0].groups) and not swap.groups[0].resident
    assert offloads[1].groups[0].resident and swap.swaps == 2


def test_the_next_step_s_expert_swaps_in_when_the_step_is_done():
    """B14: once a step is done the next step's expert is known (the routing draw depends on the step
    alone): `prefetch` swaps it in then, so its forward finds it there and swaps nothing."""
    from wan_tune.memory.block_offload import ExpertSwap

    swap = ExpertSwap(torch.device("cpu"))
    experts = [six_block_model(), six_block_model(seed=1)]
    for model in experts:
        swap.add(model)
    step(experts[0])
    swap.prefetch(experts[1])
    assert swap.groups[1].resident and not swap.groups[0].resident and swap.swaps == 2
    reference = step(six_block_model(seed=1))
    loss, grads = step(experts[1])
    assert swap.swaps == 2 and torch.equal(loss, reference[0])
    swap.prefetch(experts[1])  # already in: nothing moves
    assert swap.swaps == 2
