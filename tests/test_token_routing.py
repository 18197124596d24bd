"""Token routing (TREAD, train.route_ratio): a seeded share of the tokens skips a span of blocks and
rejoins in place; the kept ones run the span with their own rotary positions; outside a training
step nothing routes; checkpointing and activation offload recompute the same routing; a routed run
resumes exactly and scores its held-out loss unrouted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import transformer_inputs
from test_train import demo

from wan_tune.config import load_recipe
from wan_tune.models.loading import load_transformer, resolve_source
from wan_tune.models.token_routing import TokenRouter, kept_tokens, route_spans, routed_span
from wan_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(tiny_folders):
    return load_transformer(resolve_source("tiny", str(tiny_folders["tiny"])), torch.float32).eval()


def block_io(model):
    """Each block's (input, output) hidden states of the last forward, by block index."""
    seen, hooks = {}, []
    for j, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(lambda m, args, out, j=j: seen.__setitem__(j, (args[0], out))))
    return seen, hooks


def test_the_span_runs_the_kept_tokens_at_their_positions_and_passes_the_others_through(tiny_folders):
    model, inputs = tiny_model(tiny_folders), transformer_inputs("tiny")
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0]
    router = TokenRouter([(0.5, 0, 1)])
    router.install(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], plain)  # installed, not routing: unchanged
        seen, hooks = block_io(model)
        with router.routing(seed=3):
            routed = model(**inputs, return_dict=False)[0]
            perm, _ = router.order(seen[0][0].shape[1], routed.device)
        for h in hooks:
            h.remove()
    assert not torch.allclose(routed, plain)
    x_in, _ = seen[0]  # the span's input, in the original order (the hook sees the block's caller's tensor)
    _, x_out = seen[1]  # the span's output, back in the original order
    tokens = x_in.shape[1]
    kept = kept_tokens(tokens, 0.5)
    routed_out = perm[kept:]
    assert kept == tokens // 2 and torch.equal(torch.sort(perm).values, torch.arange(tokens))
    assert torch.equal(x_out[:, routed_out], x_in[:, routed_out])  # the routed tokens skip both blocks
    # the kept tokens: both blocks run on them alone, each with its own rotary positions
    rope = model.rope(inputs["hidden_states"])
    temb, proj, text, _ = model.condition_embedder(inputs["timestep"], inputs["encoder_hidden_states"], None)
    proj = proj.unflatten(1, (6, -1))
    idx = perm[:kept]
    h = x_in[:, idx]
    with torch.no_grad():
        for block in model.blocks:
            h = block._unrouted_forward(h, text, proj, tuple(r[:, idx] for r in rope))
    assert torch.allclose(x_out[:, idx], h, atol=1e-6)
    # the draw: a seed's own, the same again (a resume), another seed another
    with router.routing(seed=3):
        again = router.order(tokens, x_in.device)[0]
    with router.routing(seed=4):
        other = router.order(tokens, x_in.device)[0]
    assert torch.equal(again, perm) and not torch.equal(other, perm)


def test_each_route_keeps_its_own_draw_and_the_tokens_between_routes_run_whole(tiny_folders):
    """train.routes: two routes (block 0 at 0.5, block 1 at 0.25), each with its own draw; a token
    routed past block 0 is back in place before block 1, which keeps its own share."""
    model, inputs = tiny_model(tiny_folders), transformer_inputs("tiny")
    router = TokenRouter([(0.5, 0, 0), (0.25, 1, 1)])
    router.install(model)
    with torch.no_grad():
        seen, hooks = block_io(model)
        with router.routing(seed=5):
            model(**inputs, return_dict=False)
            tokens = seen[0][0].shape[1]
            first, second = router.order(tokens, torch.device("cpu"), 0)[0], router.order(tokens, torch.device("cpu"), 1)[0]
        for h in hooks:
            h.remove()
    assert not torch.equal(first, second)  # two draws
    rope = model.rope(inputs["hidden_states"])
    _, proj, text, _ = model.condition_embedder(inputs["timestep"], inputs["encoder_hidden_states"], None)
    proj = proj.unflatten(1, (6, -1))
    for j, (perm, ratio) in enumerate(((first, 0.5), (second, 0.25))):
        x_in, x_out = seen[j]  # each block's own input and output, in the original order
        kept = kept_tokens(tokens, ratio)
        idx, skip = perm[:kept], perm[kept:]
        assert torch.equal(x_out[:, skip], x_in[:, skip])
        with torch.no_grad():
            alone = model.blocks[j]._unrouted_forward(x_in[:, idx], text, proj, tuple(r[:, idx] for r in rope))
        assert torch.allclose(x_out[:, idx], alone, atol=1e-6)
    assert torch.equal(seen[1][0], seen[0][1])  # block 1 reads block 0's whole output, every token in place


