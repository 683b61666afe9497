"""SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020, arXiv 2002.05709): the NT-Xent loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SSLMethod, SSLOutput

__all__ = ["SimCLR", "nt_xent_loss"]


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Normalised-temperature cross-entropy over the ``2B`` projections of a batch.

    Each of the ``2B`` L2-normalised projections is an anchor whose positive is the other view of
    the same sample and whose negatives are the remaining ``2B - 2`` projections (both views)::

        loss = mean_i  -log( exp(s(i, pos(i)) / T) / sum_{j != i} exp(s(i, j) / T) )

    with ``s`` the cosine similarity. Same value as solo-learn's ``simclr_loss_func`` and
    lightly's ``NTXentLoss`` without a memory bank.

    Args:
        z1, z2: projections of view 1 and view 2, ``(B, D)``; row ``b`` of both is sample ``b``.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be (B, D) of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.arange(2 * b, device=z.device).roll(b)  # b..2b-1, 0..b-1, made on the device
    return F.cross_entropy(logits, positives)


class SimCLR(SSLMethod):
    """SimCLR: projector ``Linear -> ReLU -> Linear`` (CaSSLe's CIFAR form) and :func:`nt_xent_loss`.

    ``z`` are the raw projector outputs ``(B, proj_output_dim)``.
    """

    name = "simclr"
    uses_momentum = False

    def __init__(self, feature_dim: int, recipe=None):
        super().__init__(feature_dim, recipe)
        self._require("temperature")

    def _forward(self, feats, momentum_feats):
        z1, z2 = (self.projector(f) for f in feats)
        return SSLOutput(loss=nt_xent_loss(z1, z2, self.recipe.temperature), z=[z1, z2])
