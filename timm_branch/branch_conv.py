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

On the CPU, for ungrouped convs, the taps' gradient is instead one matrix product for all taps at once
(:func:`_gathered_tap_grad`): the input pixels each tap reads are gathered side by side (``T``
copies of the input for ``T`` taps) and multiplied with the output gradient. oneDNN's weight
gradient of ``k x 1`` / ``1 x k`` sub-kernels, and of any kernel on maps of a few pixels, is
slower than that GEMM (``benchmarks/tap_grad.py``; resnet18 at 64 px on a 2-core EPYC: the cross
taps in about half the time of the sub-convolutions, and a whole ``3 x 3`` kernel's gradient on
``2 x 2`` maps in a third of oneDNN's). For the whole kernel on larger maps oneDNN wins, so there
the full weight gradient stays a convolution (:data:`_GEMM_FULL_MAX_PIXELS`); so do grouped and
depthwise convs, for which oneDNN was faster (:func:`_gathers`).

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


@dataclass(frozen=True)
class TapPlan:
    """How a branch's backward computes the gradient of its taps.

    ``coords``: every trained tap as kernel coordinates, in the branch's tap order; ``boxes`` and
    ``runs``: :func:`tap_boxes` for the sub-convolutions, ``None`` when the branch has every tap
    (then the gradient is the full weight gradient).
    """

    coords: tuple[tuple[int, ...], ...]
    boxes: tuple[TapBox, ...] | None
    runs: tuple[TapRun, ...] | None


def tap_plan(kernel_size: tuple[int, ...], taps: torch.Tensor | None) -> TapPlan:
    """The :class:`TapPlan` of a branch on the flat tap indices ``taps`` (``None``: every tap)."""
    every = TapBox(tuple(0 for _ in kernel_size), tuple(kernel_size)).taps()
    if taps is None or len(taps) == math.prod(kernel_size):
        return TapPlan(tuple(every), None, None)
    boxes, runs = tap_boxes(kernel_size, taps)
    return TapPlan(tuple(every[t] for t in taps.tolist()), tuple(boxes), tuple(runs))



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

    ``apply(x, weight, branch, bias, effective, geometry, plan, scale, shift)``:

    - ``x``: ``(N, C_in, *spatial)``; ``weight``: the frozen kernel ``(C_out, C_in / groups, *k)``;
      ``branch``: ``(C_out, C_in / groups, taps)``; ``bias``: ``(C_out,)`` or ``None``;
    - ``effective``: ``weight -> W + delta``, the branch parametrization (it reads ``branch``), with
      ``scaled(weight, scale) -> scale * (W + delta)``;
    - ``geometry``: :class:`ConvGeometry`;
    - ``plan``: the branch's :class:`TapPlan`;
    - ``scale``, ``shift``: ``(C_out,)``, a frozen BatchNorm's map ``y = scale * z + shift`` folded
      into the conv (:mod:`timm_branch.bn_fold`): the output is then
      ``conv(x, scale * (W + delta), scale * bias + shift)``; or ``None`` for no fold.

    ``weight`` receives no gradient (it must not require one).
    """

    @staticmethod
    def forward(ctx, x, weight, branch, bias, effective, geometry: ConvGeometry, plan: TapPlan, scale, shift):
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        w_eff = _kernel(effective, weight, scale)  # the module itself, without nn.Module.__call__'s hook dispatch
        if scale is not None:
            bias = shift if bias is None else torch.addcmul(shift, bias, scale)
        cast = _autocast_dtype(x)
        if cast is not None:
            # What autocast does to a convolution, made explicit so that backward has the same
            # operands; the convolution's own autocast cast is then a no-op.
            x, w_eff, bias = _autocast(x, cast), _autocast(w_eff, cast), None if bias is None else _autocast(bias, cast)
        out = _conv(x, w_eff, bias, geometry)
        # The kernel the convolution ran is kept for the input gradient, as autograd keeps it for a
        # plain conv: rebuilding it in backward cost a weight-sized pass per conv and step (on the
        # CPU 4 % of a resnet18 step at 64 px), and a fine-tuning step holds a weight-sized
        # gradient per conv at that point anyway.
        ctx.save_for_backward(x, w_eff, branch)
        ctx.geometry, ctx.plan, ctx.scale = geometry, plan, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_eff, branch = ctx.saved_tensors
        g, plan, scale = ctx.geometry, ctx.plan, ctx.scale
        grad_out = _as(grad_out, w_eff.dtype)
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        gathered = _gathers(x, plan, grad_out.shape[2:], g.groups)
        full = plan.boxes is None and not gathered  # the branch gradient is a convolution's weight gradient
        x_dtype, bias_dtype = ctx.dtypes
        grad_x = grad_w = grad_bias = None
        if need_x or need_bias or full:
            # One call for the input, bias and (full) weight gradients; weight gradients read only
            # the kernel's shape and dtype.
            grad_x, grad_w, grad_bias = _conv_backward(grad_out, x, w_eff, g, bias_dtype is not None, [need_x, full, need_bias])
        if full:
            grad_branch = grad_w.reshape(branch.shape)
        else:
            grad_branch = taps_grad(grad_out, x, w_eff, g, plan, gathered).reshape(branch.shape)
        if scale is not None:  # the folded kernel is scale * (W + delta), its bias scale * bias + shift
            grad_branch = grad_branch * _as(scale, grad_branch.dtype)[:, None, None]  # (C_out, C_in / groups, taps)
            grad_bias = None if grad_bias is None else grad_bias * _as(scale, grad_bias.dtype)
        return (
            _as(grad_x, x_dtype) if need_x else None,
            None,
            _as(grad_branch, branch.dtype),
            _as(grad_bias, bias_dtype) if need_bias else None,
            None, None, None, None, None,
        )


def _kernel(effective, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The kernel the convolution runs: ``W + delta``, or ``scale * (W + delta)`` with a folded BatchNorm."""
    return effective.forward(weight) if scale is None else effective.scaled(weight, scale)


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


_GEMM_FULL_MAX_PIXELS = 16
"""Largest output map (pixels per image) on which the CPU computes a whole kernel's gradient as a
GEMM of gathered taps rather than as oneDNN's weight-gradient convolution (measured crossover,
resnet18 at 64 px on a 2-core EPYC: GEMM 3x faster on 2 x 2 maps, even on 4 x 4, 2x slower on 16 x 16)."""


def _gathers(x: torch.Tensor, plan: TapPlan, out_size: torch.Size, groups: int) -> bool:
    """Whether the backward computes the taps' gradient with :func:`_gathered_tap_grad`: on the
    CPU, for ungrouped convs, for a subset of taps always, for the whole kernel on small maps only.

    Grouped and depthwise convs keep oneDNN's convolutions: there the GEMM is one small batched
    product per group, and measured slower (a depthwise 3 x 3 at 32 x 32 px, batch 32: cross
    taps 57 ms against 11 ms; 8 to 32 channels per group: up to 4x slower)."""
    return x.device.type == "cpu" and groups == 1 and (
        plan.boxes is not None or math.prod(out_size) <= _GEMM_FULL_MAX_PIXELS)


def taps_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, g: ConvGeometry, plan: TapPlan,
              gathered: bool | None = None) -> torch.Tensor:
    """The gradient ``(C_out, C_in / groups, taps)`` of the taps of ``plan`` as the backward computes
    it: gathered GEMMs where :func:`_gathers` says so (or ``gathered`` forces), else one
    sub-convolution per box of taps (``kernel``: any tensor of the kernel's shape and compute
    dtype). A ``plan`` of every tap needs ``gathered``."""
    if gathered is None:
        gathered = _gathers(x, plan, grad_out.shape[2:], g.groups)
    if gathered:
        return _gathered_tap_grad(grad_out, x, g, plan.coords)
    return _tap_grad(grad_out, x, kernel, g, plan.boxes, plan.runs)


