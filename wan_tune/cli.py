"""`wan-tune` command line: parsing and dispatch only; the work lives in the library.

Heavy imports (torch, diffusers) happen inside the commands, so `wan-tune check` answers
before any of them load.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import __version__

EPILOG = """\
workflow:
  wan-tune demo                                   the whole chain on the tiny model, a few minutes on a CPU
  wan-tune check recipes/my_brand.yaml            validate a recipe (no model is loaded)
  wan-tune plan recipes/my_brand.yaml --gpu-memory 24   per-GPU memory + FLOPs of a step; settings that fit
  wan-tune caption recipes/my_brand.yaml          write captions to review (data.captions)
  wan-tune prep recipes/my_brand.yaml             encode clips + captions into latent shards
  accelerate launch --multi_gpu -m data_prep recipes/my_brand.yaml   the same, one share per GPU
  wan-tune train recipes/my_brand.yaml train.lr=5e-5                 train in one process
  accelerate launch --config_file launch/accelerate/zero2.yaml -m wan_tune.train recipes/my_brand.yaml
  wan-tune export checkpoints/my_brand/step-002000 --format all   adapters for ComfyUI / diffusers / kohya
  wan-tune export checkpoints/my_brand/best       the checkpoint with the lowest held-out loss
  wan-tune sample --base Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora my_brand.safetensors --prompt "mybrand ..."
  wan-tune make-tiny /tmp/tiny-wan                build the tiny random-init test model

