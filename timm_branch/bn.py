"""BatchNorm policies that hold while branches train.

Branch-tuning keeps BatchNorm fixed so that it carries what the model already knows. Three
policies, applied per BatchNorm layer (any ``torch.nn.modules.batchnorm._BatchNorm``, timm's
``BatchNormAct2d`` and ``SyncBatchNorm`` included):

- ``"frozen"`` (default): the layer stays in eval mode even after ``model.train()``; its affine
  parameters are frozen and its running statistics are neither used from the batch nor updated.
- ``"affine"``: affine parameters frozen, the layer follows the model's train/eval mode, so in
  train mode it normalises with batch statistics and updates its running statistics (what the
  authors' code did).
- ``"train"``: affine parameters trainable, the layer follows the model's mode.

With ``add_branches(norms=("layer", "group", ...))`` the same policy applies to LayerNorm and
GroupNorm layers (this project's extension; the paper studied BatchNorm). They have no running
statistics, so only the affine parameters differ: frozen under ``"frozen"`` and ``"affine"``
(``"frozen"`` also pins the layer in eval mode, which changes nothing in its output), trainable
under ``"train"``.
"""
from __future__ import annotations

import functools
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BNPolicy = Literal["frozen", "affine", "train"]
BN_POLICIES: tuple[str, ...] = ("frozen", "affine", "train")


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (any ``_BatchNorm`` subclass)."""
    return isinstance(module, _BatchNorm)


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` naming the choices when ``policy`` is not a BN policy."""
    if policy not in BN_POLICIES:
        raise ValueError(f"unknown BatchNorm policy {policy!r}; choose one of {', '.join(BN_POLICIES)}")


def apply_policy(bn: nn.Module, policy: str) -> None:
    """Put ``bn`` under ``policy``; :func:`release` undoes the mode pinning of ``"frozen"``.

    The caller records and restores ``requires_grad`` flags; this only sets them.
    """
    check_policy(policy)
    trainable = policy == "train"
    for param in bn.parameters(recurse=False):
        param.requires_grad_(trainable)
    if policy == "frozen":
        nn.Module.train(bn, False)
        # An instance attribute shadows Module.train, so model.train() leaves this layer in eval.
        # A partial, not a bound method: it pickles (torch.save(model)) and deep-copies.
        bn.train = functools.partial(_stay_in_eval, bn)


def release(bn: nn.Module, training: bool) -> None:
    """Undo :func:`apply_policy`'s mode pinning and set the layer's mode to ``training``."""
    bn.__dict__.pop("train", None)
    bn.train(training)


def is_pinned(bn: nn.Module) -> bool:
    """Whether ``bn`` is held in eval mode by the ``"frozen"`` policy."""
    return "train" in bn.__dict__


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)
