"""The weight-space branch of one convolution.

A branch is a trainable, zero-initialised delta on some taps of a conv kernel. It is registered
as a ``torch.nn.utils.parametrize`` parametrization of the conv's ``weight``, so the conv runs its
own forward (padding rules, weight standardisation, expert routing included) with the effective
weight ``W + delta``: one convolution per layer per step, and a merge that is exact by
construction, because merging stores the very tensor the branched forward used.

Branch shapes, for a kernel of size ``k_1 x ... x k_n`` (``n`` = 2 for ``Conv2d``):

- ``"1x1"``: the centre tap only (the paper's 1x1 branch).
- ``"cross"``: every tap on a line through the centre along one kernel axis: for 2-D the centre
  row and the centre column, ``2k - 1`` taps for a ``k x k`` kernel. It spans the same kernels as
  the paper's ``1x3 + 3x1`` pair, without the pair's second, redundant weight on the centre tap.
- ``"full"``: all taps (the paper's ``k x k`` branch).
- ``"cross-pair"``: the taps of ``"cross"``, trained as the authors' code trains them: one tensor
  per kernel axis (for 2-D a ``k x 1`` and a ``1 x k`` branch), so an optimiser with per-tensor
  rates (LARS) scales each line on its own, and the centre tap moves through both lines. The
  lines are summed into the kernel, so merging is exact as for the other shapes.

The centre index along an axis of size ``k`` is ``(k - 1) // 2``: the middle for odd ``k``; for even
``k`` the first of the two middle taps, which is the tap aligned with the output pixel under
TensorFlow "same" padding (timm's ``Conv2dSame``). For a ``1x1`` kernel all three shapes are the
single tap; for a ``1 x k`` kernel ``"cross"`` equals ``"full"``.
"""
from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn
from torch.nn.utils import parametrize

from .branch_conv import BranchedConv, ConvGeometry, symmetric_padding, tap_plan

BranchShape = Literal["1x1", "cross", "full", "cross-pair"]
BRANCH_SHAPES: tuple[str, ...] = ("1x1", "cross", "full", "cross-pair")


def check_shape(shape: str) -> None:
    """Raise ``ValueError`` naming the choices when ``shape`` is not a branch shape."""
    if shape not in BRANCH_SHAPES:
        raise ValueError(f"unknown branch shape {shape!r}; choose one of {', '.join(BRANCH_SHAPES)}")


