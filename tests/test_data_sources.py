"""Several footage sources (`data.sources`): each with its own sizes, frame extraction, captions,
repeats or weight and held-out share; stills beside clips; one source edited re-encodes that source only."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from data_prep.prep import run_prep
from data_prep.summary import format_summary
from wan_tune.config import load_recipe
from wan_tune.data.dataset import ShardDataset
from wan_tune.data.sampler import BucketBatchSampler, DrawCounter, draw_counts
from wan_tune.media.synthetic import make_clips, still_image
from wan_tune.models.variants import get_variant
from wan_tune.training.loop import train
from wan_tune.training.run_data import open_data

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "say": lambda *_: None}


def studio_footage(root: Path) -> dict[str, Path]:
    """A brand's folders: 4 motion clips (20 frames at 16 fps), 6 square product stills, 2 longer
    generic clips without captions (a template captions them)."""
    brand = make_clips(root / "brand", 4, frames=20, height=96, width=128)[0].parent
    stills = root / "stills"
    for i in range(6):
        still_image(stills / f"still_{i}.png", 128, 128, seed=i)
        (stills / f"still_{i}.txt").write_text(f"wtune product shot {i}")
    still_image(stills / "thumb.png", 16, 16)  # too small for its bucket: a report line of this source
    (stills / "thumb.txt").write_text("wtune thumbnail")
    prior = make_clips(root / "prior", 2, frames=40, height=96, width=128, seed=5)[0].parent
    for txt in prior.glob("*.txt"):
        txt.unlink()
    return {"brand": brand, "stills": stills, "prior": prior}


def sources_override(folders: dict[str, Path], prior_fps: int = 16, prior_role: str = "train") -> str:
    return (f"data.sources=[{{path: '{folders['brand']}', repeats: 2, holdout: 0.25}}, "
            f"{{path: '{folders['stills']}', name: product, resolutions: [[64, 64]], holdout: 0.2}}, "
            f"{{path: '{folders['prior']}', frame_extraction: uniform, max_clips_per_video: 3, fps: {prior_fps}, "
            f"role: {prior_role}, mode: template, trigger_word: generic, template: '{{trigger}} footage'}}]")


def sources_recipe(tiny_folders, folders: dict[str, Path], shards: Path, *extra: str, prior_fps: int = 16):
    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "data.source=null", sources_override(folders, prior_fps), f"model.path={tiny_folders['tiny']}", f"data.shards={shards}",
        "data.shard_dtype=fp32", "data.frames=[9]", "data.samples_per_shard=4", "data.holdout=0", "validation.every=0",
        *extra])


@pytest.fixture(scope="module")
def prepped(tiny_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    folders = studio_footage(root)
    recipe = sources_recipe(tiny_folders, folders, root / "shards")
    summary = run_prep(recipe, **QUIET)
    return root, folders, recipe, summary


def index_of(shards: Path) -> pd.DataFrame:
    return pd.read_parquet(shards / "index.parquet")


def test_each_source_is_cut_captioned_and_counted_with_its_own_settings(prepped):
    root, folders, recipe, summary = prepped
    index = index_of(root / "shards")
    assert Counter(index["dataset"]) == {"brand": 8, "product": 6, "prior": 6}
    brand, product, prior = (index[index["dataset"] == n] for n in ("brand", "product", "prior"))
    # brand: data.* (2 back-to-back 9-frame windows of 64x96); product: stills, one frame at its own 64x64
    assert set(zip(brand["frames"], brand["height"], brand["width"])) == {(9, 64, 96)}
    assert sorted(brand["start_frame"]) == [0, 0, 0, 0, 9, 9, 9, 9]
    assert set(zip(product["frames"], product["height"], product["width"])) == {(1, 64, 64)}
    # prior: `uniform` spreads 3 windows from the first frame to the last start that fits (40 frames: 0, 16, 31)
    assert sorted(prior["start_frame"]) == [0, 0, 16, 16, 31, 31]
    assert set(prior["caption"]) == {"generic footage"} and set(brand["caption"]) != {"generic footage"}
    with open(root / "shards" / "captions.csv", newline="") as f:
        keys = {row["key"] for row in csv.DictReader(f)}
    assert {"brand/clip_000.mp4", "product/still_0.png", "prior/clip_001.mp4"} <= keys
    with open(root / "shards" / "prep_report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [(r["path"], r["dataset"]) for r in report] == [("product/thumb.png", "product")]
    assert "too small" in report[0]["reason"]
    assert summary["by_source"] == {"brand": {"samples": 8, "clips": 4, "skipped": 0},
                                    "prior": {"samples": 6, "clips": 2, "skipped": 0},
                                    "product": {"samples": 6, "clips": 6, "skipped": 1}}
    table = format_summary(summary)
    assert "product" in table and " 6       6        1" in table


def test_editing_one_source_encodes_that_source_again_and_no_other(prepped, tiny_folders, tmp_path):
    root, folders, _, _ = prepped
    before = index_of(root / "shards").set_index("id")["dataset"]
    said = []
    run_prep(sources_recipe(tiny_folders, folders, root / "shards", prior_fps=12), progress=False, say=said.append)
    after = index_of(root / "shards").set_index("id")["dataset"]
    kept = set(before.index) & set(after.index)
    assert {before[i] for i in set(before.index) - kept} == {"prior"}  # only prior's samples got new ids
    assert set(after[after != "prior"].index) == set(before[before != "prior"].index)
    assert any("prior.fps: 16.0 -> 12.0" in line for line in said), said
    assert any(line.startswith(f"{len(after)} clip(s) planned") and f"{(after == 'prior').sum()} to encode" in line
               for line in said), said
    run_prep(sources_recipe(tiny_folders, folders, root / "shards"), **QUIET)  # back as the other tests read it


def test_draws_follow_repeats_and_weights_and_resume_exactly():
    groups = ["a"] * 12 + ["b"] * 48
    buckets = [(9, 64, 96) if i % 3 else (1, 64, 64) for i in range(60)]
    for repeats, weights, shares in (({"a": 3}, None, {"a": 36 / 84, "b": 48 / 84}),
                                     ({}, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5}),
                                     ({}, {"a": 1.0, "b": 3.0}, {"a": 0.25, "b": 0.75})):
        draws = draw_counts(groups, frozenset(), repeats, weights)
        sampler = BucketBatchSampler(buckets, 2, seed=1, rank=0, world=2, groups=groups, draws=draws)
        epoch = sum(len(sampler.epoch_batches(0)) for _ in range(1))  # this rank's batches of the first epoch
        counts = sampler.drawn(epoch)
        total = sum(counts.values())
        for name, share in shares.items():
            assert abs(counts[name] / total - share) < 0.03, (weights, repeats, counts)
        for batch in sampler.global_batches(0):
            assert len({buckets[i] for i in batch}) == 1  # one bucket per batch: stills never meet clips
        # a resumed sampler deals what the straight one dealt, and the counter counts on from where it stood
        straight = iter(BucketBatchSampler(buckets, 2, seed=1, rank=1, world=2, groups=groups, draws=draws))
        dealt = [next(straight) for _ in range(3 * epoch)]
        resumed = BucketBatchSampler(buckets, 2, seed=1, rank=1, world=2, groups=groups, draws=draws)
        resumed.seek(epoch + 5)
        assert [next(iter(resumed)) for _ in range(1)] == dealt[epoch + 5 : epoch + 6]
        counter = DrawCounter(sampler, 7)
        assert counter.advance(2 * epoch) == sampler.drawn(7 + 2 * epoch)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_draws_and_held_out_scores_per_source_and_resumes_exactly(prepped, tiny_folders, tmp_path):
    root, folders, _, _ = prepped
    run = ["train.batch_size=1", "train.steps=6", "checkpoint.every=3", "eval.every=3", "data.num_workers=0",
           "eval.sigmas=[0.5]", "timesteps.shift=auto"]
    straight = train(sources_recipe(tiny_folders, folders, root / "shards", f"run.output_dir={tmp_path / 'a'}", *run),
                     **QUIET)
    records = metrics(Path(straight["run_dir"]))
    steps = [r for r in records if "loss" in r]
    assert [sum(v for k, v in r.items() if k.startswith("drawn/")) for r in steps] == [1, 2, 3, 4, 5, 6]
    scores = {r["step"]: r for r in records if "heldout_loss" in r}
    assert sorted(scores) == [0, 3, 6]
    dataset = ShardDataset(root / "shards")
    # brand holds out 1 of 4 clips (2 windows), product 1 still of 6, prior none
    assert {k for k in scores[3] if k.startswith("heldout_loss/")} == {"heldout_loss/brand", "heldout_loss/product"}
    s = scores[3]
    assert s["heldout_loss"] == pytest.approx((2 * s["heldout_loss/brand"] + s["heldout_loss/product"]) / 3)
    assert len(dataset) == 20
    # timesteps.shift=auto: each step's shift follows the tokens of the bucket it drew (stills: 1 latent frame)
    recipe = sources_recipe(tiny_folders, folders, root / "shards", *run)
    variant = get_variant("tiny")
    dealt = open_data(recipe, variant, 0, 1).sampler.epoch_batches(0)[:6]
    native = variant.tokens(variant.frames, *variant.resolution)
    for record, batch in zip(steps, dealt):
        frames, h, w, _ = dataset.buckets[batch[0]]
        assert record["shift"] == pytest.approx(variant.flow_shift * (variant.tokens(frames, h, w) / native) ** 0.5)
    assert len({r["shift"] for r in steps}) == 2  # stills and clips both drawn in six steps
    # stopped at 3 and resumed: the same draws and losses as the straight run
    other = tmp_path / "b"
    train(sources_recipe(tiny_folders, folders, root / "shards", f"run.output_dir={other}", *run, "train.steps=3"),
          **QUIET)
    resumed = train(sources_recipe(tiny_folders, folders, root / "shards", f"run.output_dir={other}", *run), **QUIET)
    again = [r for r in metrics(Path(resumed["run_dir"])) if "loss" in r]
    for a, b in zip(steps, again):
        assert {k: v for k, v in a.items() if k.startswith("drawn/") or k == "loss"} == \
               pytest.approx({k: v for k, v in b.items() if k.startswith("drawn/") or k == "loss"}, rel=1e-6)


def test_bad_sources_get_one_line_each(tiny_folders, tmp_path, capsys):
    from wan_tune.cli import main

    stills = tmp_path / "stills"
    still_image(stills / "a.png", 64, 64)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {variant: tiny}\n"
        f"data:\n  sources:\n    - {{path: {tmp_path / 'gone'}}}\n    - {{path: {stills}, frames: [5]}}\n"
        f"    - {{path: {stills}, name: again, repeats: 1}}\n")
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert any(line.strip().startswith("data.sources[0].path:") and "does not exist" in line for line in err), err
    assert any(line.strip().startswith("data.sources[1].frames:") and "only stills" in line for line in err), err
    # one line per rule from the loader: same name twice, repeats of 0, weight beside none
    recipe.write_text(
        "model: {variant: tiny}\n"
        f"data:\n  sources:\n    - {{path: {stills}, weight: 1}}\n    - {{path: {stills}, repeats: 0}}\n"
        f"    - {{path: {stills}, role: preserve}}\n")
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    for words in ("data.sources[1].repeats: must be a finite number > 0", "data.sources[1].name: 'stills' is the name",
                  "data.sources[1] has no weight while others do"):
        assert words in err, err


def test_preserve_sources_train_towards_the_base_models_own_prediction(prepped, tiny_folders, tmp_path):
    """`role: preserve`: its samples' target is the base model's prediction at the same noise and sigma,
    so an adapter that has learnt nothing yet scores exactly 0 on them, and a trained adapter keeps
    closer to the base there than the same run that trains on them."""
    import torch

    from wan_tune.training import flow_matching as fm
    from wan_tune.training.validation import adapters_off

    root, folders, _, _ = prepped
    sources = (f"data.sources=[{{path: '{folders['brand']}'}}, {{path: '{folders['prior']}', role: ROLE, "
               "mode: template, template: 'generic footage'}]")
    run = ["train.batch_size=1", "train.steps=12", "checkpoint.every=100", "data.num_workers=0", "train.lr=2e-2",
           "train.caption_dropout=0"]

    def recipe_of(role: str, out: Path, seed: int = 0):
        return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            "data.source=null", sources.replace("ROLE", role), f"model.path={tiny_folders['tiny']}",
            f"data.shards={out / 'shards'}", "data.shard_dtype=fp32", "data.frames=[9]", "data.holdout=0",
            "validation.every=0", f"run.output_dir={out / 'runs'}", f"run.seed={seed}", *run])

    run_prep(recipe_of("preserve", tmp_path / "kept"), **QUIET)
    dataset = ShardDataset(tmp_path / "kept" / "shards")

    def first_batches(seed: int):
        recipe = recipe_of("preserve", tmp_path / "kept", seed)
        return recipe, open_data(recipe, get_variant("tiny"), 0, 1).sampler.epoch_batches(0)[:12]

    # a seed whose first step draws a preserve sample (the sampler is a pure function of the seed)
    seed = next(k for k in range(20) if dataset.datasets[first_batches(k)[1][0][0]] == "prior")
    recipe, dealt = first_batches(seed)
    kept = train(recipe, **QUIET)
    taught_recipe = recipe_of("train", tmp_path / "taught", seed)
    run_prep(taught_recipe, **QUIET)
    taught = train(taught_recipe, **QUIET)
    losses = [r["loss"] for r in metrics(Path(kept["run_dir"])) if "loss" in r]
    roles = ["preserve" if dataset.datasets[b[0]] == "prior" else "train" for b in dealt]
    first_train = roles.index("train")
    assert first_train > 0 and losses[:first_train] == [0.0] * first_train  # nothing learnt yet: the base's own output
    assert "preserve" in roles[first_train:]

    # drift from the base on the preserve clips, at fixed noise and sigmas
    def drift(model) -> float:
        from wan_tune.data.dataset import collate, to_device

        total = 0.0
        for i in (i for i, d in enumerate(dataset.datasets) if d == "prior"):
            batch = to_device(collate([dataset[i]]), "cpu", torch.float32, recipe.data.max_text_tokens)
            noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(i))
            sigma = torch.tensor([0.6])
            with torch.no_grad():
                pred, _ = fm.predict(model, get_variant("tiny"), batch, sigma, noise, torch.float32)
                with adapters_off([model]):
                    base, _ = fm.predict(model, get_variant("tiny"), batch, sigma, noise, torch.float32)
            total += float(((pred - base) ** 2).mean())
        return total

    assert drift(kept["model"]) < 0.6 * drift(taught["model"])  # measured: 0.90 against 1.95


def test_the_demo_trains_clips_and_stills_as_two_sources(tmp_path, monkeypatch, capsys):
    from wan_tune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--clips", "3", "--stills", "3", "train.steps=4", "checkpoint.every=4", "validation.every=0"]) == 0
    out = capsys.readouterr().out
    index = index_of(tmp_path / "data" / "demo" / "shards")
    assert Counter(index["dataset"]) == {"clips": 6, "stills": 3} and set(index[index["dataset"] == "stills"]["frames"]) == {1}
    assert "3 stills in data/demo/stills" in out
    steps = [r for r in metrics(tmp_path / "checkpoints" / "demo-tiny") if "loss" in r]
    assert steps[0].keys() >= {"drawn/clips", "drawn/stills"} and steps[-1]["drawn/clips"] + steps[-1]["drawn/stills"] == 8
    card = next((tmp_path / "checkpoints" / "demo-tiny").glob("step-*/export/README.md")).read_text()
    assert "- Sources (samples): clips 6, stills 3" in card


def test_several_captions_of_a_clip_are_each_encoded_and_drawn_per_step(tiny_folders, tmp_path):
    """A sidecar of several lines (or a manifest cell holding a list) gives a clip several captions: the
    review file has a row for each, each is encoded once, and a step draws one (seeded: a resumed run
    draws the same ones)."""
    import torch

    from data_prep.captions import read_caption_lists
    from data_prep.encode import Encoders
    from data_prep.sources import from_manifest
    from wan_tune.data.dataset import collate
    from wan_tune.models.loading import recipe_source

    clips = make_clips(tmp_path / "clips", 2, frames=12, height=96, width=128)
    lines = ["wtune style, a red circle", "", "wtune style, a round red shape on black", "wtune, red disc drifting"]
    clips[0].with_suffix(".txt").write_text("\n".join(lines) + "\n")
    shards = tmp_path / "shards"
    overrides = [f"data.source={clips[0].parent}", f"model.path={tiny_folders['tiny']}", f"data.shards={shards}",
                 "data.shard_dtype=fp32", "data.frames=[9]", "data.holdout=0", "validation.every=0",
                 "data.num_workers=0", "train.batch_size=1", "checkpoint.every=4"]
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*overrides, f"run.output_dir={tmp_path / 'runs'}",
                                                               "train.steps=8"])
    run_prep(recipe, **QUIET)
    assert read_caption_lists(shards / "captions.csv") == {"clip_000.mp4": [lines[0], lines[2], lines[3]],
                                                           "clip_001.mp4": [clips[1].with_suffix(".txt").read_text().strip()]}
    index = index_of(shards).set_index("source")
    assert index.loc["clip_000.mp4", "captions"] == 3 and index.loc["clip_001.mp4", "captions"] == 1
    assert index.loc["clip_000.mp4", "caption"] == lines[0]  # the first is the index's caption (held-out scores use it)

    dataset = ShardDataset(shards)
    i = dataset.sources.index("clip_000.mp4")
    encoders = Encoders(recipe_source(recipe, ("vae", "text_encoder", "tokenizer")), False, torch.float32, "cpu", 512)
    for draw, text in ((0, lines[0]), (1, lines[2]), (5, lines[3])):  # caption draw % 3
        got = dataset[(i, draw)]
        assert set(got) == {"index", "latents", "text"} and torch.equal(got["text"], encoders.text([text])[0])
    assert torch.equal(dataset[i]["text"], dataset[(i, 3)]["text"])  # a plain index: the first caption
    assert collate([dataset[(i, 1)], dataset[(dataset.sources.index("clip_001.mp4"), 2)]])["text"].shape[0] == 2

    # the draws come from the seed and the batch's place: a resumed sampler deals the same (index, draw) pairs
    sampler = open_data(recipe, get_variant("tiny"), 0, 1).sampler
    straight = iter(sampler)
    dealt = [next(straight) for _ in range(12)]
    assert all(isinstance(pair, tuple) for batch in dealt for pair in batch)
    assert len({pair[1] % 3 for batch in dealt for pair in batch if pair[0] == i}) > 1  # not always the same caption
    again = open_data(recipe, get_variant("tiny"), 0, 1).sampler
    again.seek(5)
    assert [next(iter(again)) for _ in range(1)] == dealt[5:6]
    whole = train(recipe, **QUIET)
    losses = [r["loss"] for r in metrics(Path(whole["run_dir"])) if "loss" in r]
    for steps in (4, 8):  # stopped at 4 and resumed: the same captions drawn, the same losses
        resumed = train(load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [*overrides, f"run.output_dir={tmp_path / 'halves'}",
                                                                          f"train.steps={steps}"]), **QUIET)
    assert [r["loss"] for r in metrics(Path(resumed["run_dir"])) if "loss" in r] == pytest.approx(losses, rel=1e-6)

    # a manifest cell holding a list: several captions of that row
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(clips[1]), "caption": ["first take", " ", "second take"]}) + "\n")
    (item,) = from_manifest(manifest)
    assert item.captions == ("first take", "second take")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu.yaml", "zero2_cpu.yaml", "zero3_cpu.yaml", "fsdp2_cpu.yaml"])
def test_two_processes_draw_preserve_and_shift_as_one_process_with_accumulation(config, prepped, tiny_folders, tmp_path):
    """DDP, ZeRO-2/3 and FSDP2 over several sources with a preserve source and shift=auto: every rank
    runs the base forward when any rank's batch holds a preserve sample (a forward gathers weights or
    broadcasts buffers with every rank), and the run equals one process accumulating both ranks' batches."""
    from launching import launch, rank_digests

    root, folders, _, _ = prepped
    run = ["data.source=null", sources_override(folders, prior_role="preserve"), "data.frames=[9]", "data.shard_dtype=fp32",
           "train.batch_size=1", "timesteps.shift=auto", "train.caption_dropout=0", "eval.sigmas=[0.5]"]
    proc = launch(config, tiny_folders, {"tiny": root / "shards"}, tmp_path / "two", *run, "data.holdout=0",
                  "train.steps=8", "checkpoint.every=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(set(rank_digests(proc.stdout).values())) == 1
    one = train(sources_recipe(tiny_folders, folders, root / "shards", *run, f"run.output_dir={tmp_path / 'one'}",
                               "train.grad_accum=2", "train.steps=8", "checkpoint.every=4", "data.num_workers=0"),
                **QUIET)
    two_steps = [r for r in metrics(tmp_path / "two" / "demo-tiny") if "loss" in r]
    one_steps = [r for r in metrics(Path(one["run_dir"])) if "loss" in r]
    assert two_steps[-1]["drawn/prior"] > 0  # the preserve source was drawn (its base forward ran on a rank)
    assert [r["loss"] for r in two_steps] == pytest.approx([r["loss"] for r in one_steps], rel=1e-4)
    assert [{k: v for k, v in r.items() if k.startswith("drawn/")} for r in two_steps] == \
           [{k: v for k, v in r.items() if k.startswith("drawn/")} for r in one_steps]


def test_reviewed_captions_carry_over_when_a_recipe_moves_to_sources(tmp_path):
    from data_prep.captions import make_captions, read_caption_lists, write_captions
    from data_prep.sources import discover
    from wan_tune.config.schema import CaptionConfig

    clips = make_clips(tmp_path / "clips", 2, frames=12)
    path = tmp_path / "captions.csv"
    write_captions(path, [{"key": "clip_000.mp4", "caption": "reviewed by a person", "origin": "kept"}])
    make_captions(discover(str(clips[0].parent), prefix="brand/"), CaptionConfig(), path, progress=False)
    got = read_caption_lists(path)
    assert got["brand/clip_000.mp4"] == ["reviewed by a person"]  # the review carried over to the new key
    assert got["brand/clip_001.mp4"] == [clips[1].with_suffix(".txt").read_text().strip()]  # others: their sidecars
    assert got["clip_000.mp4"] == ["reviewed by a person"]  # and the old row stays in the file
