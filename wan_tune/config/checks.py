"""Rules that involve more than one key, run on the merged recipe before any model loads."""

from __future__ import annotations

import difflib
import string

from ..models.lora_targets import PRESETS
from ..models.variants import VARIANTS
from .schema import AdapterConfig, Recipe

LORA_ONLY_KEYS = ("rank", "alpha", "dropout", "targets")
# Top-level modules of WanTransformer3DModel outside its blocks (a target naming one trains there).
OUTSIDE_BLOCKS = ("condition_embedder", "patch_embedding", "proj_out", "norm_out")


def cross_field_errors(r: Recipe, explicit: set[str], invalid: set[str]) -> list[tuple[str, str]]:
    """(key, message) for every rule the recipe breaks; `explicit` = keys the user wrote,
    `invalid` = keys already reported (rules about the variant are skipped if it was invalid)."""
    errors: list[tuple[str, str]] = []
    variant = None if "model.variant" in invalid else VARIANTS.get(r.model.variant)

    if variant is not None and r.data.task not in ("auto", variant.task) and not variant.image_conditioned(r.data.task):
        errors.append(
            (
                "data.task",
                f"data.task={r.data.task} does not fit model.variant={variant.name}, a {variant.task.upper()} model; "
                f"set data.task=auto or use one of: {', '.join(n for n, v in VARIANTS.items() if v.task == r.data.task)}",
            )
        )

    if r.adapter.method == "full":
        defaults = AdapterConfig()
        for key in LORA_ONLY_KEYS:
            # Only keys typed on the command line are still set here: the loader resets the
            # recipe file's LoRA keys with a warning, and a saved, resolved recipe lists every
            # key at its default and must load back.
            if f"adapter.{key}" in explicit and getattr(r.adapter, key) != getattr(defaults, key):
                errors.append((f"adapter.{key}", "is a LoRA setting, but adapter.method=full; drop it from the command line"))
        if r.train.fp8_base:
            errors.append(
                ("train.fp8_base", "stores frozen base weights in fp8, but a full fine-tune trains them; use adapter.method=lora")
            )
        if r.train.offload != "none":
            errors.append(("train.offload", "streams frozen base weights, but a full fine-tune trains them all; use adapter.method=lora, "
                           "or DeepSpeed ZeRO-3 / FSDP to spread a full fine-tune over GPUs"))
    else:
        for t in r.adapter.targets:
            if "." not in t and t not in PRESETS:
                close = difflib.get_close_matches(t, PRESETS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(PRESETS)}"
                errors.append(("adapter.targets", f"{t!r} is neither a preset nor a module name like 'attn1.to_q'{hint}"))
        if not r.adapter.targets:
            errors.append(("adapter.targets", "a LoRA needs at least one target"))
        outside = [t for t in r.adapter.targets if t.split(".")[0] in OUTSIDE_BLOCKS]
        if outside and r.export.format in ("kohya", "all"):
            errors.append(("export.format", f"{r.export.format} includes kohya, which cannot carry adapters outside the "
                           f"transformer blocks ({', '.join(outside)}): set export.format=comfyui or diffusers"))

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(r.caption.template) if name is not None}
        unknown = fields - {"trigger", "stem", "caption"}
        if unknown:
            errors.append(("caption.template", f"unknown placeholder(s) {sorted(unknown)}; use {{trigger}}, {{stem}}, {{caption}}"))
    except ValueError as err:
        errors.append(("caption.template", f"not a valid template ({err}); write literal braces as {{{{ and }}}}"))

    if r.train.offload == "blocks" and not r.train.gradient_checkpointing:
        errors.append(("train.offload", "blocks needs train.gradient_checkpointing=true (without it the backward keeps "
                       "every block's weights on the GPU, so offloading saves nothing)"))
    if r.train.offload == "none" and "train.offload_keep" in explicit and r.train.offload_keep:
        errors.append(("train.offload_keep", "counts the blocks kept on the GPU under train.offload=blocks; set that too"))
    if variant is not None and r.train.offload_keep >= variant.transformer["num_layers"] and "train.offload_keep" not in invalid:
        n = variant.transformer["num_layers"]
        errors.append(("train.offload_keep", f"{variant.name} has {n} blocks: keep 0 to {n - 1} on the GPU "
                       "(keeping them all is train.offload=none)"))
    if r.data.holdout == 0 and "eval.every" in explicit and r.eval.every:
        errors.append(("eval.every", "scores the held-out samples, but data.holdout=0 holds none out; set data.holdout (e.g. 0.1)"))
    if r.timesteps.sigma_min >= r.timesteps.sigma_max:
        errors.append(
            ("timesteps.sigma_min", f"must be below timesteps.sigma_max ({r.timesteps.sigma_min} >= {r.timesteps.sigma_max})")
        )
    if r.train.warmup_steps >= r.train.steps:
        errors.append(("train.warmup_steps", f"must be below train.steps ({r.train.warmup_steps} >= {r.train.steps})"))

    if variant is not None and r.validation.guidance_scale_2 is not None and not variant.two_experts:
        errors.append(("validation.guidance_scale_2", f"is the low-noise expert's guidance; {variant.name} has one transformer"))
    if variant is not None and r.model.experts and not variant.two_experts:
        errors.append(("model.experts", f"{variant.name} has one transformer; model.experts is for Wan2.2 A14B (two experts)"))
    if variant is not None and variant.vae_z_dim == 48:
        # The Wan2.2 VAE compresses 16x and the transformer patchifies 2x2: 32-pixel steps.
        bad = [f"{h}x{w}" for h, w in r.data.resolutions if h % 32 or w % 32]
        if bad and "data.resolutions" not in invalid:
            errors.append(("data.resolutions", f"{variant.name} needs multiples of 32 (its VAE compresses 16x, patches are 2x2): {', '.join(bad)}"))

    v = r.validation
    if variant is not None:
        if v.images and not variant.image_conditioned(r.data.task):
            errors.append(("validation.images", f"first frames are for I2V variants; {variant.name} is text-to-video"))
        if variant.image_conditioned(r.data.task) and v.every and len(v.images) not in (0, len(v.prompts)):
            errors.append(
                ("validation.images", f"I2V validation takes one first frame per prompt ({len(v.images)} images, {len(v.prompts)} "
                                      "prompts), or none: then the first frames of held-out clips (else of the first clips)")
            )
    if v.every and not v.prompts:
        errors.append(("validation.prompts", "validation.every is set but there are no prompts; add prompts or set every=0"))
    return errors

