"""The branched convolution with a tap-only backward.

Fine-tuning a conv costs three convolutions' work per step: the forward, the input gradient and
the weight gradient. A branched conv's kernel ``W`` is frozen and only the branch taps train, so
its backward needs the input gradient and the weight gradient *of the taps*: for a ``k x k``
kernel, ``1 / k^2`` of the full weight gradient for a ``"1x1"`` branch and ``(2k - 1) / k^2`` for a
``"cross"`` branch. Autograd through ``conv(x, W + delta)`` cannot know that and computes the full
``k x k`` weight gradient; :class:`BranchedConv` computes only what is needed.

The weight gradient of a box of taps (a sub-kernel ``[a_1, b_1) x ... x [a_n, b_n)``) is the
weight gradient of a convolution with that sub-kernel over the window of the (zero-padded) input
that those taps read: along each axis the window starts at ``a * dilation - padding_before`` and
spans ``(out - 1) * stride + dilation * (b - a - 1) + 1`` pixels, so the sub-convolution's output
has exactly the conv's output size. A ``"1x1"`` branch is one box (the centre tap); a ``"cross"``
branch is one box per axis, the line of taps through the centre along that axis. A box of one
tap that reads its window without padding is computed as one matrix product (a GEMM over batch
and output pixels), which does the same arithmetic with less host work per call.

Exactness: the forward computes the very ``W + delta`` (:meth:`ConvBranch.forward`) and the very
convolution call of the conv class, so outputs, and therefore merges, are bit-for-bit those of the
plain parametrization; gradients equal autograd's up to summation order (float64: ~1e-15
relative). Under autocast the convolution runs in the autocast dtype, as autocast would run it,
and the gradients come back in the dtypes of ``x``, the branch and the bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvGeometry:
    """The convolution's hyper-parameters, with symmetric integer padding per spatial axis."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class TapBox:
    """A box of kernel taps: ``[start_i, stop_i)`` along each kernel axis ``i``."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def taps(self) -> list[tuple[int, ...]]:
        """The box's taps in row-major order."""
        taps: list[tuple[int, ...]] = [()]
        for lo, hi in zip(self.start, self.stop):
            taps = [t + (i,) for t in taps for i in range(lo, hi)]
        return taps


TapRun = tuple[int, int, int]
"""``(box, first, stop)``: the taps ``first..stop - 1`` (row-major) of box number ``box``."""


