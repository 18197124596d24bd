"""Rules that involve more than one key, run on the merged recipe before any model loads."""

from __future__ import annotations

import difflib
import string
from pathlib import Path

from ..models.lora_targets import FACE_PRESET, PRESET_NAMES, VACE_PRESET, expand_targets, matching, module_widths
from ..models.variants import VARIANTS, Variant, get_variant
from .schema import AdapterConfig, Recipe
from .sources import all_frames, all_resolutions, data_sources, source_errors

LORA_ONLY_KEYS = ("rank", "alpha", "dropout", "targets", "lr_ratio", "init_from", "lokr_factor", "decompose_both")
# Top-level modules of WanTransformer3DModel outside its blocks (a target naming one trains there).
OUTSIDE_BLOCKS = ("condition_embedder", "patch_embedding", "proj_out", "norm_out", "vace_patch_embedding")


def cross_field_errors(r: Recipe, explicit: set[str], invalid: set[str]) -> list[tuple[str, str]]:
    """(key, message) for every rule the recipe breaks; `explicit` = keys the user wrote,
    `invalid` = keys already reported (rules about the variant are skipped if it was invalid)."""
    variant = None if "model.variant" in invalid else VARIANTS.get(r.model.variant)
    errors = _task_errors(r, variant)
    errors += _full_errors(r, explicit) if r.adapter.method == "full" else _lora_errors(r, variant, invalid)
    errors += _template_errors(r) + source_errors(r, explicit)
    errors += _schedule_errors(r, variant, explicit, invalid)
    if variant is not None:
        errors += _variant_errors(r, variant, invalid) + _shared_errors(r, variant)
    if r.train.context_parallel > 1:
        errors += _context_parallel_errors(r, variant)
    if r.train.route_ratio or r.train.routes:
        errors += _routing_errors(r, variant)
    if r.validation.every and not r.validation.prompts:
        errors.append(("validation.prompts", "validation.every is set but there are no prompts; add prompts or set every=0"))
    return errors


def _task_errors(r: Recipe, variant: Variant | None) -> list[tuple[str, str]]:
    if variant is None or r.data.task in ("auto", variant.task) or variant.image_conditioned(r.data.task):
        return []
    return [("data.task", f"data.task={r.data.task} does not fit model.variant={variant.name}, a {variant.task.upper()} model; "
                          f"set data.task=auto or use one of: {', '.join(n for n, v in VARIANTS.items() if v.task == r.data.task)}")]


def _full_errors(r: Recipe, explicit: set[str]) -> list[tuple[str, str]]:
    errors = []
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
    return errors


def _lora_errors(r: Recipe, variant: Variant | None, invalid: set[str]) -> list[tuple[str, str]]:
    errors = []
    for t in r.adapter.targets:
        if "." not in t and t not in PRESET_NAMES:
            close = difflib.get_close_matches(t, PRESET_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(PRESET_NAMES)}"
            errors.append(("adapter.targets", f"{t!r} is neither a preset nor a module name like 'attn1.to_q'{hint}"))
        elif t == VACE_PRESET and variant is not None and not variant.vace:
            errors.append(("adapter.targets", f"{VACE_PRESET}: {variant.name} has no VACE blocks (the VACE variants: "
                           f"{', '.join(n for n, v in VARIANTS.items() if v.vace)})"))
        elif t == FACE_PRESET and variant is not None and not variant.animate:
            errors.append(("adapter.targets", f"{FACE_PRESET}: {variant.name} has no face adapters (Wan2.2-Animate's: "
                           f"{', '.join(n for n, v in VARIANTS.items() if v.animate)})"))
    lycoris = r.adapter.method in ("loha", "lokr")
    if lycoris and FACE_PRESET in r.adapter.targets:  # ComfyUI's face adapters hold key and value as one weight
        errors.append(("adapter.targets", f"{FACE_PRESET} with {r.adapter.method}: ComfyUI fuses each face adapter's key "
                       "and value into one weight, which two LoHa / LoKr updates are not; use adapter.method=lora"))
    if lycoris and r.adapter.lr_ratio not in (None, 1):
        errors.append(("adapter.lr_ratio", f"LoRA+ speeds up a LoRA's up (B) matrices; {r.adapter.method} has none: "
                       "leave adapter.lr_ratio empty, or use adapter.method=lora"))
    if lycoris and r.adapter.init_from:
        errors.append(("adapter.init_from", f"reads LoRA pairs; it cannot start a {r.adapter.method} adapter: use "
                       "adapter.method=lora, or leave adapter.init_from empty"))
    if lycoris and r.export.format in ("diffusers", "kohya"):
        errors.append(("export.format", f"{r.export.format} holds LoRA pairs only, not {r.adapter.method}: set "
                       "export.format=comfyui (ComfyUI and wan-tune sample load it) or all"))
    if r.adapter.method == "dora":
        errors += _dora_errors(r)
    if not r.adapter.targets:
        errors.append(("adapter.targets", "a LoRA needs at least one target"))
    elif variant is not None and not {"adapter.targets", "adapter.rank"} & invalid:
        errors += target_errors(r.adapter.targets, r.adapter.rank, variant)
    outside = [t for t in r.adapter.targets if t.split(".")[0] in OUTSIDE_BLOCKS or t.startswith((VACE_PRESET, "face_adapter"))]
    if outside and r.export.format == "kohya":  # `all` writes the formats that can hold it and names the rest
        errors.append(("export.format", f"kohya cannot carry adapters outside the transformer blocks "
                       f"({', '.join(outside)}): set export.format=comfyui, diffusers or all"))
    return errors


