"""Training: flow matching (pure functions), optimisation, checkpoints, and the loop."""