def tap_boxes(kernel_size: tuple[int, ...], taps: torch.Tensor) -> tuple[list[TapBox], list[TapRun]]:
    """Boxes of taps that together hold exactly the flat tap indices ``taps``.

    ``taps`` must be a centre tap or a centre cross (:func:`timm_branch.branch.tap_indices`).
    Returns the boxes and the runs of their taps that, concatenated, list ``taps`` in order (a tap
    in two boxes is taken from the first).
    """
    centre = [(k - 1) // 2 for k in kernel_size]
    # One line through the centre per axis, or the centre alone. The lines share the centre tap,
    # whose gradient is then computed once per line: cheaper than splitting a line in two halves,
    # whose windows of the input would need copies with unequal zero padding.
    boxes = [TapBox(tuple(centre), tuple(c + 1 for c in centre))] if len(taps) == 1 else [
        TapBox(
            tuple(0 if a == axis else c for a, c in enumerate(centre)),
            tuple(k if a == axis else c + 1 for a, c in enumerate(centre)),
        )
        for axis, k in enumerate(kernel_size)
    ]
    strides = [math.prod(kernel_size[a + 1:]) for a in range(len(kernel_size))]
    where: dict[int, tuple[int, int]] = {}  # flat tap -> (box, position in the box), first box wins
    for b, box in enumerate(boxes):
        for i, tap in enumerate(box.taps()):
            where.setdefault(sum(t * s for t, s in zip(tap, strides)), (b, i))
    wanted = taps.tolist()
    if sorted(where) != wanted:
        raise ValueError(f"taps {wanted} of a {kernel_size} kernel are neither a centre tap nor a centre cross")
    runs: list[list[int]] = []
    for b, i in (where[t] for t in wanted):
        if runs and runs[-1][0] == b and runs[-1][2] == i:
            runs[-1][2] += 1
        else:
            runs.append([b, i, i + 1])
    return boxes, [(b, i, j) for b, i, j in runs]


def symmetric_padding(padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """``padding`` as integers per axis, or ``None`` when it pads unequally before and after."""
    if padding == "valid":
        return tuple(0 for _ in kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        # PyTorch puts the odd pixel of "same" padding after the input: not expressible here.
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(padding)


class BranchedConv(torch.autograd.Function):
    """``conv(x, W + delta, bias)`` whose backward computes the input, tap and bias gradients only.

    ``apply(x, weight, branch, bias, effective, geometry, boxes, runs)``:

    - ``x``: ``(N, C_in, *spatial)``; ``weight``: the frozen kernel ``(C_out, C_in / groups, *k)``;
      ``branch``: ``(C_out, C_in / groups, taps)``; ``bias``: ``(C_out,)`` or ``None``;
    - ``effective``: ``weight -> W + delta``, the branch parametrization (it reads ``branch``);
    - ``geometry``: :class:`ConvGeometry`;
    - ``boxes``, ``runs``: :func:`tap_boxes`, or ``None`` when the branch covers every tap (then
      the branch gradient is the full weight gradient).

    ``weight`` receives no gradient (it must not require one).
    """

    @staticmethod
    def forward(ctx, x, weight, branch, bias, effective, geometry: ConvGeometry, boxes, runs):
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        w_eff = effective.forward(weight)  # the module itself, without nn.Module.__call__'s hook dispatch
        cast = _autocast_dtype(x)
        if cast is not None:
            # What autocast does to a convolution, made explicit so that backward has the same
            # operands; the convolution's own autocast cast is then a no-op.
            x, w_eff, bias = _autocast(x, cast), _autocast(w_eff, cast), None if bias is None else _autocast(bias, cast)
        out = _conv(x, w_eff, bias, geometry)
        # Under autocast the cast kernel is kept, as autocast keeps it for a plain conv's backward;
        # else ``W + delta`` is recomputed in backward rather than kept beside ``W`` (a weight-sized
        # copy per conv).
        ctx.save_for_backward(x, weight if cast is None else w_eff, branch)
        ctx.effective, ctx.geometry, ctx.boxes, ctx.runs, ctx.cast = effective, geometry, boxes, runs, cast
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, kernel, branch = ctx.saved_tensors  # kernel: W (rebuilt into W + delta here) or, cast, W + delta
        g = ctx.geometry
        rebuilt = ctx.cast is None
        w_eff = ctx.effective.forward(kernel) if rebuilt else kernel
        grad_out = _as(grad_out, w_eff.dtype)
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        full = ctx.boxes is None
        x_dtype, bias_dtype = ctx.dtypes
        # Weight gradients read only the kernel's shape and dtype, so ``kernel`` serves for them. A
        # rebuilt W + delta is dropped before they are allocated, so that the backward's peak memory
        # (at the first convs, when every activation is still held) is fine-tuning's; for the cast
        # kernel, which stays saved anyway, one call gives the full weight gradient too.
        both = full and not rebuilt
        grad_x = grad_w = grad_bias = None
        if need_x or need_bias or both:
            grad_x, grad_w, grad_bias = _conv_backward(grad_out, x, w_eff, g, bias_dtype is not None, [need_x, both, need_bias])
        del w_eff
        if full and not both:
            grad_w = _conv_backward(grad_out, x, kernel, g, False, [False, True, False])[1]
        grad_branch = grad_w.reshape(branch.shape) if full else _tap_grad(grad_out, x, kernel, g, ctx.boxes, ctx.runs)
        return (
            _as(grad_x, x_dtype) if need_x else None,
            None,
            _as(grad_branch, branch.dtype),
            _as(grad_bias, bias_dtype) if need_bias else None,
            None, None, None, None,
        )


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    # CPU and CUDA always have autocast; asking torch.amp.is_autocast_available about them would
    # cost a graph break per conv under torch.compile in torch < 2.13 (dynamo cannot trace it).
    if device not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as autocast would hand it to a convolution: float64 is left alone."""
    return t if t.dtype == torch.float64 else _as(t, dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to costs a dispatch even when there is nothing to convert: a few microseconds per
    # call, several calls per conv and step, which on a GPU the host spends before the launches.
    return t if t.dtype == dtype else t.to(dtype)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, g: ConvGeometry) -> torch.Tensor:
    return _CONV_FN[x.dim() - 2](x, weight, bias, g.stride, g.padding, g.dilation, g.groups)


def _conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, g: ConvGeometry, bias: bool,
                   mask: list[bool], padding: tuple[int, ...] | None = None) -> tuple[torch.Tensor | None, ...]:
    """``(grad_x, grad_weight, grad_bias)`` of ``conv(x, weight)`` with ``g`` (and ``padding`` if
    given), those that ``mask`` asks for."""
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, [grad_out.shape[1]] if bias else None, list(g.stride), list(g.padding if padding is None else padding),
        list(g.dilation), False, [0] * len(g.stride), g.groups, mask,
    )


def _tap_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, g: ConvGeometry,
              boxes: list[TapBox], runs: list[TapRun]) -> torch.Tensor:
    """The branch gradient ``(C_out, C_in / groups, taps)``: one sub-convolution per box
    (``kernel``: any tensor of the kernel's shape and compute dtype; only those are read)."""
    out_size = grad_out.shape[2:]
    grads = []
    for box in boxes:
        window, padding = _window(x, box, out_size, g)
        if box.stop == tuple(a + 1 for a in box.start) and not any(padding):
            grads.append(_single_tap_grad(grad_out, window, g))
            continue
        # Only its shape, dtype and memory format are read: the slice itself would be copied to a
        # dense tensor (a third of a 3x3 kernel per line of taps) for nothing.
        sub_kernel = torch.empty_like(kernel[(slice(None), slice(None), *(slice(a, b) for a, b in zip(box.start, box.stop)))])
        grads.append(_conv_backward(grad_out, window, sub_kernel, g, False, [False, True, False], padding)[1].flatten(2))
    pieces = [grads[b][..., i:j] for b, i, j in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)


def _single_tap_grad(grad_out: torch.Tensor, window: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """The weight gradient ``(C_out, C_in / groups, 1)`` of one tap that reads ``window`` unpadded:
    a matrix product over batch and output pixels, ``grad_out`` against the pixels the tap reads.

    One GEMM instead of a 1x1 weight-gradient convolution of a kernel slice: the same arithmetic,
    with less host work per call (for a tiny map on this repository's CPU about two thirds), and
    for channels_last tensors both operands are views, no copies.
    """
    picked = window[(slice(None), slice(None), *(slice(0, (n - 1) * s + 1, s) for n, s in zip(grad_out.shape[2:], g.stride)))]
    c_out, c_in = grad_out.shape[1], picked.shape[1]
    if g.groups == 1:
        return torch.mm(grad_out.transpose(0, 1).reshape(c_out, -1), picked.transpose(0, 1).reshape(c_in, -1).t())[..., None]
    per_out, per_in = c_out // g.groups, c_in // g.groups
    grad = torch.bmm(grad_out.transpose(0, 1).reshape(g.groups, per_out, -1),
                     picked.transpose(0, 1).reshape(g.groups, per_in, -1).transpose(1, 2))
    return grad.reshape(c_out, per_in, 1)


def _window(x: torch.Tensor, box: TapBox, out_size: torch.Size, g: ConvGeometry) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of ``x`` the taps of ``box`` read, and the (symmetric) padding to convolve it with.

    Along an axis the taps read ``need`` pixels from ``begin`` on, ``before`` of them ahead of the
    input and ``after`` past its end (zero padding). Symmetric padding ``before`` reproduces that
    when ``0 <= before - after < stride``: the surplus zeros at the end are never read.
    """
    slices, pads = [], []
    for axis, (a, b) in enumerate(zip(box.start, box.stop)):
        length, stride = x.shape[2 + axis], g.stride[axis]
        begin = a * g.dilation[axis] - g.padding[axis]
        end = begin + (out_size[axis] - 1) * stride + g.dilation[axis] * (b - a - 1) + 1
        slices.append(slice(max(begin, 0), max(min(end, length), 0)))
        # Zeros for the window's pixels before the input and after it (a tap may read padding only).
        pads.append((max(min(end, 0) - begin, 0), max(end - max(begin, length), 0), stride))
    whole = all(sl.start == 0 and sl.stop == x.shape[2 + axis] for axis, sl in enumerate(slices))
    window = x if whole else x[(slice(None), slice(None), *slices)]
    if all(0 <= before - after < stride for before, after, stride in pads):
        return window, tuple(before for before, _, _ in pads)
    # Otherwise pad explicitly, unequally before and after (F.pad takes the last axis first).
    flat = [p for before, after, _ in reversed(pads) for p in (before, after)]
    return F.pad(window, flat), tuple(0 for _ in pads)