def _dora_errors(r: Recipe) -> list[tuple[str, str]]:
    errors = []
    if r.export.format in ("comfyui", "kohya"):
        errors.append(("export.format", f"{r.export.format} cannot hold peft's DoRA exactly (ComfyUI's dora_scale "
                       "normalises another axis): set export.format=diffusers (or all)"))
    if r.train.fp8_base:
        errors.append(("train.fp8_base", "DoRA reads the base weights' row norms in every forward; keep them in "
                       "model.dtype (train.fp8_base=false), or use adapter.method=lora"))
    if r.adapter.init_from:
        errors.append(("adapter.init_from", "reads LoRA pairs; a DoRA's magnitudes would not match it: use "
                       "adapter.method=lora, or leave adapter.init_from empty"))
    return errors


def _template_errors(r: Recipe) -> list[tuple[str, str]]:
    """caption.template, and each source's own."""
    errors = []
    templates = [("caption.template", r.caption.template)]
    templates += [(f"data.sources[{i}].template", s.template) for i, s in enumerate(r.data.sources) if s.template is not None]
    for key, template in templates:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as err:
            errors.append((key, f"not a valid template ({err}); write literal braces as {{{{ and }}}}"))
            continue
        unknown = fields - {"trigger", "stem", "caption"}
        if unknown:
            errors.append((key, f"unknown placeholder(s) {sorted(unknown)}; use {{trigger}}, {{stem}}, {{caption}}"))
    return errors


def _schedule_errors(r: Recipe, variant: Variant | None, explicit: set[str], invalid: set[str]) -> list[tuple[str, str]]:
    """Offload, held-out, sigma range and warmup rules."""
    errors = []
    if r.train.offload == "blocks" and not r.train.gradient_checkpointing:
        errors.append(("train.offload", "blocks needs train.gradient_checkpointing=true (without it the backward keeps "
                       "every block's weights on the GPU, so offloading saves nothing)"))
    if r.train.activation_offload and not r.train.gradient_checkpointing:
        errors.append(("train.activation_offload", "moves the block inputs that gradient checkpointing keeps: set "
                       "train.gradient_checkpointing=true (without it every activation stays on the GPU)"))
    if r.train.attention_checkpointing and not r.train.gradient_checkpointing:
        errors.append(("train.attention_checkpointing", "splits the recompute that gradient checkpointing runs: set "
                       "train.gradient_checkpointing=true"))
    if r.train.offload == "none" and "train.offload_keep" in explicit and r.train.offload_keep:
        errors.append(("train.offload_keep", "counts the blocks kept on the GPU under train.offload=blocks; set that too"))
    if variant is not None and r.train.offload_keep >= variant.transformer["num_layers"] and "train.offload_keep" not in invalid:
        n = variant.transformer["num_layers"]
        errors.append(("train.offload_keep", f"{variant.name} has {n} blocks: keep 0 to {n - 1} on the GPU "
                       "(keeping them all is train.offload=none)"))
    if not any(s.holdout for s in data_sources(r)) and not r.data.holdout and "eval.every" in explicit and r.eval.every:
        errors.append(("eval.every", "scores the held-out samples, but data.holdout=0 holds none out; set data.holdout (e.g. 0.1)"))
    if r.timesteps.sigma_min >= r.timesteps.sigma_max:
        errors.append(
            ("timesteps.sigma_min", f"must be below timesteps.sigma_max ({r.timesteps.sigma_min} >= {r.timesteps.sigma_max})")
        )
    if r.train.optimizer == "schedulefree_adamw" and r.train.lr_schedule != "constant":
        errors.append(("train.lr_schedule", f"{r.train.lr_schedule}: schedulefree_adamw replaces the schedule (it averages "
                       "its iterates instead of decaying the lr); set train.lr_schedule=constant"))
    if r.train.ema_decay and r.train.optimizer == "schedulefree_adamw":
        errors.append(("train.ema_decay", "schedulefree_adamw already averages its weights (what it scores, renders and "
                       "saves); set train.ema_decay=0, or pick another optimizer"))
    if r.export.weights == "ema" and not r.train.ema_decay and "export.weights" in explicit:
        errors.append(("export.weights", "ema needs the average train.ema_decay keeps; set train.ema_decay (e.g. 0.999)"))
    if r.train.warmup_steps >= r.train.steps:
        errors.append(("train.warmup_steps", f"must be below train.steps ({r.train.warmup_steps} >= {r.train.steps})"))
    return errors


