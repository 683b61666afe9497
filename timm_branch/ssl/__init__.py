"""Self-supervised methods for continual SSL with Branch-tuning, and CaSSLe's distillers.

One concept per file: ``recipe.py`` (per-method CIFAR defaults), ``heads.py`` (projector,
predictor, prototypes), one file per method holding its loss function and its
:class:`SSLMethod` subclass (``simclr``, ``byol``, ``barlow``, ``moco``, ``vicreg``, ``swav``),
``momentum.py`` (EMA update and schedule), ``cassle.py`` (distillers).

Typical use, with a timm backbone owned by the trainer::

    method = build_method("byol", model.num_features)
    out = method([f1, f2], [m1, m2])       # backbone features of two views (+ momentum copy)
    out.loss.backward()
    ...
    for online, target in [(model, momentum_model), *method.momentum_pairs()]:
        ema_update(online, target, cosine_momentum(step, total, method.recipe.base_momentum,
                                                   method.recipe.final_momentum))
"""
from __future__ import annotations

import dataclasses

from .barlow import BarlowTwins, barlow_twins_loss
from .base import SSLMethod, SSLOutput
from .byol import BYOL, byol_loss
from .cassle import Distiller, build_distiller
from .heads import Prototypes, prediction_mlp, projection_mlp
from .moco import MoCo, moco_loss
from .momentum import cosine_momentum, ema_update
from .recipe import RECIPES, Recipe
from .simclr import SimCLR, nt_xent_loss
from .swav import SwAV, sinkhorn, swav_loss
from .vicreg import VICReg, vicreg_loss

METHODS: tuple[str, ...] = ("simclr", "byol", "barlow", "moco", "vicreg", "swav")

_CLASSES: dict[str, type[SSLMethod]] = {
    cls.name: cls for cls in (SimCLR, BYOL, BarlowTwins, MoCo, VICReg, SwAV)
}


def build_method(name: str, feature_dim: int, **overrides) -> SSLMethod:
    """The SSL method ``name`` on features of width ``feature_dim``, with its CIFAR recipe.

    Args:
        name: one of :data:`METHODS`.
        feature_dim: the backbone's feature width (``model.num_features`` for timm models).
        **overrides: :class:`Recipe` fields to replace, e.g. ``temperature=0.5``.

    Raises:
        ValueError: unknown method or unknown recipe field (the message lists the choices).
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")
    fields = [f.name for f in dataclasses.fields(Recipe)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown recipe field(s) {', '.join(unknown)}; Recipe fields are {', '.join(fields)}")
    recipe = dataclasses.replace(RECIPES[name], **overrides)
    return _CLASSES[name](feature_dim, recipe)


__all__ = [
    "BYOL",
    "BarlowTwins",
    "Distiller",
    "METHODS",
    "MoCo",
    "Prototypes",
    "RECIPES",
    "Recipe",
    "SSLMethod",
    "SSLOutput",
    "SimCLR",
    "SwAV",
    "VICReg",
    "barlow_twins_loss",
    "build_distiller",
    "build_method",
    "byol_loss",
    "cosine_momentum",
    "ema_update",
    "moco_loss",
    "nt_xent_loss",
    "prediction_mlp",
    "projection_mlp",
    "sinkhorn",
    "swav_loss",
    "vicreg_loss",
]
