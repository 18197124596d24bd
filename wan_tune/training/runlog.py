"""What a run writes down as it goes: each step's record (metrics.jsonl on rank 0, the tracker every
`tracking.log_every` steps) and the held-out scores, with best.json and the checkpoint rotation
that keeps the best one."""

from __future__ import annotations

import json

from .checkpoint import best_checkpoint, prune_checkpoints
from .ema import averaged, exports_ema
from .heldout import EMA_SCORE, HeldOut, Scoreboard, format_heldout
from .launch import agree
from .metrics import METRICS_FILE, open_metrics


class RunLog:
    def __init__(self, run, heldout: HeldOut | None, start_step: int, drawn=None):
        self.run, self.heldout = run, heldout
        self.drawn = drawn  # data.sources: a DrawCounter of the samples drawn from each source
        self.tracking = run.recipe.tracking.backend != "none"
        self.losses: list[float] = []
        path = run.run_dir / METRICS_FILE
        self.metrics = open_metrics(path, start_step, run.say) if run.main else None
        # best.json follows the score of the weights export writes (the average, with train.ema_decay).
        key = EMA_SCORE if exports_ema(run.recipe) else "heldout_loss"
        self.board = Scoreboard(run.run_dir, path, run.say, key) if heldout is not None and run.main else None

    def step(self, record: dict) -> None:
        if self.drawn is not None:  # samples drawn from each source so far, over every rank
            record.update({f"drawn/{n}": k for n, k in self.drawn.advance(self.run.recipe.train.grad_accum).items()})
        self.losses.append(record["loss"])
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tracking and record["step"] % self.run.recipe.tracking.log_every == 0:
            self.run.accelerator.log({k: v for k, v in record.items() if k not in ("step", "expert")}, step=record["step"])

    def score_start(self, step: int) -> None:
        """The starting weights' held-out score, unless a run that got this far logged it already."""
        if self.heldout is not None and agree(self.run.accelerator, self.run.main and step not in self.board.scores):
            self.score(step)

    def score(self, step: int) -> None:
        """The held-out loss of the current weights (every rank: sharded forwards gather)."""
        run = self.run

        def losses() -> dict[str, float]:
            return self.heldout.losses(run.live(), run.variant, run.boundary, run.accelerator, run.compute_dtype,
                                       run.layout.cp)

        result = losses()
        with averaged(run.trainees) as swapped:  # train.ema_decay: the average's score beside the raw one
            if swapped:
                result.update({k.replace("heldout_loss", EMA_SCORE): v for k, v in losses().items()})
        run.say(format_heldout(step, result))
        if self.tracking:
            run.accelerator.log(result, step=step)
        if run.main:
            self.metrics.write(json.dumps({"step": step, **result}) + "\n")
            self.metrics.flush()
            best = self.board.add(step, result[self.board.key])
            if best is not None and best["step"] == step:
                run.say(f"best so far by held-out loss: {best['checkpoint']} (run folder's best.json)")
                # The old best may go now.
                prune_checkpoints(run.run_dir, run.recipe.checkpoint.keep_last, best_checkpoint(run.run_dir))

    def scores(self) -> dict[int, float]:
        return dict(sorted(self.board.scores.items())) if self.board is not None else {}

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.tracking:
            self.run.accelerator.end_training()