def _shared_errors(r: Recipe, variant: Variant) -> list[tuple[str, str]]:
    """model.expert_mode=shared: one adapter over both A14B experts."""
    if r.model.expert_mode != "shared":
        return []
    if not variant.two_experts:
        return [("model.expert_mode", f"shared puts one LoRA on both experts of a Wan2.2 A14B model; {variant.name} has one "
                 "transformer: leave model.expert_mode=separate")]
    why = ("model.experts" if len(set(r.model.experts)) == 1 else None, "adapter.method" if r.adapter.method == "full" else None,
           "train.lr_high_noise" if r.train.lr_high_noise != 1 else None)
    messages = {"model.experts": "trains one expert; shared needs both (model.experts empty)",
                "adapter.method": "full trains each expert's own weights; shared shares an adapter (lora, loha or lokr)",
                "train.lr_high_noise": "gives the high-noise expert its own lr; a shared adapter has one (set it to 1)"}
    return [(key, f"{messages[key]}, with model.expert_mode=shared") for key in why if key]


def _variant_errors(r: Recipe, variant: Variant, invalid: set[str]) -> list[tuple[str, str]]:
    """What the chosen variant cannot take: expert settings, sizes, first frames."""
    errors = []
    if r.validation.guidance_scale_2 is not None and not variant.two_experts:
        errors.append(("validation.guidance_scale_2", f"is the low-noise expert's guidance; {variant.name} has one transformer"))
    if r.model.experts and not variant.two_experts:
        errors.append(("model.experts", f"{variant.name} has one transformer; model.experts is for Wan2.2 A14B (two experts)"))
    if variant.vae_z_dim == 48:
        # The Wan2.2 VAE compresses 16x and the transformer patchifies 2x2: 32-pixel steps.
        bad = [f"{h}x{w}" for h, w in all_resolutions(r) if h % 32 or w % 32]
        if bad and "data.resolutions" not in invalid:
            errors.append(("data.resolutions", f"{variant.name} needs multiples of 32 (its VAE compresses 16x, patches are 2x2): {', '.join(bad)}"))
    if not {"data.resolutions", "data.frames", "validation.frames"} & invalid:
        errors += resolution_errors(r, variant)
    v = r.validation
    if v.images and not variant.image_conditioned(r.data.task):
        errors.append(("validation.images", f"first frames are for I2V variants; {variant.name} is text-to-video"))
    if variant.image_conditioned(r.data.task) and v.every and len(v.images) not in (0, len(v.prompts)):
        errors.append(
            ("validation.images", f"I2V validation takes one first frame per prompt ({len(v.images)} images, {len(v.prompts)} "
                                  "prompts), or none: then the first frames of held-out clips (else of the first clips)")
        )
    if v.last_images and not variant.last_frame:
        errors.append(("validation.last_images", f"last frames are for FLF2V variants; {variant.name} takes a first frame at most"))
    if variant.last_frame and v.every and len(v.last_images) != len(v.images):
        errors.append(("validation.last_images", f"FLF2V validation takes a last frame for each first frame ({len(v.images)} "
                                                 f"validation.images, {len(v.last_images)} last_images), or neither: then "
                                                 "both come from clips"))
    return errors + _vace_validation_errors(r, variant)


