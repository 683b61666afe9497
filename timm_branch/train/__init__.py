"""Training: optimisers, the continual task sequence and its strategies, checkpoints.

    from timm_branch.train import ContinualRun, TrainConfig
    final = ContinualRun(TrainConfig(method="byol", strategy="cassle+branch", output="runs/byol")).run()
"""
from .config import TrainConfig
from .continual import ContinualRun, Learner, NonFiniteLossError

__all__ = ["ContinualRun", "Learner", "NonFiniteLossError", "TrainConfig"]
