"""adapter.init_from (#35): a run starts from a LoRA in any of the key layouts studios hold
(wan-tune's comfyui / diffusers / kohya exports, ai-toolkit's lora_A/lora_B under original names):
its held-out score at step 0 is that of the run the LoRA came from; a rank, target or model
mismatch is refused naming the first key at fault; the file's sha256 is recorded and carried."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from launching import PLAIN
from safetensors.torch import load_file, save_file

from wan_tune.config import load_recipe
from wan_tune.export.run import export
from wan_tune.training.errors import TrainingError
from wan_tune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "say": lambda *_: None}


def _recipe(tiny_folders, tiny_shards, out, *extra):
    return load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={tiny_folders['tiny']}", f"data.shards={tiny_shards['tiny']}", f"run.output_dir={out}",
        "data.num_workers=0", "checkpoint.every=2", *PLAIN, "data.holdout=0.25", "adapter.rank=8", *extra])


def _scores(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["heldout_loss"] for r in map(json.loads, lines) if "heldout_loss" in r}


@pytest.fixture(scope="module")
def trained_lora(tiny_folders, tiny_shards, tmp_path_factory):
    """A 2-step LoRA (rank 8, alpha 4: scale 0.5) exported in every format, its held-out score at step 2."""
    tmp = tmp_path_factory.mktemp("source")
    done = train(_recipe(tiny_folders, tiny_shards, tmp, "adapter.alpha=4", "train.steps=2"), **QUIET)
    export(done["checkpoint"], ["comfyui", "diffusers", "kohya"], tmp / "export", say=lambda *_: None)
    files = {fmt: next((tmp / "export").glob(f"*-{fmt}.safetensors")) for fmt in ("comfyui", "diffusers", "kohya")}
    # ai-toolkit's layout: original module names, lora_A / lora_B, no alpha (the scale is in B).
    comfy = load_file(str(files["comfyui"]))
    aitk = {}
    for key, value in comfy.items():
        if key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            scale = float(comfy[f"{module}.alpha"]) / value.shape[0] if f"{module}.alpha" in comfy else 1.0
            aitk[f"{module}.lora_A.weight"] = value
            aitk[f"{module}.lora_B.weight"] = comfy[f"{module}.lora_up.weight"] * scale
    files["ai-toolkit"] = tmp / "aitk.safetensors"
    save_file(aitk, str(files["ai-toolkit"]))
    return files, _scores(done["run_dir"])[2]


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers", "kohya", "ai-toolkit"])
def test_a_run_starts_where_its_lora_left_off(fmt, trained_lora, tiny_folders, tiny_shards, tmp_path):
    """At another alpha (8: scale 1, so B is rescaled): the same update, the same held-out score."""
    files, score = trained_lora
    said = []
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, "adapter.alpha=8", f"adapter.init_from={files[fmt]}",
                         "train.steps=2"), progress=False, say=said.append)
    assert _scores(done["run_dir"])[0] == pytest.approx(score, rel=1e-5, abs=1e-6)
    assert any(f"starts from {files[fmt]}" in s for s in said), said
    state = json.loads((Path(done["checkpoint"]) / "state.json").read_text())
    sha = hashlib.sha256(files[fmt].read_bytes()).hexdigest()
    assert state["training"]["init_from"] == [{"file": files[fmt].name, "sha256": sha}]


def test_a_resume_needs_no_file_and_keeps_its_record(trained_lora, tiny_folders, tiny_shards, tmp_path):
    files, _ = trained_lora
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(files["comfyui"].read_bytes())
    train(_recipe(tiny_folders, tiny_shards, tmp_path, f"adapter.init_from={moved}", "train.steps=2"), **QUIET)
    sha = hashlib.sha256(moved.read_bytes()).hexdigest()
    moved.unlink()  # gone: the resume reads its checkpoint, not the file
    done = train(_recipe(tiny_folders, tiny_shards, tmp_path, f"adapter.init_from={moved}", "train.steps=4"), **QUIET)
    state = json.loads((Path(done["checkpoint"]) / "state.json").read_text())
    assert state["step"] == 4 and state["training"]["init_from"] == [{"file": moved.name, "sha256": sha}]
    export(done["checkpoint"], ["comfyui"], tmp_path / "export", say=lambda *_: None)
    assert f"`moved.safetensors` (sha256 `{sha}`)" in (tmp_path / "export" / "README.md").read_text()


def test_a_file_that_does_not_fit_is_refused_naming_its_first_key(trained_lora, tiny_folders, tiny_shards, tmp_path):
    files, _ = trained_lora
    comfy = files["comfyui"]

    def start(*extra):
        train(_recipe(tiny_folders, tiny_shards, tmp_path / str(len(list(tmp_path.iterdir()))), "train.steps=1", *extra),
              **QUIET)

    with pytest.raises(TrainingError, match=r"diffusion_model\.blocks\.0\.\S+\.lora_down\.weight has rank 8, adapter.rank "
                                            r"is 4: set adapter.rank=8"):
        start(f"adapter.init_from={comfy}", "adapter.rank=4")
    with pytest.raises(TrainingError, match=r"diffusion_model\.blocks\.0\.ffn\.0\.lora_down\.weight trains "
                                            r"blocks\.0\.ffn\.net\.0\.proj, which adapter.targets leave out"):
        start(f"adapter.init_from={comfy}", "adapter.targets=[attention]")
    other = {k: (v[:, :-1].contiguous() if k.endswith("lora_down.weight") else v) for k, v in load_file(str(comfy)).items()}
    save_file(other, str(tmp_path / "other-model.safetensors"))
    with pytest.raises(TrainingError, match=r"lora_down\.weight is for a \[\d+ x \d+\] layer, .* here: a LoRA of another model"):
        start(f"adapter.init_from={tmp_path / 'other-model.safetensors'}")
    save_file({"diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    with pytest.raises(TrainingError, match=r"lokr_w1 is not part of a LoRA pair"):
        start(f"adapter.init_from={tmp_path / 'lokr.safetensors'}")
    with pytest.raises(TrainingError, match=r"adapter.init_from: .*nowhere.safetensors: no such file"):
        start(f"adapter.init_from={tmp_path / 'nowhere.safetensors'}")
