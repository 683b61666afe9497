"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021, arXiv 2103.03230)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SSLMethod, SSLOutput

__all__ = ["BarlowTwins", "barlow_twins_loss"]


def _standardize(z: Tensor, eps: float) -> Tensor:
    # BatchNorm1d(affine=False) in training mode, as the reference code: biased variance.
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lamb: float, scale: float, eps: float = 1e-5) -> Tensor:
    """Push the cross-correlation matrix of the two views' standardised projections to identity.

    With ``z1n, z2n`` the columns of ``z1, z2`` standardised over the batch (mean 0, biased
    standard deviation 1, ``eps`` added to the variance as BatchNorm does)::

        C = z1n.T @ z2n / B                                   # (D, D)
        loss = scale * ( sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2 )

    ``scale`` is solo-learn's ``scale_loss`` (0.1 in the CIFAR recipe; 1 in the paper, which
    instead lowers the learning rate).

    Args:
        z1, z2: projections of the two views, ``(B, D)``, ``B >= 2``.
        lamb: weight of the off-diagonal (redundancy-reduction) terms.
        scale: overall factor.
        eps: added to each column's variance before dividing (BatchNorm1d's default).

    Returns:
        Scalar tensor.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be (B, D) of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    c = _standardize(z1, eps).T @ _standardize(z2, eps) / b
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale * (on_diag + lamb * off_diag)


class BarlowTwins(SSLMethod):
    """Barlow Twins: 3-layer projector (``Linear -> BN -> ReLU`` twice, then ``Linear``) and
    :func:`barlow_twins_loss` with the recipe's ``lamb`` and ``scale_loss``.

    ``z`` are the raw projector outputs ``(B, proj_output_dim)``.
    """

    name = "barlow"
    uses_momentum = False

    def __init__(self, feature_dim: int, recipe=None):
        super().__init__(feature_dim, recipe)
        self._require("lamb", "scale_loss")

    def _forward(self, feats, momentum_feats):
        z1, z2 = (self.projector(f) for f in feats)
        loss = barlow_twins_loss(z1, z2, self.recipe.lamb, self.recipe.scale_loss)
        return SSLOutput(loss=loss, z=[z1, z2])
