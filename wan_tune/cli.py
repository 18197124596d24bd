"""`wan-tune` command line: parsing and dispatch only; the work lives in the library.

Heavy imports (torch, diffusers) happen inside the commands, so `wan-tune check` answers
before any of them load.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

EPILOG = """\
workflow:
  wan-tune check recipes/my_brand.yaml            validate a recipe (no model is loaded)
  wan-tune make-tiny /tmp/tiny-wan                build the tiny random-init test model

Overrides are dotted keys after the recipe: wan-tune check recipes/x.yaml train.lr=5e-5 run.name=test
"""


def _check(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_recipe, to_yaml

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"# {args.recipe}: OK (resolved recipe follows)")
    print(to_yaml(recipe), end="")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .models.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.out, args.variant, seed=args.seed)
    print(f"wrote the {args.variant} pipeline (random weights) to {path}")
    return 0


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
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/wan2.1-t2v-1.3b-lora.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=5e-5 data.frames=[33,81]")
    p.set_defaults(func=_check)

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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
