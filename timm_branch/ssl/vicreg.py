"""VICReg (Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906): variance-invariance-covariance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SSLMethod, SSLOutput

__all__ = ["VICReg", "covariance_loss", "invariance_loss", "variance_loss", "vicreg_loss"]


def invariance_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """``s(Z, Z')``: mean squared error over all ``B x D`` entries, ``(B, D), (B, D) -> ()``."""
    return F.mse_loss(z1, z2)


def variance_loss(z: Tensor, eps: float = 1e-4) -> Tensor:
    """``v(Z)``: hinge on each column's standard deviation, ``mean_j relu(1 - sqrt(Var(z_j) + eps))``.

    ``Var`` is the unbiased batch variance (as the paper and its code). ``(B, D) -> ()``, ``B >= 2``;
    0 as soon as every column's standard deviation is at least 1.
    """
    return F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()


def covariance_loss(z: Tensor) -> Tensor:
    """``c(Z)``: sum of the squared off-diagonal entries of the (unbiased) covariance, over ``D``.

    ``(B, D) -> ()``, ``B >= 2``.
    """
    b, d = z.shape
    zc = z - z.mean(0)
    cov = zc.T @ zc / (b - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_loss(z1: Tensor, z2: Tensor, sim_w: float, var_w: float, cov_w: float, eps: float = 1e-4) -> Tensor:
    """``sim_w * s(Z, Z') + var_w * (v(Z) + v(Z')) + cov_w * (c(Z) + c(Z'))`` (the paper's eq. 6).

    The variance terms of the two branches are summed, as in the paper's equation and in
    solo-learn / CaSSLe (the authors' code and lightly average them instead, i.e. half the term).

    Args:
        z1, z2: projections of the two views, ``(B, D)``, ``B >= 2``.
        sim_w, var_w, cov_w: the weights (25, 25, 1 in the recipe).
        eps: added to the variances before the square root.

    Returns:
        Scalar tensor.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be (B, D) of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    return (
        sim_w * invariance_loss(z1, z2)
        + var_w * (variance_loss(z1, eps) + variance_loss(z2, eps))
        + cov_w * (covariance_loss(z1) + covariance_loss(z2))
    )


class VICReg(SSLMethod):
    """VICReg: 3-layer projector (``Linear -> BN -> ReLU`` twice, then ``Linear``) and
    :func:`vicreg_loss` with the recipe's weights.

    ``z`` are the raw projector outputs ``(B, proj_output_dim)``.
    """

    name = "vicreg"
    uses_momentum = False

    def __init__(self, feature_dim: int, recipe=None):
        super().__init__(feature_dim, recipe)
        self._require("sim_weight", "var_weight", "cov_weight")

    def _forward(self, feats, momentum_feats):
        z1, z2 = (self.projector(f) for f in feats)
        r = self.recipe
        return SSLOutput(loss=vicreg_loss(z1, z2, r.sim_weight, r.var_weight, r.cov_weight), z=[z1, z2])
