"""Frozen backbone features of a timm model, for kNN and linear-probe evaluation.

The feature of an image is what timm calls the *pre-logits* feature:
``model.forward_head(model.forward_features(x), pre_logits=True)``, i.e. the backbone output after
the model's own global pooling (and whatever timm puts before the classifier, for example
ConvNeXt's head norm). It does not depend on the classifier, so it works with any
``num_classes``, ``num_classes=0`` included.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["extract_features"]


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 if none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def extract_features(
    model: nn.Module,
    images: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """Global-pooled features of ``images`` from a frozen timm ``model``.

    Args:
        model: a timm model (anything with ``forward_features`` and ``forward_head``).
        images: uint8 tensor of shape (N, C, H, W), pixel values 0..255, on any device.
        transform: maps a uint8 batch (B, C, H, W), already on ``device``, to the float batch the
            model expects (B, C, H', W'), for example ``lambda x: x.float() / 255`` or the data
            package's normalisation. Its output is cast to the model's floating dtype.
        batch_size: images per forward pass (a memory knob; the result does not depend on it
            beyond floating-point rounding).
        device: where the forward passes run; default: the device of the model's parameters.

    Returns:
        float32 tensor of shape (N, D) on the CPU, D = ``model.num_features`` for most timm
        models (the width of the pre-logits feature), row i the feature of ``images[i]``.

    The forward passes run in eval mode (BatchNorm uses its running statistics and updates
    nothing; dropout is off) under ``torch.no_grad()``. Afterwards every submodule's ``training``
    flag is set back to what it was before the call, one module at a time: a model with mixed
    modes (for example BatchNorms pinned in eval by a Branch-tuning BN policy inside a model in
    train mode) comes back exactly as it was. Mode changes go through ``Module.train`` first
    (``model.eval()``, then ``model.train(previous root mode)``) so that modules overriding it
    keep their bookkeeping, and then each flag is set to its saved value.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor (N, C, H, W), got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name in ("forward_features", "forward_head"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model has no {name}(); pass a timm model (or the timm backbone of a wrapper)")

    device = _model_device(model) if device is None else torch.device(device)
    dtype = _model_dtype(model)
    modes = [(module, module.training) for module in model.modules()]
    chunks: list[Tensor] = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = transform(images[start : start + batch_size].to(device))
                if not isinstance(batch, Tensor) or not batch.is_floating_point():
                    raise TypeError("transform must return a floating-point tensor")
                feats = model.forward_head(model.forward_features(batch.to(dtype)), pre_logits=True)
                if feats.ndim != 2:
                    raise ValueError(
                        f"pre-logits features have shape {tuple(feats.shape)}, expected (B, D); "
                        "does the model have global pooling (global_pool='' disables it)?"
                    )
                chunks.append(feats.float().cpu())
    finally:
        # First through train() so that overrides with side effects run (for example timm's
        # LeViT drops its eval-mode attention-bias cache); a BN pinned in eval by a Branch-tuning
        # policy stays in eval. Then every flag is set back exactly as it was.
        model.train(modes[0][1])
        for module, training in modes:
            module.training = training
    if not chunks:
        num_features = getattr(model, "num_features", 0)
        return torch.empty(0, num_features, dtype=torch.float32)
    return torch.cat(chunks)
