"""`adapter.init_from`: a run that starts from a LoRA a studio already has (wan-tune's own export,
ComfyUI, kohya / musubi-tuner, diffusers or ai-toolkit keys; for Wan2.2 A14B one file per
trained expert). Applied on a fresh start only (a resume reads its checkpoint), before accelerate
prepares the model, so DeepSpeed's master weights and FSDP2's shards start from it too.

The file must fit the run exactly: the same modules as adapter.targets select, the same rank,
the model's shapes; the first key that does not is named. alpha may differ: B is rescaled so
that the update (alpha / rank) B A is the file's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..config import Recipe
from ..models.lora_files import LoraFileError, read_lora
from ..models.variants import Variant, expert_label, trained_experts
from .errors import TrainingError


def init_file(recipe: Recipe, variant: Variant, expert: str) -> Path | None:
    """The file `expert` starts from: the entry whose `wan_tune.expert` header names it, else the
    entry at its place among the trained experts (model.experts order)."""
    files = [Path(p).expanduser() for p in recipe.adapter.init_from]
    if not files:
        return None
    experts = trained_experts(variant, recipe.model.experts)
    if recipe.model.expert_mode == "shared" and len(experts) > 1:  # one adapter for both experts: one file
        if len(files) != 1:
            raise TrainingError(f"adapter.init_from lists {len(files)} files; model.expert_mode=shared trains one "
                                "adapter for both experts: give one")
        return files[0]
    if len(files) != len(experts):
        raise TrainingError(f"adapter.init_from lists {len(files)} file(s) for {len(experts)} trained expert(s) "
                            f"({', '.join(expert_label(variant, e) for e in experts)}): give one per expert")
    if variant.two_experts:
        label = expert_label(variant, expert)
        named = [f for f in files if _expert_header(f) == label]
        if named:
            return named[0]
    return files[experts.index(expert)]


def start_from(model, path: Path, rank: int, alpha: float) -> int:
    """Put the file's LoRA into the model's (just made) adapter; returns the modules set."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    # Every Linear's name, not only the adapted ones: a key for a module the targets leave out is
    # named as that, not as a module the model lacks.
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n
               and not n.endswith(".base_layer")]
    try:
        pairs, keys = read_lora(path, [*layers, *linears])
    except LoraFileError as err:
        raise TrainingError(f"adapter.init_from: {err}") from None
    extra = sorted(set(pairs) - set(layers))
    missing = sorted(set(layers) - set(pairs))
    if extra or missing:
        what = (f"{keys[extra[0]]} trains {extra[0]}, which adapter.targets leave out" if extra
                else f"it holds nothing for {missing[0]}, which adapter.targets train")
        raise TrainingError(f"adapter.init_from: {path}: {what}; set adapter.targets to the file's modules")
    scale = alpha / rank
    with torch.no_grad():
        for name, (a, b, file_scale) in pairs.items():
            layer = layers[name]
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if a.shape[0] != rank:
                raise TrainingError(f"adapter.init_from: {path}: {keys[name]} has rank {a.shape[0]}, adapter.rank is "
                                    f"{rank}: set adapter.rank={a.shape[0]}")
            if a.shape[1] != down.shape[1] or b.shape[0] != up.shape[0]:
                raise TrainingError(f"adapter.init_from: {path}: {keys[name]} is for a [{b.shape[0]} x {a.shape[1]}] "
                                    f"layer, {name} is [{up.shape[0]} x {down.shape[1]}] here: a LoRA of another model?")
            down.copy_(a.to(down.dtype))
            up.copy_((b.double() * (file_scale / scale)).to(up.dtype))
    return len(pairs)


def check_init_files(recipe: Recipe, variant: Variant, experts: list[str]) -> None:
    """A fresh start's files are there (said before a model loads)."""
    for expert in experts:
        source = init_file(recipe, variant, expert)
        if source is not None and not source.is_file():
            raise TrainingError(f"adapter.init_from: {source}: no such file")


def init_facts(recipe: Recipe, checkpoint: Path | None = None) -> list[dict]:
    """What state.json records of the files the run started from: name and sha256 (a resumed run
    carries what its checkpoint recorded: the files may be gone since)."""
    if checkpoint is not None:
        from .checkpoint import read_state

        saved = read_state(checkpoint)[0] or {}
        return list((saved.get("training") or {}).get("init_from", []))
    return [{"file": Path(p).name, "sha256": hashlib.sha256(Path(p).expanduser().read_bytes()).hexdigest()}
            for p in recipe.adapter.init_from if Path(p).expanduser().is_file()]


def _expert_header(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("wan_tune.expert")
    except Exception:  # unreadable: start_from names the problem
        return None
