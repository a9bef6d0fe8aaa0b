"""Training: the run's config, data sets and batches, the loop, the loss, checkpoints, distributed helpers
and the memory planner."""
