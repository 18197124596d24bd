"""Checkpoints: `<output_dir>/<run>/step-NNNNNN/`, written whole or not at all.

```
step-000250/
  trainable.safetensors   the trained weights (LoRA adapters, or the whole transformer)
  optimizer.safetensors   optimizer state tensors; optimizer.json: param groups + scalars
  state.json              step, batches consumed, lr-scheduler state, world size
  recipe.yaml             the resolved recipe: export and resume need no flags
  deepspeed/              DeepSpeed runs only: the engine's own (partitioned) checkpoint
```

Everything is written into `.step-NNNNNN.tmp/` and renamed when complete, so a checkpoint
killed half-way is never chosen. Loads never unpickle, except DeepSpeed's partitioned optimizer
state, which only DeepSpeed can read (it uses torch.load).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..atomic import save_tensors, write_json, write_text

STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporaries are never listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete `.step-N.tmp/` folders a killed save left behind (never chosen, only clutter)."""
    partial = sorted(Path(run_dir).glob(".step-*.tmp")) if Path(run_dir).is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON for the rest)."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    accelerator, run_dir: Path, step: int, model, optimizer, scheduler, consumed: int, recipe_yaml: str, keep_last: int
) -> Path:
    """Write step-N (collective: every rank calls it). Returns the final path."""
    final = step_dir(run_dir, step)
    tmp = Path(run_dir) / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if deepspeed:
        accelerator.save_state(str(tmp / "deepspeed"))  # collective: each rank writes its partition
    if accelerator.is_main_process:
        # Only rank 0 writes, so only rank 0 copies the weights to CPU (a whole model for a full fine-tune).
        unwrapped = accelerator.unwrap_model(model)
        trainable = {n: p.detach().float().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
        if not trainable:
            raise CheckpointError("no trainable parameters found on the unwrapped model")
        save_tensors(tmp / "trainable.safetensors", trainable, {"step": str(step)})
        if not deepspeed:
            tensors, meta = optimizer_to_tensors(optimizer.state_dict())
            save_tensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "optimizer.json", meta)
        write_json(tmp / "state.json", {
            "step": step, "batches_consumed": consumed, "scheduler": scheduler.state_dict(),
            "world_size": accelerator.num_processes, "deepspeed": deepspeed,
        })
        write_text(tmp / "recipe.yaml", recipe_yaml)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and scheduler from step-N; returns its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    if state["deepspeed"] != (accelerator.distributed_type.name == "DEEPSPEED"):
        raise CheckpointError(f"{path} was written {'with' if state['deepspeed'] else 'without'} DeepSpeed; resume it the same way")
    if state["deepspeed"]:
        accelerator.load_state(str(path / "deepspeed"))
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(accelerator.unwrap_model(model).named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise CheckpointError(f"{path}: weights for modules this model lacks ({missing[:3]}...): another recipe?")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(state["scheduler"])
    return state
