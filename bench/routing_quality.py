"""What token routing (train.route_ratio) costs in quality on the tiny demo: the same run (recipe,
seed, steps) at each route ratio, held-out loss curves side by side.

    python bench/routing_quality.py                          # ratios 0 and 0.5, 300 steps, scored every 25
    python bench/routing_quality.py --ratios 0,0.25,0.5 --steps 600

The demo's clips and shards are generated into a temporary folder (bench/common.py's workdir), the
tiny model's two blocks are the routed span (0..1), and each run is wan-tune's own train(). The held-out
loss never routes (the same weights score the same whatever the ratio), so the curves compare what
the weights learnt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]


def demo_shards(root: Path) -> tuple[Path, Path]:
    """(tiny model folder, shards) of the demo's 8 generated clips, made once."""
    from common import model_folder

    from data_prep.prep import run_prep
    from wan_tune.config import load_recipe
    from wan_tune.media.synthetic import make_clips

    folder, shards = model_folder("tiny", root), root / "routing-shards"
    if not (shards / "index.parquet").is_file():
        make_clips(root / "routing-clips", 8, frames=24, height=96, width=128)
        recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
            f"model.path={folder}", f"data.source={root / 'routing-clips'}", f"data.shards={shards}"])
        run_prep(recipe, progress=False, say=lambda *_: None)
    return folder, shards


def curve(root: Path, folder: Path, shards: Path, ratio: float, steps: int, every: int) -> dict[int, float]:
    from wan_tune.config import load_recipe
    from wan_tune.training.loop import train

    out = root / f"routing-runs-{ratio:g}"
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        f"model.path={folder}", f"data.shards={shards}", f"run.output_dir={out}", f"train.steps={steps}",
        f"eval.every={every}", f"checkpoint.every={steps}", "validation.every=0", f"train.route_ratio={ratio}",
        "train.route_start=0", "train.route_end=1"])
    result = train(recipe, resume="never", progress=False, say=lambda *_: None)
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["heldout_loss"] for r in map(json.loads, lines) if "heldout_loss" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0,0.5")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    from common import workdir

    root = workdir()
    folder, shards = demo_shards(root)
    ratios = [float(r) for r in args.ratios.split(",")]
    curves = {r: curve(root, folder, shards, r, args.steps, args.every) for r in ratios}
    print(f"held-out loss of the tiny demo, {args.steps} steps, route span blocks 0..1. Command: "
          f"`python bench/routing_quality.py --ratios {args.ratios} --steps {args.steps} --every {args.every}`\n")
    print("| step | " + " | ".join(f"route {r:g}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for step in sorted(curves[ratios[0]]):
        print(f"| {step} | " + " | ".join(f"{curves[r].get(step, float('nan')):.4f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
