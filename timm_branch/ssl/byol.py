"""BYOL (Grill et al., NeurIPS 2020, arXiv 2006.07733): predict the momentum network's projection."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import SSLMethod, SSLOutput, momentum_copy, no_grad_apply
from .heads import prediction_mlp

__all__ = ["BYOL", "byol_loss"]


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``2 - 2 cos(p, z)``, averaged over the batch: the squared distance of the unit vectors.

    Args:
        p: online predictions, ``(B, D)``.
        z: targets, ``(B, D)``; detached here (the stop-gradient of BYOL).

    Returns:
        Scalar tensor in ``[0, 4]``: 0 when every ``p_b`` points along ``z_b``, 4 when opposite.
    """
    if p.shape != z.shape:
        raise ValueError(f"p and z must have one shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()


class BYOL(SSLMethod):
    """BYOL: projector and predictor ``Linear -> BN -> ReLU -> Linear``, and a momentum projector.

    Loss, symmetrised as in CaSSLe / solo-learn (a sum, so in ``[0, 8]``)::

        byol_loss(p1, z2_m) + byol_loss(p2, z1_m)

    where ``p_v = predictor(projector(feats[v]))`` and ``z_v_m = momentum_projector(momentum_feats[v])``.
    ``z`` are the online projector outputs ``(B, proj_output_dim)`` (before the predictor).

    Attributes:
        predictor: ``(B, proj_output_dim) -> (B, proj_output_dim)``.
        momentum_projector: EMA copy of ``projector`` (``requires_grad`` off); see :meth:`momentum_pairs`.
    """

    name = "byol"
    uses_momentum = True

    def __init__(self, feature_dim: int, recipe=None):
        super().__init__(feature_dim, recipe)
        self._require("pred_hidden_dim", "base_momentum")
        out = self.recipe.proj_output_dim
        self.predictor = prediction_mlp(out, self.recipe.pred_hidden_dim, out)
        self.momentum_projector = momentum_copy(self.projector)

    def momentum_pairs(self):
        return [(self.projector, self.momentum_projector)]

    def _forward(self, feats, momentum_feats):
        z1, z2 = (self.projector(f) for f in feats)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        m1, m2 = no_grad_apply(self.momentum_projector, momentum_feats)
        loss = byol_loss(p1, m2) + byol_loss(p2, m1)
        return SSLOutput(loss=loss, z=[z1, z2])
