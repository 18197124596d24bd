"""`accelerate launch [--config_file launch/accelerate/X.yaml] -m wan_tune.train RECIPE [overrides]`.

Also `wan-tune train RECIPE` for one process. Exit status: 0 done (or stopped cleanly by a
signal, checkpoint saved), 1 training error, 2 recipe errors.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wan_tune.train", description="Train a recipe (LoRA or full fine-tune).")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-5")
    parser.add_argument("--resume", default=None, help="auto (default: checkpoint.resume), never, or a step folder")
    args = parser.parse_intermixed_args(argv)  # options anywhere: RECIPE --resume never train.lr=5e-5

    from .config import ConfigError, load_recipe
    from .data.shards import ShardFormatError
    from .models.loading import ModelLoadError
    from .training.checkpoint import CheckpointError
    from .training.loop import TrainingError, train

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        summary = train(recipe, resume=args.resume)
    except (TrainingError, ShardFormatError, ModelLoadError, CheckpointError) as err:
        print(f"wan-tune train: {own_words(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # a disk that filled, a mount that went away: the reason, not a traceback
        print(f"wan-tune train: {err}; checkpoints already saved are whole: rerun to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("wan-tune train: interrupted; checkpoints already saved are whole: rerun to resume", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            global _DISTRIBUTED
            _DISTRIBUTED = True
            dist.destroy_process_group()  # without it, gloo/DeepSpeed runs were seen to abort at exit
    if summary["world"] > 1:  # lets a person (and the tests) see the ranks agree
        print(f"[rank {summary['rank']}] trainable weights sha256 {summary['weights_sha256']}", flush=True)
    if summary["main"]:
        print(f"done: step {summary['step']}, last checkpoint {summary['checkpoint']}")
    return 130 if summary["stopped_by"] == "SIGINT" else 0  # Ctrl-C: saved, but not done (as shells expect)


def own_words(err: Exception) -> str:
    """The error's message. One raised in a DataLoader worker (a damaged shard) arrives wrapped in
    the worker's traceback ("Caught ... in DataLoader worker process 0. Original Traceback ..."):
    its last line holds the message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text


_DISTRIBUTED = False


def _exit(code: int) -> None:
    """Exit a launched process. After a distributed run, past Python's teardown: some C++ thread
    of the process group (FSDP2 over gloo) could still be joinable when the interpreter's static
    objects are destroyed, and the process then aborted (SIGABRT, "terminate called without an
    active exception") after all its work was saved, failing the launch (seen in 2 of 4 CI runs).
    Everything is written and flushed by then: checkpoints atomically, trackers ended."""
    if _DISTRIBUTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