def _gathered_tap_grad(grad_out: torch.Tensor, x: torch.Tensor, g: ConvGeometry,
                       coords: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The weight gradient ``(C_out, C_in / groups, T)`` of the ``T`` taps at ``coords`` as one
    matrix product per group: ``grad_out`` ``(C_out, N * out pixels)`` against the pixels the taps
    read, gathered tap beside tap into ``(C_in, T, N * out pixels)`` (``T`` copies of ``x``; for a
    single tap of a channels_last ``x`` a view, no copy)."""
    out_size = grad_out.shape[2:]
    # Where each tap's first read lies in x, per axis; padding is needed only if a tap reads past x.
    starts = [[i * d - p for i, d, p in zip(tap, g.dilation, g.padding)] for tap in coords]
    inside = all(0 <= a and a + (n - 1) * s < length
                 for start in starts for a, n, s, length in zip(start, out_size, g.stride, x.shape[2:]))
    if not inside:
        x = F.pad(x, [p for p in reversed(g.padding) for _ in (0, 1)])  # F.pad takes the last axis first
        starts = [[a + p for a, p in zip(start, g.padding)] for start in starts]
    per_channel = x.transpose(0, 1)  # (C_in, N, *spatial): gathered taps then sit beside each channel
    views = [per_channel[(slice(None), slice(None), *(slice(a, a + (n - 1) * s + 1, s) for a, n, s in zip(start, out_size, g.stride)))]
             for start in starts]
    cols = views[0].unsqueeze(1) if len(views) == 1 else torch.stack(views, dim=1)
    c_out, c_in, groups = grad_out.shape[1], x.shape[1], g.groups
    rows = grad_out.transpose(0, 1).reshape(groups, c_out // groups, -1)
    cols = cols.reshape(groups, c_in // groups * len(coords), -1)
    grad = torch.mm(rows[0], cols[0].t()) if groups == 1 else torch.bmm(rows, cols.transpose(1, 2))
    return grad.view(c_out, c_in // groups, len(coords))


def _tap_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, g: ConvGeometry,
              boxes: tuple[TapBox, ...], runs: tuple[TapRun, ...]) -> torch.Tensor:
    """The branch gradient ``(C_out, C_in / groups, taps)``: one sub-convolution per box
    (``kernel``: any tensor of the kernel's shape and compute dtype; only those are read)."""
    out_size = grad_out.shape[2:]
    grads = []
    for box in boxes:
        window, padding = _window(x, box, out_size, g)
        if box.stop == tuple(a + 1 for a in box.start) and not any(padding):
            # One tap read without padding: a GEMM does a 1x1 weight gradient's arithmetic with
            # less host work per call (for a tiny map on this repository's CPU about two thirds).
            grads.append(_gathered_tap_grad(grad_out, x, g, (box.start,)))
            continue
        # Only its shape, dtype and memory format are read: the slice itself would be copied to a
        # dense tensor (a third of a 3x3 kernel per line of taps) for nothing.
        sub_kernel = torch.empty_like(kernel[(slice(None), slice(None), *(slice(a, b) for a, b in zip(box.start, box.stop)))])
        grads.append(_conv_backward(grad_out, window, sub_kernel, g, False, [False, True, False], padding)[1].flatten(2))
    pieces = [grads[b][..., i:j] for b, i, j in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)


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
