"""The training stage's errors. Each message says why and what was kept; the CLI prints it as one line."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training stopped (or cannot start); the message says why and what was kept."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked."""
