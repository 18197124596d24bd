"""`wan-tune export CHECKPOINT`: adapters (or the full transformer), each self-tested.

The recipe comes from the checkpoint's recipe.yaml, so no flags are needed. Files go to
`<checkpoint>/export/` unless `--out` says otherwise, delivered as one piece (export/delivery.py):
staged and self-tested first, nothing under a final name before every check passed, nothing
overwritten that this export did not write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..config import Recipe, load_recipe, recipe_hash
from ..data.atomic import save_tensors, writable_problem
from ..models.keymap import state_dict_to_original
from ..models.variants import Variant, expert_label, get_variant, transformer_class
from ..training.checkpoint import digest_mismatch, expert_file, read_state
from ..training.facts import recipe_drift
from ..training.heldout import EMA_SCORE
from .adapters import (
    FORMATS,
    Adapter,
    ExportError,
    adapter_from_trainable,
    comfyui_state_dict,
    diffusers_metadata,
    diffusers_state_dict,
    in_blocks,
    kohya_state_dict,
    listing,
)
from .card import run_facts, write_share_files
from .delivery import MANIFEST, Delivery, DeliveryError
from .lycoris import PARTS, Lycoris, comfyui_lycoris_state_dict, lycoris_from_trainable
from .selftest import Check, check_adapter_file, check_lycoris_file, check_original_keys, empty_transformer

REQUIRED = ("recipe.yaml", "state.json")


def resolve_checkpoint(path: str | Path) -> Path:
    """`<run>/best` (no such folder) means the checkpoint `<run>/best.json` names: the lowest held-out loss."""
    from ..training.checkpoint import BEST_FILE, CheckpointError, best_checkpoint

    path = Path(path)
    if path.name != "best" or path.exists():
        return path
    try:
        best = best_checkpoint(path.parent)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if best is None:
        why = "names a checkpoint that no longer exists" if (path.parent / BEST_FILE).is_file() else "does not exist"
        raise ExportError(f"{path}: {path.parent / BEST_FILE} {why}; the best checkpoint is recorded by runs with "
                          "data.holdout > 0 (the held-out loss). Give a step folder instead")
    return best


def read_checkpoint(path: str | Path, say=print, weights: str | None = None
                    ) -> tuple[Recipe, dict, dict[str, dict[str, torch.Tensor]]]:
    """(recipe, state, {expert: trainable weights}) of a step folder, or a clear ExportError.
    One expert (`transformer`) except for Wan2.2 A14B runs. The recipe is the folder's recipe.yaml
    with what state.json recorded of the training in place of any of it edited since (named), and
    its export.weights resolved (`weights`, else the recipe's; empty: `ema` when the checkpoint
    keeps an average): which file the weights are read from."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a checkpoint folder (expected checkpoints/<run>/step-NNNNNN/ or checkpoints/<run>/best)")
    state, why = read_state(path)
    if state is None and why != "no state.json":
        raise ExportError(f"{path}: {why}; export another checkpoint of the run")
    state = state or {}
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ExportError(f"{path} is missing {', '.join(missing)}: not a complete wan-tune checkpoint")
    recipe = load_recipe(path / "recipe.yaml")
    drift = recipe_drift(recipe, state)
    if drift:
        say(f"note: {path / 'recipe.yaml'} was edited since the run ({'; '.join(f'{k}: {v!r} there, {t!r} trained' for k, v, t in drift)}): "
            "the export uses what was trained (state.json)")
        recipe = load_recipe(path / "recipe.yaml", [f"{k}={json.dumps(t)}" for k, _, t in drift])
    recipe.export.weights = _which_weights(weights or recipe.export.weights, state, path)
    files = weight_files(recipe, state)
    missing = [f for f in files.values() if not (path / f).is_file()]
    if missing:
        raise ExportError(f"{path} is missing {', '.join(missing)}: not a complete wan-tune checkpoint")
    damage = digest_mismatch(path, state, list(files.values()))
    if damage:
        raise ExportError(f"{damage}; export another checkpoint of the run")
    loaded = {}
    for expert, file in files.items():
        try:
            loaded[expert] = load_file(str(path / file))
        except Exception as err:
            raise ExportError(f"{path / file} is not a readable safetensors file ({err})") from None
    return recipe, state, loaded


