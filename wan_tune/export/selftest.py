"""Load what export wrote with diffusers' own loader and compare, module by module.

"No error" proves nothing: diffusers silently ignores a LoRA dict without the `transformer.`
prefix, and a lost alpha only rescales the update. So each written file is loaded into a
transformer of the same architecture through `WanPipeline.load_lora_weights`, and every
module's effective update (scale * B @ A, as peft computes it) is compared with the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.keymap import to_original
from ..models.variants import Variant, pipeline_class, transformer_class
from .adapters import Adapter, read_original

# Above this size the check model is materialised in bf16 to halve its memory.
FP32_LIMIT = 2e9


@dataclass
class Check:
    file: str
    modules: int
    max_rel_error: float
    tolerance: float
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem and self.max_rel_error <= self.tolerance


def empty_transformer(variant: Variant, dtype: torch.dtype | None = None):
    """A transformer of the variant's architecture with uninitialised weights (no random-init cost)."""
    with torch.device("meta"):
        model = transformer_class(variant)(**variant.transformer)
    params = sum(p.numel() for p in model.parameters())
    dtype = dtype or (torch.float32 if params <= FP32_LIMIT else torch.bfloat16)
    model = model.to_empty(device="cpu")
    return model if dtype == torch.float32 else model.to(dtype)


def original_module_names(variant: Variant) -> set[str]:
    with torch.device("meta"):
        model = transformer_class(variant)(**variant.transformer)
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            try:
                out.add(to_original(name))
            except KeyError:
                pass
    return out


def check_original_keys(state_dict: dict, variant: Variant, prefix: str) -> list[str]:
    """Keys whose module is not a Linear of the original-key model (ComfyUI would drop them)."""
    known = original_module_names(variant)
    bad = []
    for key in state_dict:
        module = key[len(prefix):].rsplit(".", 2)[0] if key.endswith(".weight") else key[len(prefix):].rsplit(".", 1)[0]
        if module not in known:
            bad.append(key)
    return bad


def diffusers_reads(adapter: Adapter, fmt: str) -> bool:
    """Whether diffusers' loader takes the file: its converter of original-key files (0.42) knows
    the main blocks and embedders, not VACE's blocks nor Animate's face adapters."""
    return fmt == "diffusers" or not any(m.startswith(("vace_blocks.", "face_adapter.")) for m in adapter.pairs)


def check_original_file(path, adapter: Adapter, variant: Variant) -> Check:
    """An original-key (ComfyUI) file read back key by key, where diffusers cannot read it: every
    module must be a Linear of the original-key model (ComfyUI applies a LoRA key to the model
    weight of the same name) and its update, alpha / rank * up @ down, the trained one."""
    def updates(sd):
        return {m: scale * (up.float() @ down.float()) for m, (down, up, scale) in read_original(sd).items()}

    return _check_original_updates(path, adapter, variant, updates)


def check_lycoris_file(path, adapter, variant: Variant) -> Check:
    """A LoHa / LoKr file read back as ComfyUI reads it (export/lycoris.py): every key names a
    Linear of the original-key model, and each module's update, computed by ComfyUI's formulas,
    is the one peft trained."""
    from .lycoris import comfyui_updates

    return _check_original_updates(path, adapter, variant, comfyui_updates)


def _check_original_updates(path, adapter, variant: Variant, updates) -> Check:
    """`updates(state_dict)` -> {module: update} of an original-key file, against the trained ones."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    bad = check_original_keys(sd, variant, "diffusion_model.")
    if bad:
        return Check(str(path), 0, float("inf"), 1e-5, f"keys that name no Linear of {variant.name}: {bad[:2]}")
    got = updates(sd)
    if set(got) != set(adapter.modules):
        return Check(str(path), len(got), float("inf"), 1e-5, f"{len(got)} modules in the file, {len(adapter.modules)} trained")
    worst = 0.0
    for module, update in got.items():
        want = adapter.delta(module)
        if update.shape != want.shape:
            return Check(str(path), len(got), float("inf"), 1e-5, f"{module}: update {tuple(update.shape)}, trained "
                         f"{tuple(want.shape)}")
        worst = max(worst, ((update - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    return Check(str(path), len(got), worst, 1e-5)


def check_adapter_file(path, adapter: Adapter, variant: Variant, expert: str = "transformer", fmt: str = "") -> Check:
    """`expert="transformer_2"`: an A14B low-noise file, loaded the way diffusers users load it,
    into the pipeline's `transformer_2` with `load_into_transformer_2=True`. A file diffusers
    cannot read (a VACE-block LoRA in original keys) is read back by `check_original_file`."""
    if not diffusers_reads(adapter, fmt):
        return check_original_file(path, adapter, variant)
    model = empty_transformer(variant)
    tol = 1e-5 if model.dtype == torch.float32 else 2e-2
    parts = dict(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model, transformer_2=None)
    if variant.animate:  # WanAnimatePipeline: one transformer, and the CLIP it reads the reference with
        parts = dict(parts, image_encoder=None, image_processor=None)
        del parts["transformer_2"]
    if expert == "transformer_2":
        # diffusers reads `transformer.config` even when loading into transformer_2: a
        # weightless (meta) high-noise expert answers that without the memory of a second model.
        with torch.device("meta"):
            parts.update(transformer=transformer_class(variant)(**variant.transformer), transformer_2=model,
                         boundary_ratio=variant.boundary_ratio)
    pipe = pipeline_class(variant)(**parts)
    pipe.load_lora_weights(str(path), adapter_name="selftest", load_into_transformer_2=expert == "transformer_2")
    loaded = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "selftest" in getattr(m, "lora_A", {})}
    if loaded != set(adapter.pairs):
        missing, extra = sorted(set(adapter.pairs) - loaded), sorted(loaded - set(adapter.pairs))
        return Check(str(path), len(loaded), float("inf"), tol,
                     f"diffusers applied the LoRA to {len(loaded)} of {len(adapter.pairs)} modules "
                     f"(missing {missing[:2]}, unexpected {extra[:2]})")
    worst = 0.0
    for module in adapter.pairs:
        layer = model.get_submodule(module)
        got = layer.get_delta_weight("selftest").float()
        want = adapter.delta(module)
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
        if adapter.magnitudes:  # DoRA: its row magnitudes arrived too (the update alone would not show a lost one)
            if "selftest" not in layer.lora_magnitude_vector:
                return Check(str(path), len(loaded), float("inf"), tol, f"{module}: loaded without its DoRA magnitudes")
            got_m, want_m = layer.lora_magnitude_vector["selftest"].weight.float(), adapter.magnitudes[module].float()
            worst = max(worst, ((got_m - want_m).abs().max() / want_m.abs().max().clamp_min(1e-12)).item())
    return Check(str(path), len(loaded), worst, tol)

