"""`wan-tune demo`: the whole chain on the embedded default, in minutes, on a CPU.

Generated clips (a neon shape over a dark gradient, captions with the trigger word) -> the tiny
random-init Wan model -> caption -> prep -> train -> export -> sample, through the same functions
and recipe machinery as a real run (this module only calls them in order, as the CLI would; like
the CLI it reaches `data_prep` lazily). Ends with a table of artifacts, losses and stage times.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from .config import load_recipe
from .models.variants import get_variant

DEMO_RECIPE = "demo-tiny.yaml"
MARKER = ".wan-tune-demo"
"""Written in every folder the demo makes; the demo removes a folder only if it holds one."""


class DemoError(RuntimeError):
    """The demo refuses to run as asked; the message says why."""


def clear_previous(folders: list[Path], say=print) -> None:
    """Remove the previous demo's folders, each only if the demo made it (its marker is there).
    All are checked before any is removed: one folder of the user's stops the demo with nothing
    removed (overrides can point data.source, data.shards or the run folder anywhere)."""
    existing = [f for f in folders if f.exists() or f.is_symlink()]
    for folder in existing:
        if folder.is_symlink() or not folder.is_dir() or not (folder / MARKER).is_file():
            raise DemoError(f"{folder} exists and was not made by `wan-tune demo` (no {MARKER} in it); the demo only "
                            "removes its own output: point the override elsewhere, or move that folder yourself")
    for folder in existing:
        say(f"demo: starting fresh, removing the previous demo output {folder}")
        shutil.rmtree(folder)


def mark(folder: Path) -> Path:
    """Create `folder` (it must not exist) as the demo's own."""
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("made by `wan-tune demo`, which deletes this folder when it runs again\n")
    return folder


def find_demo_recipe() -> Path:
    """recipes/demo-tiny.yaml in this checkout (the cwd first, then beside the package)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "recipes" / DEMO_RECIPE
        if path.is_file():
            return path
    raise FileNotFoundError(f"recipes/{DEMO_RECIPE} not found: run from the wan-tune checkout or pass --recipe")


def _sample_frames(recipe, run_dir: Path) -> tuple[str | None, str | None]:
    """The first frame (I2V) and the last (FLF2V) the demo's sample starts and ends on: a clip's,
    written beside the run; None for what the variant does not take."""
    from .models.variants import get_variant
    from .training.clip_inputs import clip_first_frames

    variant = get_variant(recipe.model.variant)
    if not variant.image_conditioned(recipe.data.task):
        return None, None
    frames = clip_first_frames(recipe, recipe.data.shards, [], 1, last=variant.last_frame)[0]
    first, last = frames if variant.last_frame else (frames, None)
    first.save(run_dir / "first_frame.png")
    if last is not None:
        last.save(run_dir / "last_frame.png")
    return str(run_dir / "first_frame.png"), (str(run_dir / "last_frame.png") if last is not None else None)


def _vace_inputs(recipe, variant) -> dict:
    """VACE: the first generated clip's own control, mask and reference for the sample."""
    if not variant.vace:
        return {}
    from data_prep.sources import discover

    from .config.sources import data_sources

    inputs = next(it.vace for it in discover(data_sources(recipe)[0].path) if it.vace)
    return {"reference_image": list(inputs.references), "control_video": inputs.control, "mask_video": inputs.mask}


def with_stills(overrides: list[str], recipe_path, stills: int) -> list[str]:
    """`--stills N`: the demo's clips and N square stills as two sources (`data.sources`), the stills
    beside the clips' folder at their own 64x64 (one-frame samples)."""
    if not stills:
        return overrides
    clips = Path(load_recipe(recipe_path, overrides, warn=lambda _m: None).data.source or "data/demo/clips")
    return [*overrides, "data.source=null",
            f"data.sources=[{{path: '{clips}', name: clips}}, {{path: '{clips.parent / 'stills'}', name: stills, "
            "resolutions: [[64, 64]], holdout: 0}]"]


def _make_footage(recipe, variant, clips: int, stills: int, say) -> None:
    """The demo's clips (and stills, with `--stills`) in the recipe's source folders, captioned."""
    from .config.sources import data_sources
    from .media.synthetic import make_clips, still_image

    folders = [Path(src.path) for src in data_sources(recipe)]
    trigger = recipe.caption.trigger_word or "wtune"
    inputs = " with VACE control, mask and reference" if variant.vace else " with pose and face videos" if variant.animate else ""
    say(f"[1/6] generating {clips} clips in {folders[0]}{inputs}" + (f" and {stills} stills in {folders[1]}" if stills else ""))
    make_clips(folders[0], clips, trigger=trigger, frames=24, height=96, width=128, vace=variant.vace,
               animate=variant.animate)
    for i in range(stills):
        still_image(folders[1] / f"still_{i:03d}.png", 128, 128, seed=i).with_suffix(".txt").write_text(
            f"{trigger} style, a product still on a dark gradient\n")