def _which_weights(asked: str | None, state: dict, path: Path) -> str:
    """export.weights resolved for this checkpoint: `ema` or `raw`."""
    if asked == "ema" and not state.get("ema"):
        raise ExportError(f"{path} keeps no moving average (the run had train.ema_decay=0): export its raw weights "
                          "(--weights raw)")
    return asked or ("ema" if state.get("ema") else "raw")


def weight_files(recipe: Recipe, state: dict) -> dict[str, str]:
    """{expert: the checkpoint file export reads}: ema.safetensors for export.weights=ema, else trainable.safetensors."""
    stem = "ema.safetensors" if recipe.export.weights == "ema" else "trainable.safetensors"
    return {e: expert_file(stem, e) for e in state.get("experts", ["transformer"])}


def check_fits(adapter: Adapter | Lycoris, variant: Variant) -> None:
    """Refuse an adapter whose modules or shapes are not the variant's (another model's adapter)."""
    with torch.device("meta"):
        model = transformer_class(variant)(**variant.transformer)
    modules = dict(model.named_modules())
    for name in adapter.modules:
        m, (out, inp) = modules.get(name), adapter.shape(name)
        if not isinstance(m, torch.nn.Linear) or inp != m.in_features or out != m.out_features:
            shape = f"[{out} x {inp}]"
            have = f"[{m.out_features} x {m.in_features}]" if isinstance(m, torch.nn.Linear) else "no such Linear"
            raise ExportError(
                f"this LoRA does not fit {variant.name}: module {name} is {shape} in the adapter but {have} in the model. "
                "Was it trained for another variant?"
            )


def expert_header(recipe: Recipe, expert: str) -> dict[str, str]:
    """`wan_tune.expert: high_noise | low_noise` for a Wan2.2 A14B file (what `sample` routes by)."""
    variant = get_variant(recipe.model.variant)
    return {"wan_tune.expert": expert_label(variant, expert)} if variant.two_experts else {}


def header(recipe: Recipe, state: dict, fmt: str, expert: str = "transformer", modules=()) -> dict[str, str]:
    a = recipe.adapter
    outside = sorted({m for m in modules if not in_blocks(m)})
    note = ({"wan_tune.alpha_applies_to": f"the transformer blocks' adapters; {len(outside)} outside them "
             f"({listing(outside)}) carry no .alpha: alpha/rank is folded "
             "into their lora_up"} if outside and fmt == "comfyui" else {})
    return {
        **expert_header(recipe, expert),
        **note,
        "wan_tune.version": __version__,
        "wan_tune.variant": recipe.model.variant,
        "wan_tune.format": fmt,
        "wan_tune.method": a.method,
        "wan_tune.rank": str(a.rank),
        "wan_tune.alpha": f"{a.alpha if a.alpha is not None else a.rank:g}",
        "wan_tune.targets": json.dumps(a.targets),
        "wan_tune.trigger_word": recipe.caption.trigger_word,
        "wan_tune.steps": str(state["step"]),
        **({"wan_tune.weights": f"ema {recipe.train.ema_decay:g}"} if recipe.export.weights == "ema" else {}),
        "wan_tune.recipe_hash": recipe_hash(recipe),
    }


def export(
    checkpoint: str | Path, formats: list[str] | None = None, out: str | Path | None = None, merge: bool = False, say=print,
    weights: str | None = None,
) -> list[Check]:
    """Write the checkpoint in `formats` (None: the recipe's export.format; ignored for a full
    fine-tune, which writes the whole model), self-test each file; returns the checks.
    `weights`: ema or raw (None: the recipe's export.weights; empty there, ema when kept)."""
    checkpoint = resolve_checkpoint(checkpoint)  # <run>/best: the folder best.json names, exports go there
    recipe, state, experts = read_checkpoint(checkpoint, say, weights)
    if recipe.export.weights == "ema":
        say(f"exporting the moving average of train.ema_decay={recipe.train.ema_decay:g} (--weights raw: the raw weights)")
    # export.format=all (the demo's): the formats that can hold this adapter, the others named and left out.
    fitting = formats is None and recipe.export.format == "all"
    if formats is None:
        formats = list(FORMATS) if recipe.export.format == "all" else [recipe.export.format]
    if recipe.adapter.method in ONLY_FORMAT:  # LoHa / LoKr: comfyui alone holds them; DoRA: diffusers
        formats, fitting = method_formats(recipe.adapter.method, formats, fitting, say), False
    out = export_destination(checkpoint, recipe, out)
    problem = writable_problem(out)
    if problem:
        raise ExportError(f"{problem}; give --out a writable folder (nothing was written)")
    delivery = Delivery(out, export_identity(checkpoint, recipe, state))
    try:
        delivery.in_the_way(expected_names(recipe, state, formats, merge))
    except DeliveryError as err:
        raise ExportError(str(err)) from None
    with delivery as stage:
        checks = _write_export(recipe, state, checkpoint, experts, formats, stage, merge, say, final=out, fitting=fitting)
        passed = all(c.ok for c in checks)
        try:
            delivered = delivery.deliver() if passed else delivery.keep_failed()
        except DeliveryError as err:
            raise ExportError(str(err)) from None
        for c in checks:
            c.file = c.file.replace(str(stage), str(out))
    if passed:
        say(f"wrote {len(delivered)} files into {out} ({MANIFEST} lists them)")
    elif delivered:
        say(f"kept what failed its self-test, to inspect: {', '.join(p.name for p in delivered[:4])}")
    if passed:
        from .artifact import log_export

        score = run_facts(recipe, checkpoint, state["step"]).get(EMA_SCORE if recipe.export.weights == "ema" else "heldout_loss")
        log_export(recipe, checkpoint, out, state["step"], score, say)
    return checks