def test_routes_are_read_in_block_order_and_refused_when_they_overlap(capsys):
    from types import SimpleNamespace as NS

    from wan_tune.cli import main

    def train(routes=(), ratio=0.0):
        return NS(route_ratio=ratio, route_start=2, route_end=-2, routes=[NS(ratio=r, start=a, end=b) for r, a, b in routes])

    assert route_spans(30, train(ratio=0.5)) == [(0.5, 2, 28)] and route_spans(30, train()) == []
    assert route_spans(30, train([(0.25, 2, 7), (0.5, 8, -9), (0.25, -8, -2)])) == [(0.25, 2, 7), (0.5, 8, 21), (0.25, 22, 28)]
    with pytest.raises(ValueError, match=r"train.routes: blocks 2..9 and 8..21 overlap"):
        route_spans(30, train([(0.25, 2, 9), (0.5, 8, 21)]))
    with pytest.raises(ValueError, match=r"train.routes\[1\]: route_start=40"):
        route_spans(30, train([(0.25, 2, 9), (0.5, 40, 41)]))
    recipe = str(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml")
    two = "train.routes=[{ratio: 0.25, start: 2, end: 9}, {ratio: 0.5, start: 8, end: -2}]"
    assert main(["check", recipe, two]) == 2
    assert "train.routes: wan2.1-t2v-1.3b: blocks 2..9 and 8..28 overlap" in capsys.readouterr().err
    assert main(["check", recipe, "train.routes=[{ratio: 1.5}]"]) == 2
    assert "train.routes[0].ratio: must be in [0, 1)" in capsys.readouterr().err
    assert main(["check", recipe, "train.routes=[{ratio: 0.5}]", "train.route_ratio=0.5"]) == 2
    assert "train.routes: train.route_ratio is set too" in capsys.readouterr().err


CKPT = "train.gradient_checkpointing=true"
SETTINGS = {  # name: (reference, the same with the setting that recomputes or stores differently)
    "gradient_checkpointing": ([], [CKPT]),
    "activation_offload": ([], [CKPT, "train.activation_offload=true"]),
    "ffn_chunks": ([], [CKPT, "train.ffn_chunks=2"]),
    "attention_checkpointing": ([], [CKPT, "train.attention_checkpointing=true"]),
    "fp8 base": (["train.fp8_base=true"], ["train.fp8_base=true", CKPT]),
    "full fine-tune": (["adapter.method=full"], ["adapter.method=full", CKPT]),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_recomputes_route_as_the_forward_did(tiny_folders, tmp_path, setting):
    """Gradient checkpointing (and what rides on it) recomputes each block in the backward: the
    routing there is the forward's, so the gradients equal a run without checkpointing."""
    grads = []
    for overrides in SETTINGS[setting]:
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.path={tiny_folders['tiny']}", "train.route_ratio=0.5", "train.route_start=0", "train.route_end=1",
            *overrides])
        from wan_tune.training.model_setup import load_for_training

        torch.manual_seed(0)  # the LoRA's initial values
        model = load_for_training(recipe, fresh=True)
        inputs = transformer_inputs("tiny")
        with model._token_router.routing(seed=11):
            model(**inputs, return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


RUN = {"train.steps": "4", "checkpoint.every": "2", "data.holdout": "0.25", "eval.sigmas": "[0.5]",
       "train.route_start": "0", "train.route_end": "1"}


def test_a_routed_run_resumes_exactly_and_scores_unrouted(tiny_folders, tiny_shards, tmp_path):
    routed = train(demo(tiny_folders, tiny_shards, tmp_path / "a", **RUN, **{"train.route_ratio": "0.5"}),
                   progress=False, say=lambda *_: None)
    plain = train(demo(tiny_folders, tiny_shards, tmp_path / "p", **RUN), progress=False, say=lambda *_: None)
    r, p = metrics(routed["run_dir"]), metrics(plain["run_dir"])
    score = lambda rows, step: next(x["heldout_loss"] for x in rows if x["step"] == step and "heldout_loss" in x)  # noqa: E731
    assert score(r, 0) == score(p, 0)  # the held-out loss never routes: the same weights, the same score
    losses = [x["loss"] for x in r if "loss" in x]
    assert losses != [x["loss"] for x in p if "loss" in x]  # the steps did route
    for steps in (2, 4):  # stopped at 2 and resumed: the same tokens kept, the same losses
        again = train(demo(tiny_folders, tiny_shards, tmp_path / "b", **{**RUN, "train.steps": str(steps)},
                           **{"train.route_ratio": "0.5"}), progress=False, say=lambda *_: None)
    assert [x["loss"] for x in metrics(again["run_dir"]) if "loss" in x] == pytest.approx(losses, rel=1e-6)


def test_spans_and_refusals(capsys):
    assert routed_span(30, 2, -2) == (2, 28) and routed_span(2, 0, 0) == (0, 0) and routed_span(2, -2, -1) == (0, 1)
    for start, end in ((5, 6), (1, 0), (-3, 1)):
        with pytest.raises(ValueError, match="route_start"):
            routed_span(2, start, end)
    from wan_tune.cli import main

    assert main(["check", str(ROOT / "recipes" / "demo-tiny.yaml"), "train.route_ratio=0.5"]) == 2
    assert "train.route_start: tiny: route_start=2, route_end=-2: the model has 2 blocks" in capsys.readouterr().err
    assert main(["check", str(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml"), "train.route_ratio=0.5",
                 "train.context_parallel=2"]) == 2
    assert "train.route_ratio: routes a clip's tokens on one process" in capsys.readouterr().err


def test_the_plan_counts_the_routed_blocks_at_their_kept_tokens(capsys):
    from wan_tune.cli import main

    flops = {}
    for ratio in ("0", "0.5"):
        assert main(["plan", str(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml"), f"train.route_ratio={ratio}"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step:"))
        flops[ratio] = float(line.split()[1].replace(",", ""))
    # 27 of 30 blocks at half the tokens: their projections halve, their self-attention quarters
    assert 0.3 < flops["0.5"] / flops["0"] < 0.5
    # several routes: each span counted at its own kept tokens (the same 27 blocks, a quarter of them at 0.25)
    assert main(["plan", str(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml"),
                 "train.routes=[{ratio: 0.25, start: 2, end: 8}, {ratio: 0.5, start: 9, end: -2}]"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step:"))
    assert "0.25 of the tokens skip blocks 2..8, 0.5 of the tokens skip blocks 9..28" in line
    assert flops["0.5"] < float(line.split()[1].replace(",", "")) < flops["0"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "zero2_cpu.yaml", "fsdp2_cpu.yaml"])
def test_two_processes_route_as_one_process_with_accumulation(config, tiny_folders, tiny_shards, tmp_path):
    """Each micro-batch's kept tokens come from its global position: 2 ranks route as one process
    accumulating their two batches does, and end with the same weights."""
    from launching import PLAIN, launch, rank_digests

    routing = ["train.route_ratio=0.5", "train.route_start=0", "train.route_end=1", "train.caption_dropout=0"]
    proc = launch(config, tiny_folders, tiny_shards, tmp_path / "two", *routing)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(set(rank_digests(proc.stdout).values())) == 1
    one = train(load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={tmp_path / 'one'}",
        "data.num_workers=0", "train.steps=4", "checkpoint.every=2", "train.grad_accum=2", *PLAIN, *routing]),
        progress=False, say=lambda *_: None)
    two = [r["loss"] for r in metrics(tmp_path / "two" / "demo-tiny") if "loss" in r]
    assert two == pytest.approx([r["loss"] for r in metrics(one["run_dir"]) if "loss" in r], rel=1e-4)


def test_block_offload_streams_the_routed_blocks_alike():
    """Block offload's hooks load each block before its call, routed or not: a routed step gives the same
    loss and gradients with the weights streamed."""
    from test_offload import six_block_model, step

    from wan_tune.memory.block_offload import BlockOffload

    results = []
    for offloaded in (False, True):
        model = six_block_model()
        router = TokenRouter([(0.5, 1, 4)])
        router.install(model)
        if offloaded:
            offload = BlockOffload(model, keep=0, device=torch.device("cpu"))
        with router.routing(seed=5):
            results.append(step(model))
    assert offload.loads["forward"] == 6 and offload.loads["recompute"] == 6
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


@pytest.mark.slow
def test_compiled_blocks_route_as_eager_ones_and_a_new_seed_recompiles_nothing(tiny_folders, tiny_shards, tmp_path):
    """train.compile=true: the kept tokens' draw runs outside the compiled graphs (a seeded CPU
    generator), the block's graph reads its indices; the losses equal the eager routed run's, and
    the steps' new seeds add no recompiles."""
    from torch._dynamo.utils import counters

    def losses(name, **extra):
        run = demo(tiny_folders, tiny_shards, tmp_path / name, **{**RUN, "train.steps": "3", "checkpoint.every": "1000",
                                                                  "train.route_ratio": "0.5", **extra})
        return [x["loss"] for x in metrics(train(run, progress=False, say=lambda *_: None)["run_dir"]) if "loss" in x]

    assert losses("compiled", **{"train.compile": "true"}) == pytest.approx(losses("eager"), rel=1e-4)
    model, inputs = tiny_model(tiny_folders), transformer_inputs("tiny")
    router = TokenRouter([(0.5, 0, 1)])
    router.install(model)
    model.compile_repeated_blocks(backend="eager")  # the graphs, as train.compile's, without inductor's build

    def graphs_after(seed):
        with router.routing(seed):
            model(**inputs, return_dict=False)[0].sum().backward()
        return counters["stats"]["unique_graphs"]

    first = graphs_after(0)
    assert [graphs_after(seed) for seed in (1, 2, 3)] == [first] * 3
