"""Optimizers studios reach for (#35, first part): transformers' Adafactor and any `module:Class`
with `train.optimizer_args`, LoRA+ (`adapter.lr_ratio`); each resumes exactly; a missing package is
refused in one line with its install line; the plan counts each one's state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launching import PLAIN

from wan_tune.config import load_recipe
from wan_tune.training.errors import TrainingError
from wan_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tiny_folders, tiny_shards, out, *extra):
    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={out}",
        "data.num_workers=0", "train.steps=4", "checkpoint.every=2", *PLAIN, *extra])


@pytest.mark.parametrize("extra", [
    ("train.optimizer=adafactor",),
    ("train.optimizer=torch.optim:SGD", "train.optimizer_args={momentum: 0.9, nesterov: true}", "train.lr=0.01"),
    ("adapter.lr_ratio=16",),
    ("train.optimizer=prodigy", "train.lr=1.0"),
    ("train.optimizer=schedulefree_adamw", "train.lr=1e-3"),
    ("train.optimizer=came", "train.optimizer_args={betas: [0.9, 0.999, 0.9999]}"),
], ids=["adafactor", "sgd-module-class", "lora-plus", "prodigy", "schedulefree", "came"])
def test_each_optimizer_trains_and_resumes_exactly(extra, tiny_folders, tiny_shards, tmp_path):
    """4 steps straight, against 2 steps then a resume to 4 (the optimizer state and its param
    groups from the checkpoint): the same weights, bit for bit."""
    straight = train(_recipe(tiny_folders, tiny_shards, tmp_path / "a", *extra), progress=False, say=lambda *_: None)
    train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", *extra, "train.steps=2"), progress=False, say=lambda *_: None)
    resumed = train(_recipe(tiny_folders, tiny_shards, tmp_path / "b", *extra), progress=False, say=lambda *_: None)
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert straight["last_losses"] != straight["first_losses"]  # it trained
    groups = json.loads((Path(straight["checkpoint"]) / "optimizer.json").read_text())["param_groups"]
    if "adapter.lr_ratio=16" in extra:  # LoRA+: the up matrices in their own group at 16x, logged beside lr
        assert [g["lr_ratio"] for g in groups] == [1.0, 16.0] and groups[1]["initial_lr"] == 16 * groups[0]["initial_lr"]
        logged = [json.loads(line) for line in (Path(straight["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert all(r["lr_up"] == 16 * r["lr"] for r in logged if "loss" in r)
    elif "momentum" in " ".join(extra):
        assert groups[0]["momentum"] == 0.9 and groups[0]["nesterov"] is True
    elif "train.optimizer=prodigy" in extra:  # its step-size estimate is in the state, and logged
        logged = [json.loads(line) for line in (Path(straight["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert groups[0]["d"] > 0 and logged[-1]["lr_effective"] == pytest.approx(groups[0]["d"] * logged[-1]["lr"])
    elif "train.optimizer=schedulefree_adamw" in extra:  # saved in eval mode: the averaged weights
        assert groups[0]["train_mode"] is False
    elif "train.optimizer=came" in extra:
        assert groups[0]["betas"] == [0.9, 0.999, 0.9999]


def test_lora_plus_keeps_its_ratio_when_a_resume_changes_the_lr(tiny_folders, tiny_shards, tmp_path):
    train(_recipe(tiny_folders, tiny_shards, tmp_path, "adapter.lr_ratio=4", "train.steps=2"), progress=False,
          say=lambda *_: None)
    said = []
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, "adapter.lr_ratio=4", "train.lr=5e-5"), progress=False,
                 say=said.append)
    groups = json.loads((Path(done["checkpoint"]) / "optimizer.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in groups] == [5e-5, 4 * 5e-5] and any("train.lr " in s and " -> 5e-05" in s for s in said), said


def test_a_missing_optimizer_package_is_refused_with_its_install_line(tiny_folders, tiny_shards, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match=r"train.optimizer=adamw8bit: .*\(pip install bitsandbytes\)"):
        train(_recipe(tiny_folders, tiny_shards, tmp_path, "train.optimizer=adamw8bit"), progress=False, say=lambda *_: None)
    with pytest.raises(TrainingError, match=r"train.optimizer=nowhere.optim:Fast: ModuleNotFoundError"):
        train(_recipe(tiny_folders, tiny_shards, tmp_path, "train.optimizer=nowhere.optim:Fast"), progress=False,
              say=lambda *_: None)
    with pytest.raises(TrainingError, match=r"optimizer_args=\{'warp': 9\}.*unexpected keyword argument 'warp'"):
        train(_recipe(tiny_folders, tiny_shards, tmp_path, "train.optimizer_args={warp: 9}"), progress=False,
              say=lambda *_: None)


def test_the_plan_counts_each_optimizers_state():
    from wan_tune.plan.memory import MemoryPlan, Setup

    rows = {}
    for name in ("adamw", "adamw8bit", "adafactor", "prodigy", "schedulefree_adamw", "came"):
        recipe = load_recipe(ROOT / "recipes" / "wan2.1-t2v-1.3b-lora.yaml", [f"train.optimizer={name}"])
        plan = MemoryPlan(recipe, "gpu")
        rows[name] = {label: b for _, label, b in plan.breakdown(Setup.of(recipe)).rows}
    adam = rows["adamw"]["AdamW moments"]
    assert rows["adamw8bit"]["AdamW moments"] == adam / 4 and rows["adafactor"]["Adafactor state"] == adam / 32
    assert rows["prodigy"]["Prodigy state"] == 2 * adam
    assert rows["schedulefree_adamw"]["schedule-free state"] == adam and rows["came"]["CAME state"] == adam * 4.5 / 8


def test_schedule_free_warms_up_itself_and_refuses_a_schedule_on_top(tiny_folders, tiny_shards, tmp_path):
    """Its warmup is its own (logged as lr_effective), the schedule a constant 1; a recipe that
    asks for a decaying schedule on top is refused by check."""
    from wan_tune.config.loader import ConfigError

    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, "train.optimizer=schedulefree_adamw", "train.lr=1e-3",
                         "train.warmup_steps=2", "train.steps=3"), progress=False, say=lambda *_: None)
    logged = [json.loads(line) for line in (Path(done["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_effective"] for r in logged if "loss" in r] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert all(r["lr"] == 1e-3 for r in logged if "loss" in r)
    with pytest.raises(ConfigError, match=r"train.lr_schedule.*schedulefree_adamw replaces the schedule"):
        load_recipe(ROOT / "recipes" / "demo-tiny.yaml", ["train.optimizer=schedulefree_adamw", "train.lr_schedule=cosine"])


def test_conditioned_frames_carry_no_loss_when_asked():
    """train.loss_mask_conditioned_frames (#35): I2V leaves out the first latent frame, FLF2V the
    first and the last; TI2V-5B's image frame is left out always; a plain T2V clip keeps every frame."""
    import torch
    from diffusers import WanTransformer3DModel

    from wan_tune.models.variants import get_variant
    from wan_tune.training import flow_matching as fm

    for name, kept_plain, kept_masked in (("tiny", 3, 3), ("tiny-i2v", 3, 2), ("tiny-flf2v", 3, 1), ("tiny-ti2v", 2, 2)):
        v = get_variant(name)
        cfg = v.transformer
        torch.manual_seed(0)
        model = WanTransformer3DModel(**cfg).eval()
        out = cfg.get("out_channels") or cfg["in_channels"]
        latent_channels = out
        batch = {"latents": torch.randn(1, latent_channels, 3, 8, 12), "text": torch.randn(1, 7, cfg["text_dim"])}
        if v.is_i2v:
            batch["condition"] = torch.randn(1, cfg["in_channels"] - latent_channels, 3, 8, 12)
            if cfg.get("image_dim"):
                batch["image_embeds"] = torch.randn(1, 5 * (2 if v.last_frame else 1), cfg["image_dim"])
        elif v.expand_timesteps:
            batch["condition"] = torch.randn(1, latent_channels, 3, 8, 12)
        noise = torch.randn_like(batch["latents"])
        with torch.no_grad():
            kept = [fm.predict(model, v, batch, torch.tensor([0.5]), noise, torch.float32, masked)[0].shape[2]
                    for masked in (False, True)]
        assert kept == [kept_plain, kept_masked], (name, kept)


def test_the_trainer_and_the_held_out_score_mask_the_conditioned_frame(tiny_folders, tiny_shards, tmp_path):
    def run(*extra):
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            "model.variant=tiny-i2v", f"model.path={tiny_folders['tiny-i2v']}", f"data.shards={tiny_shards['tiny-i2v']}",
            f"run.output_dir={tmp_path / str(len(extra))}", "data.num_workers=0", "train.steps=1", "validation.every=0",
            "data.holdout=0.25", *extra])
        return train(recipe, progress=False, say=lambda *_: None)

    plain, masked = run(), run("train.loss_mask_conditioned_frames=true")
    assert plain["first_losses"] != masked["first_losses"] and plain["heldout"][0] != masked["heldout"][0]