def _vace_validation_errors(r: Recipe, variant: Variant) -> list[tuple[str, str]]:
    v, errors = r.validation, []
    for key in ("references", "controls", "masks"):
        given = getattr(v, key)
        if key == "references" and variant.animate:  # the character of each prompt: one image or none
            errors += [("validation.references", f"entry {i}: Wan2.2-Animate takes one character image per prompt, "
                        f"got {len(p.split(';'))}") for i, p in enumerate(given) if ";" in p.strip(" ;")]
            if given and len(given) != len(v.prompts):
                errors.append(("validation.references", f"one entry per prompt ({len(given)} for {len(v.prompts)} "
                                                        "prompts; an empty entry: the clip's own reference)"))
            continue
        if given and not variant.vace:
            errors.append((f"validation.{key}", f"is for VACE variants; {variant.name} is not one"))
        elif given and len(given) != len(v.prompts):
            errors.append((f"validation.{key}", f"one entry per prompt ({len(given)} for {len(v.prompts)} prompts; an "
                                                "empty entry gives none)"))
    for i, (control, mask) in enumerate(zip(v.controls or [""] * len(v.masks), v.masks)):
        if mask and not control:
            errors.append(("validation.masks", f"entry {i} masks no control video: give validation.controls[{i}]"))
    return errors


