"""Training: optimisers, one task's loop, the continual task sequence and its strategies, checkpoints."""
