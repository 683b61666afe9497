"""The interface every SSL method implements: heads + loss on the backbone features of two views.

The trainer owns the backbone (a timm model) and, for BYOL and MoCo, its momentum copy. Per step
it computes, for each of the two augmented views ``x_v`` of a batch,

    feats[v] = model.forward_head(model.forward_features(x_v), pre_logits=True)   # (B, feature_dim)

(and ``momentum_feats[v]`` with the momentum backbone, under ``torch.no_grad()``), then calls
``method(feats, momentum_feats)`` and back-propagates ``out.loss``. ``out.z`` holds the online
projector outputs, which CaSSLe distils (:mod:`timm_branch.ssl.cassle`). After the optimiser
step it updates the momentum networks with :func:`timm_branch.ssl.momentum.ema_update`, for the
backbone pair and for every pair of :meth:`SSLMethod.momentum_pairs`.

Data-parallel training: the methods call no collective of their own. The trainer gathers the
backbone features of the global batch from every process with the differentiable
:func:`timm_branch.train.distributed.gather_rows` and passes those, so the heads (BatchNorm
included), losses, queues and Sinkhorn see the whole batch, as on one process. A custom
``DistributedDataParallel`` loop does the same: ``method([gather_rows(f) for f in feats], ...)``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from .heads import projection_mlp
from .recipe import RECIPES, Recipe

__all__ = ["SSLMethod", "SSLOutput"]


@dataclass
class SSLOutput:
    """What :meth:`SSLMethod.forward` returns.

    Attributes:
        loss: the SSL loss, a scalar tensor (0-dim) attached to the graph of ``feats``.
        z: the online projector output of each view, ``(B, proj_output_dim)``, in view order.
    """

    loss: Tensor
    z: list[Tensor]


class SSLMethod(nn.Module):
    """Base class of the SSL methods: a projector (built from the recipe) and a loss.

    Subclasses set ``name`` (a key of :data:`~timm_branch.ssl.recipe.RECIPES`) and
    ``uses_momentum``, build their extra heads in ``__init__``, and implement :meth:`_forward`.

    Args:
        feature_dim: width of the backbone features (``model.num_features`` for timm models).
        recipe: hyperparameters; ``None`` takes ``RECIPES[name]``.

    Attributes:
        recipe: the :class:`~timm_branch.ssl.recipe.Recipe` in use.
        feature_dim: as given.
        projector: ``(B, feature_dim) -> (B, recipe.proj_output_dim)``.
    """

    name: ClassVar[str] = ""
    uses_momentum: ClassVar[bool] = False
    num_views: ClassVar[int] = 2

    def __init__(self, feature_dim: int, recipe: Recipe | None = None):
        super().__init__()
        if recipe is None:
            if self.name not in RECIPES:
                raise ValueError(f"{type(self).__name__} has no default recipe; pass recipe=Recipe(...)")
            recipe = RECIPES[self.name]
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a timm_branch.ssl.Recipe, got {type(recipe).__name__}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.recipe = recipe
        self.projector = projection_mlp(
            self.feature_dim,
            recipe.proj_hidden_dim,
            recipe.proj_output_dim,
            num_layers=recipe.proj_layers,
            batch_norm=recipe.proj_bn,
        )

    def forward(self, feats: Sequence[Tensor], momentum_feats: Sequence[Tensor] | None = None) -> SSLOutput:
        """The SSL loss of one step.

        Args:
            feats: online backbone features of each view, two tensors ``(B, feature_dim)``.
            momentum_feats: the momentum backbone's features of the same views, same shapes;
                required if and only if ``uses_momentum``. They are used without gradient.

        Returns:
            :class:`SSLOutput` with the scalar loss and the per-view projector outputs.

        Raises:
            ValueError: wrong number of views, wrong shapes, or ``momentum_feats`` missing for a
                momentum method (or given to a method without a momentum encoder).
        """
        feats = self._check_views(feats, "feats")
        if self.uses_momentum:
            if momentum_feats is None:
                raise ValueError(
                    f"{self.name} uses a momentum encoder: pass momentum_feats, the momentum backbone's "
                    f"features of the same {self.num_views} views (computed under torch.no_grad())"
                )
            momentum_feats = self._check_views(momentum_feats, "momentum_feats", like=feats[0])
        elif momentum_feats is not None:
            raise ValueError(f"{self.name} has no momentum encoder; momentum_feats must be None")
        return self._forward(feats, momentum_feats)

    def _forward(self, feats: list[Tensor], momentum_feats: list[Tensor] | None) -> SSLOutput:
        raise NotImplementedError

    def project(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """The per-view ``z`` of :class:`SSLOutput` alone: no loss, no queue update.

        Use it on CaSSLe's frozen copy of the method to get the distillation targets.
        Each output is ``(B, proj_output_dim)``.
        """
        return [self.projector(f) for f in self._check_views(feats, "feats")]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online head, momentum copy)`` pairs the trainer EMA-updates after each step.

        Empty for methods without a momentum encoder. The backbone pair is the trainer's own.
        """
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for the trainer to call at the start of every epoch, counted from 0 within a task.

        A no-op except for SwAV (queue start, prototype freezing); calling it is optional.
        """

    def _require(self, *fields: str) -> None:
        missing = [f for f in fields if getattr(self.recipe, f) is None]
        if missing:
            raise ValueError(f"{self.name} needs recipe fields {', '.join(missing)}, which are None")

    def _check_views(self, views: Sequence[Tensor], what: str, like: Tensor | None = None) -> list[Tensor]:
        if isinstance(views, Tensor) or not isinstance(views, Sequence):
            raise ValueError(f"{what} must be a list of {self.num_views} tensors (one per view), got {type(views).__name__}")
        views = list(views)
        if len(views) != self.num_views:
            raise ValueError(f"{what} must hold {self.num_views} views, got {len(views)}")
        ref = views[0] if like is None else like
        for v in views:
            if not isinstance(v, Tensor) or v.dim() != 2 or v.shape[1] != self.feature_dim:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{what}: every view must be (B, {self.feature_dim}), got {shape}")
            if v.shape != ref.shape:
                raise ValueError(f"{what}: views must share one shape, got {tuple(v.shape)} and {tuple(ref.shape)}")
        return views

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}"


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad`` off: the initial momentum head."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def no_grad_apply(module: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
    """``[module(x) for x in inputs]`` without gradient (momentum heads)."""
    return [module(x) for x in inputs]