def target_errors(targets: list[str], rank: int, variant: Variant) -> list[tuple[str, str]]:
    """Module names that match nothing in the variant (peft would stop at load time), and a rank
    wider than a targeted layer (min of its in/out features: the update cannot have more rank)."""
    widths = module_widths(variant)
    errors = []
    for t in targets:
        if t not in PRESET_NAMES and "." in t and not matching(t, widths):
            names = sorted({m.split(".", 2)[2] if m.startswith("blocks.") else m for m in widths})
            close = difflib.get_close_matches(t, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "block modules are named like attn1.to_q, attn2.to_out.0, ffn.net.2"
            errors.append(("adapter.targets", f"{t!r} names no module of {variant.name}; {hint}"))
    picked = {m for t in expand_targets(targets, variant) for m in matching(t, widths) if widths[m] is not None}
    if picked:
        narrow = min(picked, key=lambda m: (min(widths[m]), m))
        width = min(widths[narrow])
        if rank > width:
            errors.append(("adapter.rank", f"{rank} is above the width of {narrow} ({widths[narrow][0]} in, "
                           f"{widths[narrow][1]} out) in {variant.name}: a LoRA's rank is at most {width} there"))
    return errors


def resolution_errors(r: Recipe, variant: Variant) -> list[tuple[str, str]]:
    """Sizes the variant's rotary position table cannot reach (`rope_max_seq_len` positions per
    axis, of latent frames and of patches): its forward fails on the first step of such a clip."""
    positions = variant.transformer["rope_max_seq_len"]
    pixels = (16 if variant.vae_z_dim == 48 else 8) * variant.transformer["patch_size"][1]  # per patch
    longest = positions * pixels
    errors = []
    for h, w in all_resolutions(r):
        side = max(h, w, int(2 * (h * w) ** 0.5) + 16)  # the 1:4 aspect buckets of that area reach about 2 sqrt(area)
        if side > longest:
            errors.append(("data.resolutions", f"[{h}, {w}] makes aspect buckets up to {side} px on a side; {variant.name} "
                           f"holds at most {longest} ({positions} positions x {pixels} px)"))
    for key, frames in [("data.frames", n) for n in all_frames(r)] + [("validation.frames", r.validation.frames)]:
        if (frames - 1) // 4 + 1 > positions:
            errors.append((key, f"{frames} frames are {(frames - 1) // 4 + 1} latent frames; {variant.name} holds at most {positions}"))
    for key, side in (("validation.height", r.validation.height), ("validation.width", r.validation.width)):
        if side is not None and side > longest:
            errors.append((key, f"{side} px is beyond the {longest} px {variant.name} holds"))
    return errors


def _routing_errors(r: Recipe, variant: Variant | None) -> list[tuple[str, str]]:
    """train.route_ratio / train.routes: spans the model has, in order; not with context parallelism or VACE (yet)."""
    from ..models.token_routing import route_spans

    errors = []
    key = "train.route_ratio" if r.train.route_ratio else "train.routes"
    if r.train.route_ratio and r.train.routes:
        return [("train.routes", "train.route_ratio is set too: give one route by route_ratio, or several by routes "
                 "(set route_ratio=0)")]
    if variant is not None:
        try:
            route_spans(variant.transformer["num_layers"], r.train)
        except ValueError as err:
            where, _, what = str(err).partition(": ")
            errors.append((where, f"{variant.name}: {what}"))
        if variant.vace or variant.animate:
            what = "VACE hints to" if variant.vace else "its face adapters' output (per frame) to"
            errors.append((key, f"{variant.name} adds {what} the tokens between blocks, in their order; routing "
                           "reorders them inside its span: not built for it yet (set it to 0)"))
    if r.train.context_parallel > 1:
        errors.append((key, "routes a clip's tokens on one process; with train.context_parallel each "
                       "holds a share of them: not built yet (set it to 0, or train.context_parallel=1)"))
    return errors


def _context_parallel_errors(r: Recipe, variant: Variant | None) -> list[tuple[str, str]]:
    """What context parallelism runs with: no block offload; Ulysses needs a degree that divides the
    heads (the launch checks the world size, the data the token counts)."""
    cp, errors = r.train.context_parallel, []
    if r.train.offload != "none":
        errors.append(("train.offload", f"blocks does not run with train.context_parallel={cp} yet: set train.offload=none "
                       "(context parallelism already divides the activations)"))
    if variant is None:
        return errors
    if variant.vace or variant.animate:  # diffusers' VACE and Animate transformers have no _cp_plan to split tokens by
        errors.append(("train.context_parallel", f"diffusers 0.42 cannot split {variant.name} ({variant.kind}) across "
                       "processes yet: set train.context_parallel=1 (activation offload or train.ffn_chunks shrink one "
                       "clip's activations instead)"))
        return errors
    heads = variant.transformer["num_attention_heads"]
    if r.train.context_parallel_kind == "ulysses" and heads % cp:
        fits = ", ".join(str(d) for d in range(2, heads + 1) if heads % d == 0)
        errors.append(("train.context_parallel", f"{variant.name} has {heads} attention heads and Ulysses splits them "
                       f"across the group: use a degree that divides {heads} ({fits}), or "
                       "train.context_parallel_kind=ring"))
    return errors


def missing_inputs(r: Recipe) -> list[tuple[str, str]]:
    """The validation inputs a recipe names that are not files here (what the first render would
    fail on, hours in): for `check` and for the trainer's start. Not a load rule: a checkpoint's
    recipe.yaml must still load (export) where those files are gone."""
    v = r.validation
    named = [("images", i, p) for i, p in enumerate(v.images)] + [("last_images", i, p) for i, p in enumerate(v.last_images)]
    named += [("controls", i, p) for i, p in enumerate(v.controls)]
    named += [("references", i, p.strip()) for i, entry in enumerate(v.references) for p in entry.split(";")]
    return [(f"validation.{key}[{i}]", f"no such file: {p}") for key, i, p in named if p and not Path(p).expanduser().is_file()]


def unused_settings(r: Recipe, cli_keys: set[str]) -> list[str]:
    """Settings that change nothing for this recipe (one warning line each)."""
    from .schema import TrackingConfig, VaceConfig

    notes = []
    variant = get_variant(r.model.variant) if r.model.variant in VARIANTS else None
    if variant is not None and not variant.vace and r.vace != VaceConfig():
        notes.append(f"vace.* settings do nothing for {variant.name} (not a VACE model)")
    if r.train.optimizer == "prodigy" and r.train.lr < 0.1:
        notes.append(f"train.optimizer=prodigy estimates its own step size and multiplies it by train.lr "
                     f"({r.train.lr:g} here): Prodigy's authors use 1.0")
    typed = "tracking.log_artifacts" in cli_keys or r.tracking.log_artifacts != TrackingConfig().log_artifacts
    if r.tracking.backend != "wandb" and r.tracking.log_artifacts != "none" and typed:
        notes.append(f"tracking.log_artifacts={r.tracking.log_artifacts} does nothing with tracking.backend="
                     f"{r.tracking.backend} (artifacts are W&B's)")
    return notes