def export_destination(checkpoint: Path, recipe: Recipe, out: str | Path | None = None) -> Path:
    """Where an export of `checkpoint` goes: --out, the recipe's export.out, else `<checkpoint>/export`."""
    return Path(out or recipe.export.out or checkpoint / "export")


def export_identity(checkpoint: Path, recipe: Recipe, state: dict) -> dict:
    """Which export this is, for the folder's manifest: the run, the step and its weights' checksums
    (two runs that share a name and a step are still told apart)."""
    from ..data.atomic import file_digest

    names = list(weight_files(recipe, state).values())
    crcs = [(state.get("files") or {}).get(n, {}).get("crc32") or file_digest(checkpoint / n)["crc32"] for n in names]
    return {"run": recipe.run.name, "step": int(state["step"]), "weights_crc32": ",".join(crcs)}


def expected_names(recipe: Recipe, state: dict, formats: list[str], merge: bool) -> list[str]:
    """The top-level names an export writes (checked before any work; the delivery checks every file again)."""
    variant = get_variant(recipe.model.variant)
    stem = f"{recipe.run.name}-step{state['step']:06d}"
    if recipe.adapter.method == "full":
        return [stem]
    named = [f"{stem}-{expert_label(variant, e)}" if variant.two_experts else stem for e in variant.experts]
    return [f"{n}-{fmt}.safetensors" for n in named for fmt in formats] + [f"{stem}-comfyui-workflow.json", "README.md",
            "recipe.yaml"] + ([f"{n}-merged" for n in named] if merge else [])


def _write_export(recipe: Recipe, state: dict, checkpoint: Path, experts: dict, formats: list[str], out: Path,
                  merge: bool, say, final: Path, fitting: bool = False) -> list[Check]:
    """Every file of the export into `out` (the staging folder of `final`); the checks."""
    variant = get_variant(recipe.model.variant)
    stem = f"{recipe.run.name}-step{state['step']:06d}"
    if recipe.adapter.method == "full":  # A14B: both experts in one folder, as the pipeline lays them out
        return [c for expert, weights in experts.items() for c in export_full(recipe, weights, out / stem, say, expert)]
    checks, files = [], {}
    for expert, weights in experts.items():
        # A14B: one file per expert (ComfyUI loads one LoRA per model node), its name says which.
        named = f"{stem}-{expert_label(variant, expert)}" if variant.two_experts else stem
        checks += export_adapter(recipe, state, weights, formats, out, named, merge, say, expert, fitting)
        files.update({(expert_label(variant, expert), fmt): f"{named}-{fmt}.safetensors" for fmt in formats
                      if (out / f"{named}-{fmt}.safetensors").is_file()})  # a file that failed its self-test is not
    if all(c.ok for c in checks):
        write_share_files(recipe, state, checkpoint, out, stem, files, final)
    return checks


