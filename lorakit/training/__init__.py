"""Training: the run loop, data, the loss, checkpoints, distributed helpers and the memory planner."""