Overrides are dotted keys after the recipe: wan-tune check recipes/x.yaml train.lr=5e-5 run.name=test
"""


def _check(args: argparse.Namespace) -> int:
    from .config import to_yaml
    from .config.checks import missing_inputs

    recipe = _load(args)
    if recipe is None:
        return 2
    from data_prep.sources import source_problems

    missing = missing_inputs(recipe)  # what training would stop on at its first render
    if recipe.data.sources:  # what prep would stop on (data.source alone: prep's own first line says it)
        missing += source_problems(recipe)
    if missing:
        print(f"{args.recipe}:\n" + "\n".join(f"  {key}: {why}" for key, why in missing), file=sys.stderr)
        return 2
    print(f"# {args.recipe}: OK (resolved recipe follows)")
    print(to_yaml(recipe), end="")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan.report import run_plan

    if args.cpu and (args.gpus > 1 or args.zero):
        print("wan-tune plan: --cpu plans one CPU process; it takes neither --gpus nor --zero", file=sys.stderr)
        return 2
    recipe = _load(args)
    if recipe is None:
        return 2
    try:
        return run_plan(recipe, args.gpu_memory, args.gpus, args.zero, "cpu" if args.cpu else "gpu", cp=args.cp,
                        headroom_gib=args.headroom)
    except ValueError as err:  # a context-parallel degree the run cannot use
        print(f"wan-tune plan: {err}", file=sys.stderr)
        return 2


def _load(args: argparse.Namespace):
    """The checked recipe, or None after printing its problems (exit status 2)."""
    from .config import ConfigError, load_recipe

    try:
        return load_recipe(args.recipe, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


def _caption(args: argparse.Namespace) -> int:
    from data_prep.captions import CaptionFileError, caption_recipe
    from data_prep.sources import SourceError
    from data_prep.vlm import CaptionModelError

    from .data.atomic import writable_problem

    recipe = _load(args)
    if recipe is None:
        return 2
    problem = writable_problem(Path(recipe.data.captions).parent)
    if problem:
        print(f"wan-tune caption: data.captions: {problem}; set data.captions to a writable place", file=sys.stderr)
        return 1
    try:
        counts = caption_recipe(recipe)
    except (SourceError, CaptionModelError, CaptionFileError, OSError) as err:  # OSError: a disk that filled
        print(f"wan-tune caption: {err}", file=sys.stderr)
        return 1
    print(f"wrote {sum(counts.values())} caption(s) to {recipe.data.captions} ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})")
    if counts.get("missing"):
        print(f"{counts['missing']} item(s) have no caption yet: fill them in before `wan-tune prep`, or they are skipped")
    return 0


def _prep(args: argparse.Namespace) -> int:
    from data_prep.captions import CaptionFileError
    from data_prep.prep import PrepError, run_prep
    from data_prep.sources import SourceError
    from data_prep.summary import format_summary
    from data_prep.vlm import CaptionModelError

    from .data.shards import ShardFormatError
    from .models.loading import ModelLoadError

    recipe = _load(args)
    if recipe is None:
        return 2
    try:
        summary = run_prep(recipe, strict=args.strict, verify=args.verify)
    except (SourceError, ModelLoadError, PrepError, CaptionModelError, CaptionFileError, ShardFormatError) as err:
        print(f"wan-tune prep: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a disk that filled mid-run: every finished shard file is kept
        print(f"wan-tune prep: {err}; finished shard files are kept: rerun to go on", file=sys.stderr)
        return 1
    if not summary:  # not rank 0
        return 0
    print(format_summary(summary))
    if summary["samples"] == 0:
        print("nothing was encoded: see the skipped inputs above", file=sys.stderr)
        return 1
    if args.strict and summary["skips"]:
        print(f"--strict: {len(summary['skips'])} input(s) were skipped", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    return train_main([args.recipe, *args.overrides] + (["--resume", args.resume] if args.resume else []))


def _export(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .export.adapters import FORMATS, ExportError
    from .export.push import PushError, preflight
    from .export.run import export, format_checks
    from .models.loading import ModelLoadError

    formats = list(FORMATS) if args.format == "all" else [args.format] if args.format else None  # None: the recipe's
    try:
        if args.push_to_hub:
            preflight(args.push_to_hub)  # offline or no token: said before any work
        checks = export(args.checkpoint, formats, args.out, merge=args.merge, weights=args.weights)
    except PushError as err:
        print(f"wan-tune export: {err}", file=sys.stderr)
        return 1
    except (ExportError, ConfigError, ModelLoadError, OSError) as err:  # files are written whole or not at all
        print(f"wan-tune export: {err}", file=sys.stderr)
        return 1
    print("self-test (each file loaded back with diffusers / wan-tune loaders, every module compared):")
    print(format_checks(checks))
    if not all(c.ok for c in checks):
        print("wan-tune export: self-test FAILED: nothing was delivered; the files that failed are kept as *.failed, "
              "to inspect, never to ship", file=sys.stderr)
        return 1
    if args.push_to_hub:
        return _push_folder(Path(checks[0].file).parent, args.push_to_hub, args.private, None, "export")
    return 0


def _push_folder(path, repo_id: str, private: bool, revision: str | None, command: str) -> int:
    from .config import ConfigError
    from .export.adapters import ExportError
    from .export.push import PushError, push

    try:
        push(path, repo_id, private=private, revision=revision)
    except (PushError, ExportError, ConfigError, OSError) as err:
        print(f"wan-tune {command}: {err}", file=sys.stderr)
        return 1
    return 0


def _push(args: argparse.Namespace) -> int:
    return _push_folder(args.path, args.repo_id, args.private, args.revision, "push")


def _sample(args: argparse.Namespace) -> int:
    from .sampling import SampleArgs, SampleError, sample

    fields = {k: v for k, v in vars(args).items() if k in SampleArgs.__dataclass_fields__}
    try:
        video, sheet = sample(SampleArgs(**fields))
    except (SampleError, OSError) as err:
        print(f"wan-tune sample: {err}", file=sys.stderr)
        return 1
    print(f"wrote {video} and {sheet}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .demo import DemoError, run_demo

    try:
        result = run_demo(args.recipe, args.overrides, clips=args.clips, stills=args.stills)
    except (DemoError, ConfigError) as err:
        print(f"wan-tune demo: {err}", file=sys.stderr)
        return 1 if isinstance(err, DemoError) else 2
    from .demo import verdict

    failed = verdict(result)
    if failed:
        print(f"wan-tune demo: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .models.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.out, args.variant, seed=args.seed)
    print(f"wrote the {args.variant} pipeline (random weights) to {path}")
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/wan2.1-t2v-1.3b-lora.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=5e-5 data.frames=[33,81]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wan-tune",
        description="Fine-tune Wan video diffusion transformers on your own footage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wan-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "check",
        help="validate a recipe and print it resolved; exit 2 listing every problem",
        description="Validate a recipe before anything loads: unknown keys, wrong types and impossible "
        "combinations are all reported at once, each naming its key.",
    )
    _recipe_args(p)
    p.set_defaults(func=_check)

    p = sub.add_parser(
        "plan",
        help="predict per-GPU memory and FLOPs of a training step; name the cheapest settings that fit a budget",
        description="Before anything loads, predict the per-GPU peak memory of one training step of the recipe's "
        "largest bucket (data.resolutions x data.frames): base weights by dtype, trainable state, activations "
        "(counted on the meta device), block offload and ZeRO sharding, side by side for the recipe's settings and "
        "for each saving in turn. With --gpu-memory, name the cheapest settings that fit (no saving < gradient "
        "checkpointing < fp8 base < activation offload < FFN chunks < attention checkpoints < ZeRO stage < context "
        "parallelism < block offload) as overrides to paste. Exit 0 when they fit or no "
        "budget was given, 1 when nothing fits, 2 on recipe errors or a context-parallel degree the run cannot use.",
    )
    _recipe_args(p)
    p.add_argument("--gpu-memory", type=_positive_float, default=None, metavar="GiB",
                   help="memory of one GPU in GiB (e.g. 24, 48, 80; with --cpu the host RAM): print the cheapest "
                   "settings whose peak fits")
    p.add_argument("--gpus", type=_positive_int, default=1, metavar="N",
                   help="GPUs the run spreads over (one process each); ZeRO divides state over them (default 1)")
    p.add_argument("--zero", type=int, choices=(0, 2, 3), default=0,
                   help="DeepSpeed ZeRO stage the run launches with: 0 = none (DDP), 2 = gradients + optimizer state "
                   "sharded, 3 = weights too (default 0; with --gpus > 1 the advice also tries higher stages)")
    p.add_argument("--cp", type=_positive_int, default=None, metavar="N",
                   help="context parallelism: split each clip's tokens over groups of N of the GPUs, dividing its "
                   "activations by about N (default: the recipe's train.context_parallel; with --gpus > 1 the advice "
                   "also tries the degrees that divide the GPUs, the heads and the tokens)")
    p.add_argument("--headroom", type=_non_negative_float, default=None, metavar="GiB",
                   help="GiB of --gpu-memory kept free for the CUDA context, kernel workspaces and the allocator's "
                   "fragmentation before anything fits (default: 1 GiB + 5%% of --gpu-memory; 0 with --cpu)")
    p.add_argument("--cpu", action="store_true",
                   help="plan a CPU run instead (the recipe's dtypes under CPU autocast; one process): host RAM")
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "caption",
        help="write the caption review file (sidecars, a template, or a vision-language model)",
        description="Make one caption per clip or image in data.captions (CSV) for review before encoding. "
        "Captions already in the file are kept unless caption.overwrite=true.",
    )
    _recipe_args(p)
    p.set_defaults(func=_caption)

    p = sub.add_parser(
        "prep",
        help="encode footage + captions into latent shards (resumable; ranks split the work)",
        description="Decode, bucket and encode (Wan VAE, umT5, and CLIP for I2V) into data.shards. Bad inputs are "
        "skipped with a reason in prep_report.csv; a rerun skips finished samples. Exit 0 when something was "
        "encoded. Multi-GPU: accelerate launch --multi_gpu -m data_prep RECIPE.",
    )
    _recipe_args(p)
    p.add_argument("--strict", action="store_true", help="fail (non-zero) if any input is skipped")
    p.add_argument("--verify", action="store_true",
                   help="read every shard already written and check each sample's checksum (a header check of "
                        "each file always runs); damaged files are deleted and their samples encoded again")
    p.set_defaults(func=_prep)

    p = sub.add_parser(
        "train",
        help="train a recipe in this one process (multi-GPU: accelerate launch -m wan_tune.train)",
        description="Train (LoRA or full fine-tune) from the recipe's shards. Checkpoints go to "
        "<run.output_dir>/<run.name>/step-NNNNNN/; a rerun resumes from the newest by itself. SIGTERM/SIGUSR1 "
        "finish the step, checkpoint and exit 0. For several GPUs or nodes: accelerate launch --config_file "
        "launch/accelerate/<setup>.yaml -m wan_tune.train RECIPE [overrides].",
    )
    _recipe_args(p)
    p.add_argument("--resume", default=None, help="auto (newest checkpoint), never, or a step folder")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a LoRA for ComfyUI / diffusers / kohya (or a full transformer), self-tested",
        description="Export a step folder. LoRA runs: comfyui (original keys; ComfyUI and diffusers load it), diffusers "
        "(PEFT keys, alpha in the header), kohya (needs attention+ffn in every block). Full fine-tunes: the transformer "
        "as a diffusers folder and as one original-key file. Every file is loaded back and compared module by module; "
        "a mismatch exits non-zero.",
    )
    p.add_argument("checkpoint", help="checkpoints/<run>/step-NNNNNN, or checkpoints/<run>/best: the checkpoint with the "
                   "lowest held-out loss (runs with data.holdout > 0)")
    p.add_argument("--format", choices=("comfyui", "diffusers", "kohya", "all"), default=None,
                   help="adapter format (default: the recipe's export.format)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/export)")
    p.add_argument("--merge", action="store_true", help="also bake the LoRA into the base weights (full transformer)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="runs with train.ema_decay: the moving average (the default) or the raw weights")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="then upload the export to this Hub model repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "push",
        help="upload an export (adapters, ComfyUI workflow, model card, samples, recipe) to the Hugging Face Hub",
        description="Upload an export folder, or a checkpoint (exported first, in the recipe's formats), to a Hub model "
        "repository, created if needed, in one commit. The token comes from `hf auth login` or HF_TOKEN; offline or "
        "without one, it stops before any work.",
    )
    p.add_argument("path", help="an export folder, or checkpoints/<run>/step-NNNNNN or checkpoints/<run>/best")
    p.add_argument("repo_id", help="owner/name of the Hub model repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if needed; default: main)")
    p.set_defaults(func=_push)

    p = sub.add_parser(
        "sample",
        help="render a video from a base model and an exported LoRA (mp4 + contact-sheet PNG)",
        description="Text-to-video (or image-to-video with --image, first-and-last-frame with --image and --last-image, "
        "VACE with --reference-image / --control-video / --mask-video, Wan2.2-Animate with --reference-image / "
        "--pose-video / --face-video) "
        "through the diffusers Wan pipelines, with an "
        "optional LoRA from `wan-tune export` (any of its formats).",
    )
    p.add_argument("--base", required=True, help="diffusers-format folder or hub id of the base model")
    p.add_argument("--lora", action="append", default=None,
                   help="adapter .safetensors (comfyui, diffusers or kohya format); Wan2.2 A14B: give --lora twice, "
                   "the high_noise and the low_noise file (their headers say which expert each is for)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (0 = base model)")
    p.add_argument("--prompt", required=True, help="include the trigger word")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--image", default=None, help="first frame, for image-to-video models")
    p.add_argument("--last-image", default=None, help="last frame, for first-and-last-frame models (FLF2V; with --image)")
    p.add_argument("--reference-image", action="append", default=[], metavar="IMAGE",
                   help="VACE: a reference image (product, logo, character) the video keeps; repeat for several. "
                   "Wan2.2-Animate: the character (one)")
    p.add_argument("--control-video", default=None, help="VACE: control video (depth, pose, edges, grey, layout), "
                   "at least --frames long; cut to the render size as prep cuts training controls")
    p.add_argument("--mask-video", default=None, help="VACE: black keeps the control's pixels, white generates (with "
                   "--control-video); Wan2.2-Animate replacement: white where the person to replace is")
    p.add_argument("--conditioning-scale", type=float, default=1.0, help="VACE: weight of the reference/control hints")
    p.add_argument("--pose-video", default=None, help="Wan2.2-Animate: the pose video to perform (with --reference-image, "
                   "the character, and --face-video); at least --frames long")
    p.add_argument("--face-video", default=None, help="Wan2.2-Animate: the face video (cropped square), frame for frame")
    p.add_argument("--background-video", default=None, help="Wan2.2-Animate, replacement: the scene the character goes "
                   "into (with --mask-video, white where the person to replace is)")
    p.add_argument("--frames", type=int, default=33, help="frame count, 4k+1")
    p.add_argument("--segment-frames", type=int, default=None, help="Wan2.2-Animate: frames per segment (4k+1; default "
                   "the model's 77, or --frames when fewer); a longer --frames renders segment after segment, each "
                   "starting on the last frame of the one before")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (A14B: of the high-noise expert)")
    p.add_argument("--guidance-scale-2", type=float, default=None, help="Wan2.2 A14B: the low-noise expert's guidance")
    p.add_argument("--variant", default=None, help="only for a hub id not yet downloaded")
    p.add_argument("--out", default="sample.mp4", help="output mp4; the contact sheet goes beside it as .png")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "demo",
        help="the whole chain on generated clips and the tiny model, in minutes on a CPU",
        description="Generate clips, build the tiny random-init Wan model, then caption -> prep -> train -> export -> "
        "sample with the same code and recipe machinery as a real run (recipes/demo-tiny.yaml). Outputs: data/demo/ "
        "and checkpoints/demo-tiny/, replaced on every run; the demo removes only folders it made itself (a "
        ".wan-tune-demo file marks them) and refuses to run over any other.",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe, e.g. train.steps=50")
    p.add_argument("--recipe", default=None, help="another demo recipe (default: recipes/demo-tiny.yaml)")
    p.add_argument("--clips", type=int, default=8, help="how many clips to generate")
    p.add_argument("--stills", type=int, default=0, help="also N square product stills, as a second source "
                   "(data.sources: clips and stills train together, one bucket per batch)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "make-tiny",
        help="write the tiny random-init Wan pipeline (diffusers layout) for tests and experiments",
        description="Build a complete, tiny, random-weight Wan pipeline folder locally (nothing is downloaded).",
    )
    p.add_argument("out", help="folder to create")
    p.add_argument("--variant", default="tiny", choices=("tiny", "tiny-i2v"), help="text-to-video or image-to-video")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options, as people type them: `train RECIPE --resume never train.lr=5e-5`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C, or a stop a command asked for by signal (prep's SIGTERM)
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"wan-tune {args.command}: {'interrupted' if signum == signal.SIGINT else f'stopped by {signal.Signals(signum).name}'}; "
              "files already written are whole (rerun to go on)", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
