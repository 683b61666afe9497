"""Deterministic resizing of image batches: shorter side to ``size``, then a centre crop.

This is the one resizing policy of :mod:`timm_branch.data` (the loaders in ``sources.py`` and
:class:`~timm_branch.data.augment.EvalTransform` use it): the aspect ratio is kept, nothing is
stretched, and the borders of the longer side are cut off evenly, as torchvision's
``Resize(size)`` followed by ``CenterCrop(size)``. A square image is only rescaled.

Interpolation is bilinear with antialiasing (``torch.nn.functional.interpolate(...,
antialias=True)``), so shrinking does not alias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch so that its shorter side is ``size``, then centre-crop to ``size x size``.

    Args:
        images: ``(N, C, H, W)``, uint8 (0..255) or floating point (any range).
        size: output side in pixels, ``>= 1``.

    Returns:
        ``(N, C, size, size)`` with the input's dtype; uint8 results are rounded and clamped to
        0..255. The input itself is returned when it already is ``size x size``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    size = int(size)
    height, width = images.shape[-2:]
    if height == size and width == size:
        return images
    if images.shape[0] == 0:
        return images.new_empty(images.shape[0], images.shape[1], size, size)
    scale = size / min(height, width)
    new_h = max(size, round(height * scale))
    new_w = max(size, round(width * scale))
    x = images if images.is_floating_point() else images.float()
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    if images.dtype == torch.uint8:
        return x.round().clamp(0, 255).to(torch.uint8).contiguous()
    return x.to(images.dtype).contiguous()