def export_adapter(recipe: Recipe, state: dict, weights: dict, formats: list[str], out: Path, stem: str, merge: bool,
                   say, expert: str = "transformer", fitting: bool = False) -> list[Check]:
    """Each of `formats` written and self-tested; `fitting`: a format that cannot hold the adapter
    (kohya and VACE blocks) is left out with a line saying why, not refused."""
    from ..models.spec import lora_config

    variant = get_variant(recipe.model.variant)
    if recipe.adapter.method in PARTS:  # LoHa / LoKr
        return export_lycoris(recipe, state, weights, formats, out, stem, merge, say, expert, fitting)
    config = lora_config(recipe, variant)
    adapter = adapter_from_trainable(weights, config.r, config.lora_alpha, config.to_dict(), recipe.adapter.method == "dora")
    check_fits(adapter, variant)
    # Every format is built (and any refused) before the first file is written.
    built = []
    for fmt in formats:
        try:
            built.append((fmt, *_state_dict(fmt, adapter, variant)))
        except ExportError as err:
            if not fitting or len(formats) == 1:
                raise
            say(f"left out the {fmt} format: {str(err).splitlines()[0]}")
    if not built:
        raise ExportError(f"none of the formats {', '.join(formats)} can hold this adapter")
    checks = []
    for fmt, sd, meta in built:
        path = save_tensors(out / f"{stem}-{fmt}.safetensors", sd,
                            {"format": "pt", **meta, **header(recipe, state, fmt, expert, adapter.pairs)})
        try:
            check = check_adapter_file(path, adapter, variant, expert, fmt)
        except Exception as err:  # a file diffusers cannot even load must not stay behind looking usable
            path.unlink(missing_ok=True)
            raise ExportError(f"{path.name}: diffusers could not load it back ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}); the file was removed") from err
        if not check.ok:  # never left under a name ComfyUI or a script would pick up
            check.file = str(_set_aside_failed(path))
        checks.append(check)
    if merge:
        checks += export_merged(recipe, adapter, out / f"{stem}-merged", say, expert)
    return checks


# The one format that holds each method besides LoRA, and why the others cannot.
ONLY_FORMAT = {"loha": ("comfyui", "diffusers' load_lora_weights and its kohya converter build LoRA pairs only"),
               "lokr": ("comfyui", "diffusers' load_lora_weights and its kohya converter build LoRA pairs only"),
               "dora": ("diffusers", "ComfyUI's dora_scale normalises the weight along another axis than peft's DoRA, "
                                     "so no comfyui or kohya file applies the trained update")}


def method_formats(method: str, formats: list[str], fitting: bool, say) -> list[str]:
    """The formats a LoHa / LoKr / DoRA export writes (ONLY_FORMAT's); the others refused (asked for
    by name) or left out with a line (export.format=all), before anything is written."""
    only, why = ONLY_FORMAT[method]
    others = [f for f in formats if f != only]
    if others and (not fitting or only not in formats):
        raise ExportError(f"--format {others[0]} cannot hold a {method} adapter: {why}. Export --format {only}; "
                          "nothing was written")
    for fmt in others:
        say(f"left out the {fmt} format: it cannot hold {method} ({why})")
    return [only]


def export_lycoris(recipe: Recipe, state: dict, weights: dict, formats: list[str], out: Path, stem: str, merge: bool,
                   say, expert: str = "transformer", fitting: bool = False) -> list[Check]:
    """A LoHa / LoKr in the comfyui format (the one that holds it), self-tested key by key."""
    a = recipe.adapter
    adapter = lycoris_from_trainable(weights, a.method, a.rank, a.alpha if a.alpha is not None else a.rank)
    check_fits(adapter, get_variant(recipe.model.variant))
    path = save_tensors(out / f"{stem}-comfyui.safetensors", comfyui_lycoris_state_dict(adapter),
                        {"format": "pt", **header(recipe, state, "comfyui", expert, adapter.modules)})
    check = check_lycoris_file(path, adapter, get_variant(recipe.model.variant))
    if not check.ok:
        check.file = str(_set_aside_failed(path))
    checks = [check]
    if merge:
        checks += export_merged(recipe, adapter, out / f"{stem}-merged", say, expert)
    return checks


def _state_dict(fmt: str, adapter: Adapter, variant: Variant) -> tuple[dict, dict]:
    """(tensors, header) of the adapter in `fmt`, or an ExportError when the format cannot hold it."""
    if fmt == "comfyui":
        sd = comfyui_state_dict(adapter)
        bad = check_original_keys(sd, variant, "diffusion_model.")
        if bad:
            raise ExportError(f"original-format keys that name no module of the original model: {listing(bad)}")
        return sd, {}
    if fmt == "diffusers":
        return diffusers_state_dict(adapter), diffusers_metadata(adapter)
    return kohya_state_dict(adapter, variant.is_i2v), {}