def tap_indices(kernel_size: tuple[int, ...], shape: str) -> torch.Tensor | None:
    """Flat (row-major) indices of the kernel taps a branch of ``shape`` trains.

    Returns ``None`` for ``"full"`` (every tap), else a sorted int64 tensor of length
    ``1`` (``"1x1"``) or ``1 + sum(k_i - 1)`` (``"cross"`` and ``"cross-pair"``).
    """
    check_shape(shape)
    if shape == "full":
        return None
    centre = [(k - 1) // 2 for k in kernel_size]
    taps = {_flat(centre, kernel_size)}
    if shape != "1x1":
        taps.update(t for axis in range(len(kernel_size)) for t in _line_taps(kernel_size, axis))
    return torch.tensor(sorted(taps), dtype=torch.long)


def _flat(tap: list[int] | tuple[int, ...], kernel_size: tuple[int, ...]) -> int:
    """The row-major flat index of ``tap`` in a kernel of ``kernel_size``."""
    return sum(i * math.prod(kernel_size[axis + 1:]) for axis, i in enumerate(tap))


def _line_taps(kernel_size: tuple[int, ...], axis: int) -> list[int]:
    """Flat indices of the taps on the line through the centre along ``axis``, in order along it."""
    centre = [(k - 1) // 2 for k in kernel_size]
    return [_flat(centre[:axis] + [i] + centre[axis + 1:], kernel_size) for i in range(kernel_size[axis])]


class ConvBranch(nn.Module):
    """Parametrization ``W -> W + delta`` of a conv weight, ``delta`` non-zero on chosen taps only.

    Args:
        weight: the conv's weight, ``(out, in / groups, *kernel_size)``, or for timm's
            ``CondConv2d`` the expert bank ``(experts, out * in / groups * prod(kernel_size))``.
        kernel_size: the conv's kernel size.
        shape: ``"1x1"``, ``"cross"`` or ``"full"`` (see the module docstring).

    The trainable tensor ``branch`` has shape ``(*lead, taps)`` where ``lead`` is the weight with
    its kernel dimensions flattened away (``(out, in / groups)``, or ``(experts, out * in / groups)``)
    and ``taps`` the number of trained taps; it lives on the weight's device and dtype and
    starts at zero. A ``"cross-pair"`` branch instead holds one tensor per kernel axis,
    ``line_0 ... line_{n-1}``, each ``(*lead, k_i)`` (the taps along that axis through the centre);
    :meth:`tap_values` sums them into the ``(*lead, taps)`` values of the cross's taps.
    """

    def __init__(self, weight: torch.Tensor, kernel_size: tuple[int, ...], shape: str = "cross"):
        super().__init__()
        taps = tap_indices(kernel_size, shape)
        kernel_numel = math.prod(kernel_size)
        if weight.numel() % kernel_numel:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not hold kernels of size {kernel_size}")
        self.shape = shape
        self.kernel_size = tuple(kernel_size)
        self.parameter_order: list[str] = []
        # Kernel taps are the innermost dimension of every timm/PyTorch conv weight layout.
        self._grid = (*_lead_shape(weight, self.kernel_size), kernel_numel)
        n_taps = kernel_numel if taps is None else len(taps)
        self.register_buffer("taps", None if taps is None else taps.to(weight.device), persistent=False)
        # How the tap-only backward computes the taps' gradient.
        self.plan = tap_plan(self.kernel_size, taps)
        # The conv's geometry for BranchedConv, set by attach_branch for plain convs (else None).
        self.geometry: ConvGeometry | None = None
        self.n_taps = n_taps
        if shape != "cross-pair":
            self.branch = nn.Parameter(weight.new_zeros(*self._grid[:-1], n_taps))
            return
        # Where each line's taps sit among the cross's sorted taps (the centre is in every line).
        for axis, k in enumerate(self.kernel_size):
            line = torch.tensor(_line_taps(self.kernel_size, axis), device=weight.device)
            self.register_buffer(f"line_{axis}_at", torch.searchsorted(self.taps, line), persistent=False)
            self.register_parameter(f"line_{axis}", nn.Parameter(weight.new_zeros(*self._grid[:-1], k)))

    def tap_values(self) -> torch.Tensor:
        """The delta on the trained taps, ``(*lead, taps)``: ``branch`` itself, or for
        ``"cross-pair"`` the lines summed (differentiable: gradients reach every line)."""
        if self.shape != "cross-pair":
            return self.branch
        values = self.line_0.new_zeros(*self._grid[:-1], self.n_taps)
        for axis in range(len(self.kernel_size)):
            values = values.index_add(-1, getattr(self, f"line_{axis}_at"), getattr(self, f"line_{axis}"))
        return values

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        grid = weight.reshape(self._grid)
        if self.taps is None:
            effective = grid + self.branch
        else:
            # Adding the zeros off the taps would be exact too, but index_add touches the taps only.
            # Into a clone, which keeps the weight's layout (out-of-place index_add returns a
            # contiguous tensor): a channels_last conv would otherwise copy its kernel back to
            # channels_last at every forward and backward.
            effective = grid.clone().index_add_(-1, self.taps, self.tap_values())
        return effective.view(weight.shape)

    def scaled(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale * (W + delta)`` for a per-output-channel ``scale`` ``(out,)``: the kernel of a
        conv with a frozen BatchNorm folded in (:mod:`timm_branch.bn_fold`), in one pass over ``W``.
        Equal to ``scale * forward(weight)`` up to rounding."""
        if self.taps is None:
            return torch.add(weight, self.branch.view(weight.shape)).mul_(_per_channel(scale, weight.dim()))
        grid = weight.reshape(self._grid)
        per_channel = _per_channel(scale, grid.dim())
        # The product keeps grid's layout (a channels_last kernel's), as forward's clone does.
        scaled = torch.mul(grid, per_channel)
        return scaled.index_add_(-1, self.taps, self.tap_values() * per_channel).view(weight.shape)

    def delta(self) -> torch.Tensor:
        """The branch as a dense kernel delta, shaped like the grid ``(*lead, prod(kernel_size))``."""
        if self.taps is None:
            return self.branch
        values = self.tap_values()
        return values.new_zeros(self._grid).index_add(-1, self.taps, values)

    def extra_repr(self) -> str:
        return f"shape={self.shape!r}, kernel_size={self.kernel_size}, taps={self.n_taps}"


def _per_channel(scale: torch.Tensor, dims: int) -> torch.Tensor:
    """``scale`` ``(out,)`` viewed to broadcast over a ``dims``-dimensional kernel or grid."""
    return scale.view(-1, *[1] * (dims - 1))


def _lead_shape(weight: torch.Tensor, kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    if weight.dim() == 2 + len(kernel_size):  # (out, in / groups, *kernel_size)
        return tuple(weight.shape[:2])
    # CondConv2d keeps its experts flattened: (experts, out * in / groups * prod(kernel_size)).
    return (weight.shape[0], weight.shape[1] // math.prod(kernel_size))


def attach_branch(conv: nn.Module, shape: str = "cross") -> ConvBranch:
    """Give ``conv`` a zero-initialised branch of ``shape`` on its ``weight`` and return it.

    The conv's class becomes a parametrized subclass and its ``weight`` key moves under
    ``parametrizations`` until :func:`merge_branch` restores both.
    """
    if get_branch(conv) is not None:
        raise ValueError(f"{type(conv).__name__} already has a branch; merge it first")
    branch = ConvBranch(conv.weight, _kernel_size(conv), shape)
    # Registration moves ``weight`` out of ``_parameters``; merging puts it back at this position.
    branch.parameter_order = list(conv._parameters)
    branch.geometry = _plain_geometry(conv)
    # unsafe=True skips a trial forward: ConvBranch keeps shape and dtype by construction.
    parametrize.register_parametrization(conv, "weight", branch, unsafe=True)
    _equip(type(conv), branch.geometry is not None)
    return branch


def _equip(cls: type, plain: bool) -> None:
    """Give the class parametrize made for one conv (its own, and its deep copies') the tap-only
    forward (``plain``) and pickling."""
    if plain:
        cls.forward = _branched_forward
    cls.__reduce_ex__ = _reduce_branched


def _reduce_branched(self: nn.Module, protocol: int) -> tuple:
    """Pickling (``torch.save(model)``) of a branched conv, which parametrize's class refuses: on
    load, :func:`_new_branched` remakes the class and the state fills it as for any module."""
    return _new_branched, (type(self).__bases__[0], type(self).forward is _branched_forward), self.__dict__


def _new_branched(base: type, plain: bool) -> nn.Module:
    """An empty conv of class ``base`` made parametrized on ``weight`` as :func:`attach_branch`
    leaves it; unpickling then sets its state (parameters, the parametrization, the branch)."""
    conv = base.__new__(base)
    # What register_parametrization does to the class, without a module to register yet.
    parametrize._inject_new_class(conv)
    parametrize._inject_property(conv, "weight")
    _equip(type(conv), plain)
    return conv


def _plain_geometry(conv: nn.Module) -> ConvGeometry | None:
    """``conv``'s geometry if its forward is ``F.convNd(x, weight, bias, ...)`` with symmetric zero
    padding, which :class:`~timm_branch.branch_conv.BranchedConv` reproduces exactly (timm's
    ``Conv2dSame`` too: it pads the input itself, then convolves unpadded); else ``None``."""
    cls = type(conv)
    plain = cls.forward is Conv2dSame.forward or any(
        isinstance(conv, base) and cls.forward is base.forward and cls._conv_forward is base._conv_forward
        and conv.padding_mode == "zeros" for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    padding = symmetric_padding(conv.padding, conv.kernel_size, conv.dilation) if plain else None
    return None if padding is None else ConvGeometry(tuple(conv.stride), padding, tuple(conv.dilation), conv.groups)


def tap_backward_applies(conv: nn.Module) -> bool:
    """Whether the branched plain ``conv``'s forward now runs :class:`BranchedConv`: gradients are
    enabled, the branch trains, the kernel is frozen, and the branch is the weight's only
    parametrization."""
    return _tap_backward_parts(conv) is not None


def _tap_backward_parts(conv: nn.Module) -> tuple[nn.Module, ConvBranch] | None:
    """``(the weight's ParametrizationList, the branch)`` when :func:`tap_backward_applies`, else ``None``."""
    # The module dictionaries directly: nn.Module.__getattr__ would add microseconds per conv and
    # step of host time, which a GPU step at small image sizes waits for.
    parametrizations = conv._modules.get("parametrizations")
    if parametrizations is None:  # merged (a folded BatchNorm asks its conv after merge_branch)
        return None
    weights = parametrizations._modules["weight"]
    branch = next(iter(weights._modules.values()))
    applies = (torch.is_grad_enabled() and any(p.requires_grad for p in branch._parameters.values())
               and not weights._parameters["original"].requires_grad
               and len(weights._modules) == 1 and len(parametrizations._modules) == 1)
    return (weights, branch) if applies else None


def _branched_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a branched plain conv: :class:`BranchedConv` while the branch alone trains
    (its backward skips the frozen kernel's weight gradient), else the parametrized forward. A
    BatchNorm folded into the conv (:mod:`timm_branch.bn_fold`) is applied here when it folds."""
    parts = _tap_backward_parts(self)
    if parts is None:
        return super(type(self), self).forward(x)
    weights, branch = parts
    delta = branch._parameters.get("branch")
    if delta is None:  # "cross-pair": the lines summed onto the cross's taps
        delta = branch.tap_values()
    fold = self.__dict__.get("_fold")
    scale, shift = fold.affine() if fold is not None and fold.norm_frozen() else (None, None)
    if isinstance(self, Conv2dSame):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
    return BranchedConv.apply(x, weights._parameters["original"], delta, self._parameters["bias"], branch,
                              branch.geometry, branch.plan, scale, shift)


def get_branch(conv: nn.Module) -> ConvBranch | None:
    """The branch attached to ``conv``, or ``None``."""
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    found = [p for p in conv.parametrizations["weight"] if isinstance(p, ConvBranch)]
    return found[0] if found else None


def merge_branch(conv: nn.Module) -> None:
    """Fold the branch into ``conv.weight`` in place and detach it.

    The stored weight is bit-for-bit the effective weight the branched forward computed; the
    weight ``Parameter`` keeps its identity, strides, dtype, device and ``requires_grad``.
    """
    branch = get_branch(conv)
    if branch is None:
        raise ValueError(f"{type(conv).__name__} has no branch to merge")
    if list(conv.parametrizations) != ["weight"] or len(conv.parametrizations["weight"]) != 1:
        raise ValueError("the conv carries other parametrizations besides the branch; remove them first")
    with torch.no_grad():
        effective = conv.weight
        original = conv.parametrizations["weight"].original
        # Not parametrize.remove_parametrizations: it deletes the property from the generated class,
        # which copy.deepcopy shares between a model and its copies (momentum encoders, teachers).
        del conv._modules["parametrizations"]
        conv.__class__ = type(conv).__bases__[0]
        conv.register_parameter("weight", original)
        original.copy_(effective)
    # State-dict and parameters() order as before (optimiser states are indexed by position).
    params = conv._parameters
    ordered = {name: params[name] for name in branch.parameter_order if name in params}
    ordered.update(params)
    params.clear()
    params.update(ordered)


def iter_branches(model: nn.Module) -> Iterator[tuple[str, nn.Module, ConvBranch]]:
    """``(conv name, conv, branch)`` for every branched conv of ``model``, in module order."""
    for name, module in model.named_modules():
        branch = get_branch(module)
        if branch is not None:
            yield name, module, branch


def _kernel_size(conv: nn.Module) -> tuple[int, ...]:
    kernel_size = getattr(conv, "kernel_size", None)
    if not isinstance(kernel_size, tuple):
        raise TypeError(f"{type(conv).__name__} has no kernel_size tuple; it is not a convolution")
    return kernel_size
