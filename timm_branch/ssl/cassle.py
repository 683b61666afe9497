"""CaSSLe distillers (Fini, da Costa, Alameda-Pineda, Ricci, Alahari, Mairal, CVPR 2022).

CaSSLe turns each SSL loss into a distillation loss towards a frozen copy of the model from the
end of the previous task: the current projections ``z`` go through a learned predictor
``Linear -> BN -> ReLU -> Linear`` (hidden 2048) and are pulled towards the frozen model's
projections ``z_frozen`` of the same views. The training loss of a task after the first is
``ssl_loss + distiller(z, z_frozen, method, frozen_method)``.

Per method, following CaSSLe's ``cassle/distillers/*.py`` (github.com/DonkeyShot21/cassle):

- SimCLR, MoCo v2+ (``contrastive``): symmetric InfoNCE between the ``2B`` predictions and the
  ``2B`` frozen projections, both L2-normalised: with ``L = P @ F.T / T`` (``(2B, 2B)``), the
  loss is ``(CE(L, diag) + CE(L.T, diag)) / 2``; every other frozen projection, including the
  other view of the same sample, is a negative. ``T = distill_temperature`` (0.2).
- BYOL (``predictive``): ``byol_loss(p_v, z_frozen_v)`` averaged over the views.
- Barlow Twins (``decorrelative``): ``barlow_twins_loss(p_v, z_frozen_v, lamb, scale_loss)``
  averaged over the views (CaSSLe: lamb 5e-3, scale 0.1, the recipe's values).
- VICReg (``predictive_mse``): the invariance (MSE) term ``mse(p_v, z_frozen_v)`` averaged over
  the views, times ``distill_weight`` = 25 (CaSSLe's default ``distill_lamb`` for it).
- SwAV (``knowledge``): cross-entropy between prototype distributions at ``T = 0.1``: targets
  ``softmax(P_frozen(normalize(z_frozen_v)) / T)`` with the frozen method's prototypes
  (renormalised), predictions ``log_softmax(P_d(normalize(p_v)) / T)`` with the distiller's
  *own*, learnable prototypes ``P_d``. CaSSLe uses a plain softmax here, not Sinkhorn codes,
  and a separate prototype layer, not the current method's prototypes.

The returned value already includes ``recipe.distill_weight`` (1 except VICReg).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .barlow import barlow_twins_loss
from .base import SSLMethod
from .byol import byol_loss
from .heads import Prototypes, prediction_mlp
from .recipe import Recipe
from .vicreg import invariance_loss

__all__ = ["DISTILL_HIDDEN_DIM", "Distiller", "build_distiller", "contrastive_distill_loss"]

DISTILL_HIDDEN_DIM = 2048
"""Hidden width of CaSSLe's distillation predictor (``--distill_proj_hidden_dim``)."""

_KINDS = {
    "simclr": "contrastive",
    "moco": "contrastive",
    "byol": "predictive",
    "barlow": "decorrelative",
    "vicreg": "predictive_mse",
    "swav": "knowledge",
}