def _write_transformer(model, folder: Path, recipe: Recipe, say, expert: str = "transformer") -> list[Path]:
    """The transformer (an expert) as a diffusers subfolder (sharded safetensors + config) and one
    original-key file (`transformer_original.safetensors`, A14B's low noise: `transformer_2_original...`)."""
    model.save_pretrained(folder / expert, safe_serialization=True, max_shard_size="5GB")
    single = save_tensors(folder / f"{expert}_original.safetensors", state_dict_to_original(model.state_dict()),
                          {"format": "pt", "wan_tune.variant": recipe.model.variant, "wan_tune.version": __version__,
                           **expert_header(recipe, expert)})
    return [folder / expert, single]


def _reload_check(model, folder: Path, recipe: Recipe, expert: str = "transformer") -> list[Check]:
    """Both layouts load back (through wan-tune's own loaders) to exactly the exported weights."""
    from ..models.loading import ModelSource, load_transformer

    variant = get_variant(recipe.model.variant)
    want = model.state_dict()
    single = folder / f"{expert}_original.safetensors"
    checks = []
    for label, source in (
        ("diffusers folder", ModelSource(variant, folder)),
        ("original single file", ModelSource(variant, folder, *((single, None) if expert == "transformer" else (None, single)))),
    ):
        got = load_transformer(source, next(iter(want.values())).dtype, expert).state_dict()
        worst = max(((got[k].float() - v.float()).abs().max().item() for k, v in want.items()), default=0.0)
        checks.append(Check(f"{folder / expert} ({label})", len(want), worst, 0.0, "" if got.keys() == want.keys() else "key sets differ"))
    return checks


def export_full(recipe: Recipe, weights: dict[str, torch.Tensor], folder: Path, say, expert: str = "transformer") -> list[Check]:
    variant = get_variant(recipe.model.variant)
    model = empty_transformer(variant, torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"the checkpoint's weights do not match {variant.name} (missing {listing(missing)}, "
                          f"unexpected {listing(unexpected)})")
    assert isinstance(model, transformer_class(variant))
    _write_transformer(model, folder, recipe, say, expert)
    return _checked(_reload_check(model, folder, recipe, expert), folder, expert)


def _set_aside_failed(path: Path) -> Path:
    """`x.safetensors` -> `x.safetensors.failed` (a folder likewise): kept to inspect, never loaded by mistake."""
    failed = path.with_name(path.name + ".failed")
    if failed.is_dir():
        import shutil

        shutil.rmtree(failed)
    path.replace(failed)
    return failed


def _checked(checks: list[Check], folder: Path, expert: str) -> list[Check]:
    """A full transformer whose reload check failed is renamed `.failed`, both layouts."""
    if not all(c.ok for c in checks):
        for path in (folder / expert, folder / f"{expert}_original.safetensors"):
            failed = _set_aside_failed(path)
            for c in checks:
                c.file = c.file.replace(str(path), str(failed))
    return checks


def export_merged(recipe: Recipe, adapter: Adapter | Lycoris, folder: Path, say, expert: str = "transformer") -> list[Check]:
    """Base weights + scale * B @ A baked in (DoRA: and each row at its magnitude), written as a full transformer."""
    from ..models.loading import load_transformer, recipe_source

    source = recipe_source(recipe)
    model = load_transformer(source, torch.float32, expert)
    with torch.no_grad():
        for module in adapter.modules:
            linear = model.get_submodule(module)
            merged = linear.weight + adapter.delta(module).to(linear.weight.dtype)
            magnitude = getattr(adapter, "magnitudes", {}).get(module)
            if magnitude is not None:  # DoRA: each row rescaled to its learned magnitude, as peft merges it
                merged = merged * (magnitude.float() / merged.norm(dim=1)).view(-1, 1)
            linear.weight.copy_(merged)
    _write_transformer(model, folder, recipe, say, expert)
    return _checked(_reload_check(model, folder, recipe, expert), folder, expert)


def format_checks(checks: list[Check]) -> str:
    lines = [f"  {'file':<70}{'modules':>8}{'max rel err':>14}{'tolerance':>11}  result"]
    for c in checks:
        name = c.file if len(c.file) <= 68 else "..." + c.file[-65:]
        lines.append(f"  {name:<70}{c.modules:>8}{c.max_rel_error:>14.2e}{c.tolerance:>11.0e}  {'ok' if c.ok else 'FAIL ' + c.problem}")
    return "\n".join(lines)


__all__ = ["FORMATS", "ExportError", "export", "format_checks", "read_checkpoint"]
