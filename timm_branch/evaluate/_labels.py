"""Validation of integer class labels, shared by the probes."""
from __future__ import annotations

import torch
from torch import Tensor


def check_labels(labels: Tensor, n: int, num_classes: int, what: str) -> Tensor:
    """``labels`` as int64 after checking shape ``(n,)``, integer dtype and range ``[0, num_classes)``."""
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()
