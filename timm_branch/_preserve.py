"""Undo whatever running a model's forward for inspection leaves behind in the model.

The pairing (:mod:`timm_branch.pairs`) runs the user's model: traced by ``torch.fx`` with
``Proxy`` inputs, and where tracing fails, once for real. A forward can change the model's Python
state: hooks store what they see (timm's ``FeatureHooks`` keeps outputs keyed by device, which
under tracing are Proxies), modules cache tensors or set attributes on themselves, FX registers
``_tensor_constant`` attributes on the traced root, and buffers can be updated in place. Such
left-overs hold the traced graph alive and break ``copy.deepcopy`` and ``torch.save``.

:func:`preserved` snapshots, before the block, the state of every object reachable from the model
and puts it back after. Copying the model instead is not an option for large models; this costs a
shallow copy of each container plus a copy of the non-parameter tensors (buffers, caches), never
of the parameters.

What "reachable" covers, starting from the model object:

- ``dict`` (any subclass: ``OrderedDict``, ``defaultdict``), ``list`` and ``set``: their items are
  restored by identity; ``tuple`` and ``frozenset`` are followed;
- every other object's ``__dict__`` and ``__slots__`` (modules, hook helpers, records);
- ``functools.partial`` (function, arguments, keywords), bound methods (their ``__self__``) and
  closure cells of Python functions (forward hooks are often closures or partials);
- tensors: non-parameter tensors (buffers, cached tensors) get their values back if modified in
  place; parameters are checked (by version counter), not copied, and an in-place change to one is
  an error.

Classes, Python modules and a function's globals are not followed: that state belongs to the
program, not to the model.
"""
from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

_ATOMIC = (
    type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, str, bytes, int, float, complex, bool,
    type(None), torch.dtype, torch.device,
)


@dataclass
class _Snapshot:
    """Shallow copies of every mutable container reachable from a model, and its tensors' versions."""

    dicts: list[tuple[dict, list[tuple[Any, Any]]]] = field(default_factory=list)
    lists: list[tuple[list, list[Any]]] = field(default_factory=list)
    sets: list[tuple[set, list[Any]]] = field(default_factory=list)
    slots: list[tuple[object, str, Any]] = field(default_factory=list)
    cells: list[tuple[types.CellType, Any]] = field(default_factory=list)
    buffers: list[tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=list)
    params: list[tuple[nn.Parameter, int]] = field(default_factory=list)


_MISSING = object()


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the block, then restore every piece of state reachable from ``model`` to how it was.

    Raises:
        RuntimeError: the block changed a parameter of ``model`` in place (after restoring the rest).
    """
    snapshot = _capture(model)
    try:
        yield
    finally:
        _restore(snapshot)


def _capture(root: object) -> _Snapshot:
    snap = _Snapshot()
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            _capture_tensor(obj, snap)
        elif isinstance(obj, dict):
            items = list(obj.items())
            snap.dicts.append((obj, items))
            stack.extend(x for item in items for x in item)
        elif isinstance(obj, list):
            snap.lists.append((obj, list(obj)))
            stack.extend(obj)
        elif isinstance(obj, set):
            snap.sets.append((obj, list(obj)))
            stack.extend(obj)
        elif isinstance(obj, (tuple, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                value = _cell_value(cell)
                snap.cells.append((cell, value))
                stack.append(value)
        elif isinstance(obj, types.MethodType):
            stack.extend((obj.__self__, obj.__func__))
        else:
            if isinstance(obj, functools.partial):
                stack.extend((obj.func, obj.args, obj.keywords))
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                stack.append(state)
            for name in _slot_names(type(obj)):
                value = getattr(obj, name, _MISSING)
                snap.slots.append((obj, name, value))
                stack.append(value)
    return snap


def _capture_tensor(tensor: torch.Tensor, snap: _Snapshot) -> None:
    if isinstance(tensor, nn.Parameter):
        snap.params.append((tensor, tensor._version))
    elif not tensor.is_inference():  # inference tensors cannot be changed in place outside inference mode
        snap.buffers.append((tensor, tensor._version, tensor.detach().clone()))


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: a closure variable not assigned yet
        return _MISSING


@functools.cache
def _slot_names(cls: type) -> tuple[str, ...]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return tuple(name for name in names if name not in ("__dict__", "__weakref__"))


def _restore(snap: _Snapshot) -> None:
    # Containers are compared by identity only: ``==`` on a Proxy would record a graph node.
    for d, items in snap.dicts:
        if len(d) != len(items) or any(k is not k0 or v is not v0 for (k, v), (k0, v0) in zip(d.items(), items)):
            d.clear()
            d.update(items)
    for seq, items in snap.lists:
        if len(seq) != len(items) or any(x is not x0 for x, x0 in zip(seq, items)):
            seq[:] = items
    for s, items in snap.sets:
        if len(s) != len(items) or {id(x) for x in s} != {id(x) for x in items}:
            s.clear()
            s.update(items)
    for obj, name, value in snap.slots:
        if value is _MISSING:
            if hasattr(obj, name):
                delattr(obj, name)
        elif getattr(obj, name, _MISSING) is not value:
            setattr(obj, name, value)
    for cell, value in snap.cells:
        if value is _MISSING:
            if _cell_value(cell) is not _MISSING:
                del cell.cell_contents
        elif _cell_value(cell) is not value:
            cell.cell_contents = value
    with torch.no_grad():
        for tensor, version, copy in snap.buffers:
            # Native kernels (batch_norm's running statistics) update in place without a version bump.
            if tensor._version != version or (not tensor.is_meta and not torch.equal(tensor, copy)):
                tensor.copy_(copy)
    changed = [param for param, version in snap.params if param._version != version]
    if changed:
        raise RuntimeError(
            f"{len(changed)} parameter(s) of shape(s) {[tuple(p.shape) for p in changed[:3]]} were modified in "
            "place by the model's forward while timm_branch traced it to find the conv -> BatchNorm pairs; "
            "their old values cannot be restored. Make the forward leave its parameters unchanged (update them "
            "in a training step instead), then call add_branches again."
        )
