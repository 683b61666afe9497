"""A frozen BatchNorm folded into its branched conv while the branch trains.

Under the ``"frozen"`` policy (:mod:`timm_branch.bn`) a BatchNorm layer is a fixed per-channel
affine map of its input, ``y = a * z + b`` with ``a = gamma / sqrt(running_var + eps)`` and
``b = beta - a * running_mean``. When a branched conv's output goes, unchanged, into such a layer
alone, a training step can compute ``conv(x, a * (W + delta), a * bias + b)`` and skip the layer:
one elementwise pass over the activation less in the forward and one in the backward, and one
activation less kept for the backward, per pair. The branch gradient is ``a`` times the folded
kernel's (:class:`~timm_branch.branch_conv.BranchedConv` applies the fold).

The fold changes only how a step computes. ``W``, ``delta`` and the layer's tensors stay as they
are, so merging writes ``W + delta`` into the conv, leaves the layer untouched, and the export is
the stock model. It applies exactly when the branch's tap-only backward does (gradients enabled,
the branch trainable, the kernel frozen: :func:`~timm_branch.branch.tap_backward_applies`) and the
layer is frozen (eval mode, running statistics, no affine parameter requiring a gradient). Both
modules ask one shared :class:`Fold`, so either both fold or neither does; in evaluation, under
``no_grad`` or under another policy each runs its own forward.

Which pairs fold: those :func:`~timm_branch.pairs.find_conv_norm_pairs` marks ``direct`` (the traced
graph calls the conv once and hands its output to the layer alone), with a plain conv (one that
takes the tap-only backward) and a layer whose forward is ``torch.nn``'s BatchNorm (1-D, 2-D, 3-D)
or timm's ``BatchNormAct2d`` (whose dropout and activation then run on the folded output).

The fold follows the modules, not the graph: replace a folded layer by a new module after
:func:`~timm_branch.add_branches` (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, timm's
``freeze_batch_norm_2d``) and its conv would still fold while the new layer normalises again.
Convert norm layers before adding branches (a layer that changes class in place, as
:func:`timm_branch.train.distributed.synced_batchnorm` does, simply stops folding).

Rounding: the folded step multiplies in another order than conv-then-BatchNorm, so its outputs and
gradients equal the unfolded ones up to rounding (float64: ~1e-15 relative), not bit for bit.
"""
from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .branch import get_branch, tap_backward_applies

_FORWARDS = (_BatchNorm.forward, BatchNormAct2d.forward)


class Fold:
    """The shared state of one folded conv -> BatchNorm pair.

    Held by both modules as a plain attribute (``_fold``), not as a submodule: it adds no
    state-dict key, and a deep copy of the model (a momentum encoder) copies it with the pair.
    """

    def __init__(self, conv: nn.Module, norm: nn.Module):
        self.conv, self.norm = conv, norm

    def norm_frozen(self) -> bool:
        """Whether the layer is a fixed affine map now (eval mode, running statistics, no gradient)
        that passes its input through: a layer whose class was changed since (say to
        ``SyncBatchNorm``) runs its own forward, so the conv must not fold it."""
        norm = self.norm
        return (type(norm).forward is _folded_forward and not norm.training
                and norm.running_mean is not None and norm.running_var is not None
                and not any(p.requires_grad for p in norm._parameters.values() if p is not None))

    def active(self) -> bool:
        """Whether this forward folds: the conv takes the tap-only backward and the layer is frozen."""
        return tap_backward_applies(self.conv) and self.norm_frozen()

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``, each ``(C,)``: the layer's map ``y = a * z + b`` in eval mode."""
        norm = self.norm
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        return scale, shift if norm.bias is None else shift + norm.bias


def can_fold(conv: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm`` (fed directly by the branched ``conv``) has a forward the fold reproduces and
    ``conv`` takes the tap-only backward (a plain convolution)."""
    branch = get_branch(conv)
    return (branch is not None and branch.geometry is not None and type(norm).forward in _FORWARDS
            and getattr(norm, "track_running_stats", False) and getattr(norm, "_fold", None) is None)


def fold(conv: nn.Module, norm: nn.Module) -> None:
    """Fold ``norm`` into the branched ``conv`` (see :func:`can_fold`); :func:`unfold` undoes it."""
    if not can_fold(conv, norm):
        raise ValueError(f"cannot fold {type(norm).__name__} into {type(conv).__name__}: see timm_branch.bn_fold.can_fold")
    shared = Fold(conv, norm)
    # Plain attributes (object.__setattr__ skips nn.Module's submodule registration).
    object.__setattr__(conv, "_fold", shared)
    object.__setattr__(norm, "_fold", shared)
    norm.__class__ = _folded_class(type(norm))


def unfold(norm: nn.Module) -> None:
    """Undo :func:`fold` for ``norm``: both modules run their own forwards again."""
    shared = norm.__dict__.pop("_fold")
    shared.conv.__dict__.pop("_fold", None)
    norm.__class__ = type(norm).__bases__[0]


def is_folded(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer folded into its conv."""
    return isinstance(module.__dict__.get("_fold"), Fold) and module.__dict__["_fold"].norm is module


def _folded_class(base: type) -> type:
    """The layer's own subclass, as torch.nn.utils.parametrize makes one for a parametrized conv."""
    return type(f"Folded{base.__name__}", (base,), {"forward": _folded_forward, "__reduce_ex__": _reduce_folded})


def _reduce_folded(self: nn.Module, protocol: int) -> tuple:
    """Pickling (``torch.save(model)``): on load :func:`_new_folded` remakes the class, the state
    (with the shared :class:`Fold`) fills it as for any module."""
    return _new_folded, (type(self).__bases__[0],), self.__dict__


def _new_folded(base: type) -> nn.Module:
    norm = base.__new__(base)
    norm.__class__ = _folded_class(base)
    return norm


def _folded_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a folded layer: its conv already applied the affine map when folding."""
    if not self._fold.active():
        return super(type(self), self).forward(x)
    if isinstance(self, BatchNormAct2d):
        return self.act(self.drop(x))
    return x