def run_demo(recipe_path: str | Path | None = None, overrides: list[str] | None = None, clips: int = 8, say=print,
             stills: int = 0) -> dict:
    from data_prep.captions import caption_recipe
    from data_prep.prep import run_prep
    from data_prep.summary import format_summary

    from .config.sources import data_sources
    from .export.run import export, format_checks
    from .models.loading import resolve_source
    from .training.loop import train

    overrides = with_stills(list(overrides or []), recipe_path or find_demo_recipe(), stills)
    recipe = load_recipe(recipe_path or find_demo_recipe(), overrides)
    # A run shorter than the recipe's own (train.steps=4 to try the chain) is not judged on learning.
    recipe_steps = load_recipe(recipe_path or find_demo_recipe(), warn=lambda _m: None).train.steps
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[stage] = now - t
        t = now

    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    made = [Path(src.path) for src in data_sources(recipe)] + [Path(recipe.data.shards), run_dir]
    clear_previous(made, say)
    for folder in sorted(made, key=lambda f: len(f.resolve().parts)):  # outer first: data.source may sit in data.shards
        if not folder.exists():
            mark(folder)

    variant = get_variant(recipe.model.variant)
    _make_footage(recipe, variant, clips, stills, say)
    source = resolve_source(recipe.model.variant, recipe.model.path)  # builds the tiny model on first use
    lap("clips + tiny model")

    say(f"[2/6] captions -> {recipe.data.captions} (review file)")
    caption_recipe(recipe, progress=False)
    lap("caption")

    say("[3/6] prep: decode, bucket, encode -> shards")
    prep = run_prep(recipe)
    say(format_summary(prep))
    lap("prep")

    say(f"[4/6] train: {recipe.train.steps} steps of {recipe.adapter.method}")
    trained = train(recipe)
    lap("train")

    say("[5/6] export + self-test")
    checks = export(trained["checkpoint"], say=say)  # the recipe's export.format (the demo's: all)
    say(format_checks(checks))
    lap("export")

    exported = Path(trained["checkpoint"], "export")
    video, sheet = _sample(recipe, variant, run_dir, exported, source, say)
    lap("sample")


    first, last = statistics.mean(trained["first_losses"]), statistics.mean(trained["last_losses"])
    result = {
        "clips": data_sources(recipe)[0].path, "captions": recipe.data.captions, "shards": recipe.data.shards,
        "checkpoint": trained["checkpoint"], "adapters": [c.file for c in checks], "video": str(video), "contact_sheet": str(sheet),
        "model_card": str(exported / "README.md"), "workflow": str(next(exported.glob("*-comfyui-workflow.json"), "")),
        "samples": prep["samples"], "first_loss": first, "last_loss": last, "loss_window": len(trained["first_losses"]), "selftest_ok": all(c.ok for c in checks), "times": times,
        "heldout": trained["heldout"], "best": trained["best"],
        "judged": recipe.train.steps >= recipe_steps, "recipe_steps": recipe_steps,
        "overview": str(run_dir / "validation" / "index.html") if recipe.validation.every else None,
    }
    say(format_result(result))
    return result


def _sample(recipe, variant, run_dir: Path, exported: Path, source, say) -> tuple:
    """[6/6]: a render with the exported LoRA (and the variant's conditioning: a clip's)."""
    from .config.sources import data_sources
    from .sampling import SampleArgs, sample

    say("[6/6] sample with the exported LoRA")
    # The comfyui file of each expert (Wan2.2 A14B: the high- and the low-noise one).
    loras = [str(p) for p in sorted(exported.glob("*-comfyui.safetensors"))] or [str(next(exported.glob("*.safetensors")))]
    h, w = recipe.data.resolutions[0]
    image, last_image = _sample_frames(recipe, run_dir)
    conditioning = _vace_inputs(recipe, variant)
    if variant.animate:  # a clip's first frame as the character, its pose and face videos to perform
        first = sorted(Path(data_sources(recipe)[0].path).glob("*.pose.mp4"))[0]
        conditioning = dict(reference_image=[image], pose_video=str(first), face_video=str(first).replace(".pose.", ".face."))
        image = None
    return sample(SampleArgs(base=str(source.folder), lora=loras, prompt=f"{recipe.caption.trigger_word} style, a red circle drifting over a dark gradient",
                             frames=recipe.data.frames[0], steps=10, height=h, width=w, image=image,
                             last_image=last_image, **conditioning, out=str(run_dir / "sample.mp4")), say=say)


def format_result(r: dict) -> str:
    rows = [("footage", r["clips"]), ("captions (review)", r["captions"]), ("shards", f"{r['shards']} ({r['samples']} samples)"),
            ("checkpoint", r["checkpoint"]), *[("adapter", a) for a in r["adapters"]],
            ("model card", r["model_card"]), ("ComfyUI workflow", r["workflow"]), ("video", r["video"]),
            ("contact sheet", r["contact_sheet"])] + ([("validation rounds", r["overview"])] if r.get("overview") else [])
    lines = ["", "demo summary", ""] + [f"  {k:<20}{v}" for k, v in rows if v]
    lines += ["", f"  loss: first {r['loss_window']} steps {r['first_loss']:.4f} -> last {r['loss_window']} steps {r['last_loss']:.4f} "
                  f"({(1 - r['last_loss'] / r['first_loss']):.0%} lower)",
              *([held_out_line(r["heldout"], r["best"])] if r.get("heldout") else []),
              *([] if r.get("judged", True) else [f"  (not judged on learning: {r['recipe_steps']} steps in the recipe, "
                                                   "this run trained fewer)"]),
              f"  export self-test: {'all ok' if r['selftest_ok'] else 'FAILED'}", "",
              "  time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["times"].items()),
              f"  total: {sum(r['times'].values()):.1f} s"]
    return "\n".join(lines)


def verdict(r: dict) -> str | None:
    """Why the demo failed, in one line (None: it did not)."""
    if not r["selftest_ok"]:
        return "the export's self-test failed (the table above names the file)"
    if r["judged"] and r["last_loss"] >= r["first_loss"]:
        return (f"the training loss did not go down (first {r['loss_window']} steps {r['first_loss']:.4f}, last "
                f"{r['last_loss']:.4f}): the chain ran, but did not learn")
    return None


def held_out_line(scores: dict[int, float], best: str | None) -> str:
    (s0, before), (s1, after) = min(scores.items()), max(scores.items())
    line = f"  held-out loss: step {s0} {before:.4f} -> step {s1} {after:.4f} ({(1 - after / before):.0%} lower)"
    return line + (f"; best: {best}" if best else "")