def contrastive_distill_loss(p: Sequence[Tensor], z_frozen: Sequence[Tensor], temperature: float) -> Tensor:
    """CaSSLe's symmetric InfoNCE between predictions and frozen projections.

    Args:
        p: per view, predictions ``(B, D)``.
        z_frozen: per view, frozen projections ``(B, D)`` (detached here).
        temperature: ``T > 0``.

    Returns:
        ``(CE(L, arange) + CE(L.T, arange)) / 2`` with ``L = normalize(cat p) @ normalize(cat z_frozen).T / T``.
    """
    pc = F.normalize(torch.cat(list(p)), dim=1)
    fc = F.normalize(torch.cat([z.detach() for z in z_frozen]), dim=1)
    logits = pc @ fc.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Distiller(nn.Module):
    """The CaSSLe distiller of one SSL method (see the module docstring for the losses).

    Build it with :func:`build_distiller`. Its parameters (``predictor``, and for SwAV
    ``prototypes``) are trained with the method's; hand them to the optimiser.

    Args:
        method_name: the method it belongs to (a key of ``RECIPES``).
        recipe: that method's recipe (temperature, Barlow weights, distill weight).
        hidden_dim: the predictor's hidden width.

    Attributes:
        predictor: ``(B, proj_output_dim) -> (B, proj_output_dim)``.
        prototypes: SwAV only, ``Prototypes(proj_output_dim, num_prototypes)``.
    """

    def __init__(self, method_name: str, recipe: Recipe, hidden_dim: int = DISTILL_HIDDEN_DIM):
        super().__init__()
        if method_name not in _KINDS:
            raise ValueError(f"no CaSSLe distiller for {method_name!r}; choose one of {', '.join(_KINDS)}")
        self.method_name = method_name
        self.kind = _KINDS[method_name]
        self.recipe = recipe
        out = recipe.proj_output_dim
        self.predictor = prediction_mlp(out, hidden_dim, out)
        if self.kind == "knowledge":
            self.prototypes = Prototypes(out, recipe.num_prototypes)
        needs = {"contrastive": ["distill_temperature"], "knowledge": ["distill_temperature", "num_prototypes"],
                 "decorrelative": ["lamb", "scale_loss"]}.get(self.kind, [])
        missing = [f for f in needs if getattr(recipe, f) is None]
        if missing:
            raise ValueError(f"the {self.kind} distiller of {method_name} needs recipe fields {', '.join(missing)}")

    def forward(
        self,
        z: Sequence[Tensor],
        z_frozen: Sequence[Tensor],
        method: SSLMethod,
        frozen_method: SSLMethod | None,
    ) -> Tensor:
        """The weighted distillation loss, a scalar.

        Args:
            z: the current method's projections per view, ``(B, proj_output_dim)``
                (``SSLOutput.z``).
            z_frozen: the frozen model's projections of the same views, same shapes
                (``frozen_method.project(frozen_feats)`` under ``torch.no_grad()``).
            method: the current method (checked against the distiller's).
            frozen_method: the frozen copy of the method from the end of the previous task;
                required for SwAV (its prototypes make the targets), unused otherwise.
        """
        if method.name != self.method_name:
            raise ValueError(f"this distiller was built for {self.method_name}, not {method.name}")
        z, z_frozen = list(z), list(z_frozen)
        if len(z) != len(z_frozen) or not z:
            raise ValueError(f"z and z_frozen must hold the same views, got {len(z)} and {len(z_frozen)}")
        for a, b in zip(z, z_frozen):
            if a.shape != b.shape:
                raise ValueError(f"z and z_frozen views must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        p = [self.predictor(v) for v in z]
        r = self.recipe
        if self.kind == "contrastive":
            loss = contrastive_distill_loss(p, z_frozen, r.distill_temperature)
        elif self.kind == "predictive":
            loss = _mean(byol_loss(a, b) for a, b in zip(p, z_frozen))
        elif self.kind == "decorrelative":
            loss = _mean(barlow_twins_loss(a, b.detach(), r.lamb, r.scale_loss) for a, b in zip(p, z_frozen))
        elif self.kind == "predictive_mse":
            loss = _mean(invariance_loss(a, b.detach()) for a, b in zip(p, z_frozen))
        else:
            loss = self._knowledge(p, z_frozen, frozen_method)
        return r.distill_weight * loss

    def _knowledge(self, p: list[Tensor], z_frozen: list[Tensor], frozen_method: SSLMethod | None) -> Tensor:
        frozen_protos = getattr(frozen_method, "prototypes", None)
        if not isinstance(frozen_protos, Prototypes):
            raise ValueError("the SwAV distiller needs frozen_method, the frozen SwAV copy with its prototypes")
        t = self.recipe.distill_temperature
        with torch.no_grad():
            frozen_weight = F.normalize(frozen_protos.weight.detach(), dim=1)
            targets = [F.softmax(F.linear(F.normalize(v.detach(), dim=1), frozen_weight.to(v.dtype)) / t, dim=1)
                       for v in z_frozen]
        if self.training:
            self.prototypes.normalize_()
        losses = []
        for a, target in zip(p, targets):
            log_pred = F.log_softmax(self.prototypes(F.normalize(a, dim=1)) / t, dim=1)
            losses.append(-(target * log_pred).sum(dim=1).mean())
        return _mean(losses)


def _mean(losses) -> Tensor:
    losses = list(losses)
    return torch.stack(losses).mean()


def build_distiller(method: SSLMethod, hidden_dim: int = DISTILL_HIDDEN_DIM) -> Distiller:
    """The CaSSLe distiller for ``method``, on the method's device and dtype."""
    distiller = Distiller(method.name, method.recipe, hidden_dim)
    ref = next(method.parameters(), None)
    if ref is not None:
        distiller.to(device=ref.device, dtype=ref.dtype)
    return distiller
