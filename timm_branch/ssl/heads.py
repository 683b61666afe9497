"""SSL heads: projector and predictor MLPs, and SwAV's prototypes.

The heads sit on the backbone's pooled features ``(B, feature_dim)`` (for a timm model,
``model.forward_head(model.forward_features(x), pre_logits=True)``). Their shapes follow the
CaSSLe / solo-learn code the CIFAR recipes were run with (see :mod:`timm_branch.ssl.recipe`):

- SimCLR, MoCo v2+: ``Linear -> ReLU -> Linear`` (no BatchNorm);
- BYOL, SwAV: ``Linear -> BN -> ReLU -> Linear``; BYOL's predictor has the same shape;
- Barlow Twins, VICReg: ``Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Prototypes", "prediction_mlp", "projection_mlp"]


def projection_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    batch_norm: bool = True,
    last_bn: bool = False,
) -> nn.Sequential:
    """An MLP ``(B, in_dim) -> (B, out_dim)`` with ``num_layers`` Linear layers.

    Every hidden layer is ``Linear(., hidden_dim) [-> BatchNorm1d] -> ReLU``; the last layer is a
    plain ``Linear(., out_dim)``, followed by a ``BatchNorm1d(out_dim)`` if ``last_bn``.
    The hidden Linear layers have biases (as in CaSSLe / solo-learn).

    Args:
        in_dim: input width (the backbone's feature dimension).
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        num_layers: number of Linear layers, at least 1 (1 is a single Linear).
        batch_norm: put a BatchNorm1d after each hidden Linear.
        last_bn: put a BatchNorm1d after the last Linear.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


def prediction_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's predictor (Grill et al., NeurIPS 2020) and CaSSLe's distillation predictor
    (Fini et al., CVPR 2022): ``Linear -> BatchNorm1d -> ReLU -> Linear``, ``(B, in_dim) -> (B, out_dim)``."""
    return projection_mlp(in_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True)


class Prototypes(nn.Module):
    """SwAV's prototypes (Caron et al., NeurIPS 2020): a bias-free linear layer whose rows are
    kept on the unit sphere, so that ``forward(z)`` of an L2-normalised ``z`` gives cosine scores.

    ``forward``: ``(B, in_dim) -> (B, num_prototypes)``, a plain ``z @ weight.T``. The rows are
    re-normalised in place by :meth:`normalize_`, which the owner calls before each training
    forward (as the SwAV reference code does at every iteration), not by the forward itself:
    the gradient flows to the weight as to any linear layer.

    Attributes:
        weight: ``(num_prototypes, in_dim)``, unit-norm rows after :meth:`normalize_`.
    """

    def __init__(self, in_dim: int, num_prototypes: int):
        super().__init__()
        self.in_dim = in_dim
        self.num_prototypes = num_prototypes
        self.weight = nn.Parameter(torch.empty(num_prototypes, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default initialisation
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Scale every prototype (row of ``weight``) to unit L2 norm, in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_prototypes={self.num_prototypes}"
