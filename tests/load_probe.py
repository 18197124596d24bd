"""A child of tests/test_sharded.py, started by `accelerate launch` with an FSDP2 config (2 CPU
processes): build the trainer's run (`build_run`: load, LoRA, FSDP2 prepare) of the real 1.3B
architecture (random weights, bench/common.py) and print this rank's peak RSS, with the bytes of
one whole copy of the model. Argument: `streamed` (what the trainer does) or `whole` (every rank
loads the whole model first, as before #24; for the comparison in the notes)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def main() -> None:
    from common import model_folder, workdir

    import wan_tune.training.run as run_module
    from wan_tune.config import load_recipe
    from wan_tune.models.variants import get_variant
    from wan_tune.training.launch import make_accelerator

    mode, out = sys.argv[1], Path(sys.argv[2])
    folder = model_folder("wan2.1-t2v-1.3b", workdir())
    recipe = load_recipe(ROOT / "recipes" / "demo-tiny.yaml", [
        "model.variant=wan2.1-t2v-1.3b", f"model.path={folder}", f"run.output_dir={out}", "data.holdout=0",
        "validation.every=0", "train.gradient_checkpointing=true"])
    accelerator = make_accelerator(recipe, out / recipe.run.name)
    if mode == "whole":  # the trainer as it was: every rank loads the model, then FSDP2 shards it
        run_module.sharding = lambda _accelerator: None
    variant = get_variant(recipe.model.variant)
    run = run_module.build_run(recipe, accelerator, out / recipe.run.name, variant, ["transformer"], print)
    model = accelerator.unwrap_model(run.trainees[0].model)
    whole = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) * 4  # fp32 on a CPU (global shapes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rank": accelerator.process_index, "peak_rss": peak, "one_copy": whole}), flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
