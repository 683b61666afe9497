"""Choosing layers of a timm model by name or type, and capturing their outputs with forward hooks.

Used by the layer-wise CKA analysis (:mod:`timm_branch.evaluate.cka_compare`), usable on its own.

**Layer types** (:func:`layer_type`, first match wins):

- ``"conv"``: :func:`timm_branch.pairs.is_conv` (any non-transposed torch conv and subclasses,
  timm's ``CondConv2d``).
- ``"bn"``: :func:`timm_branch.bn.is_batchnorm` (any ``_BatchNorm``, timm's ``BatchNormAct2d``
  included).
- ``"act"``: :func:`is_activation`: a module whose class (or a base class) is defined in
  ``torch.nn.modules.activation`` (``ReLU``, ``SiLU``, ``GELU``, ``LeakyReLU``, ``Hardswish``, ...,
  but not ``MultiheadAttention``) or in timm's ``timm.layers.activations*`` modules (``Swish``,
  ``GELUTanh``, ``HardMishMe``, ...). ``nn.Identity`` (timm's "no activation") is not one.
- ``"block"``: :func:`is_block`: a *composite* module (it has child modules and is none of the
  above) whose parent is an ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``. That is
  the "residual block" of ``model.layer1[0]`` (ResNet), ``model.stages[0].blocks[2]``
  (ConvNeXt), ``model.blocks[1][0]`` (EfficientNet) or ``model.blocks[3]`` (ViT), and a
  ``DenseLayer`` inside a DenseNet ``DenseBlock``. Primitive layers inside containers (the convs
  of a deep stem ``nn.Sequential``, the pool and conv of a ``downsample`` ``nn.Sequential``)
  are not blocks, and neither is the ``nn.Sequential`` of a ResNet stage (``layer1``, whose
  parent is the model) nor a ``downsample`` (whose parent is a block). Where stages are
  themselves held in a container (EfficientNet's ``blocks[1]``, ConvNeXt's ``stages[0]``), the
  stage is a block too; its output equals its last block's output.

**What a hook captures** (:class:`LayerCapture`):

- The module's output, handed to a function (default: a detached clone) *inside the hook*,
  before the rest of the forward runs. This matters: timm's ResNet blocks do ``x += shortcut``
  in place on ``bn2``'s output, and ``ReLU(inplace=True)`` overwrites ``bn1``'s output; a stored
  reference would see the later value, the hook's copy (or the Gram matrix computed from it) is
  the true output of the layer.
- **BatchNorm with a built-in activation** (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``: any
  BatchNorm with an ``act`` child module): the BN entry is the *normalised output before the
  activation*, i.e. the input of its ``act`` child (captured with a forward pre-hook on it;
  after ``drop``, which is the identity in eval mode). The activation's output is the entry of
  the child itself (``bn1.act``, type ``"act"``, selected like any activation; absent when the
  child is an ``nn.Identity``). So BN and activation outputs stay separate, as in a plain
  ``conv -> BatchNorm2d -> ReLU`` network.
- **A module called more than once in one forward** (a torchvision ``BasicBlock`` uses one
  ``self.relu`` twice; timm's blocks use separate ``act1``/``act2``): every call is its own
  entry; the first keeps the module's name, call ``k`` (0-based, ``k >= 1``) is named
  ``"<name>@<k>"`` (``layer1.0.relu``, ``layer1.0.relu@1``). Counters restart with every
  :meth:`LayerCapture.run`.
- Only outputs that are a single ``Tensor`` are recorded; a module returning a tuple, list or
  dict is skipped (its call still counts).
- Entries are recorded in the order the outputs are produced, which is the order of the real
  forward (a stage's entry comes after its last block's).

Hooks are removed when the :class:`LayerCapture` context exits, also on an exception; hooks that
others put on the model are left alone.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

from torch import Tensor, nn

from ..bn import is_batchnorm
from ..pairs import is_conv

__all__ = [
    "LAYER_TYPES",
    "LayerCapture",
    "base_name",
    "is_activation",
    "is_block",
    "layer_type",
    "layer_types",
    "select_layers",
]

LAYER_TYPES: tuple[str, ...] = ("conv", "bn", "act", "block")
"""The layer types :func:`select_layers` knows, in the order :func:`layer_type` tests them."""

_ACTIVATION_MODULES = ("torch.nn.modules.activation",)
_ACTIVATION_PREFIXES = ("timm.layers.activations",)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation layer (see the module docstring)."""
    if isinstance(module, nn.MultiheadAttention):
        return False
    for cls in type(module).__mro__:
        where = getattr(cls, "__module__", "") or ""
        if where in _ACTIVATION_MODULES or where.startswith(_ACTIVATION_PREFIXES):
            return True
    return False


def _is_primitive(module: nn.Module) -> bool:
    return is_conv(module) or is_batchnorm(module) or is_activation(module)


def is_block(module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module`` (a child of ``parent``) is a block: composite, not a conv/BN/activation,
    directly inside an ``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict``."""
    if parent is None or not isinstance(parent, _CONTAINERS):
        return False
    has_children = next(iter(module.children()), None) is not None
    return has_children and not _is_primitive(module)


def _parents(model: nn.Module) -> dict[str, nn.Module | None]:
    modules = dict(model.named_modules())
    return {name: (modules[name.rpartition(".")[0]] if name else None) for name in modules}


def _type_of(module: nn.Module, parent: nn.Module | None) -> str | None:
    if is_conv(module):
        return "conv"
    if is_batchnorm(module):
        return "bn"
    if is_activation(module):
        return "act"
    if is_block(module, parent):
        return "block"
    return None


def base_name(entry: str) -> str:
    """The module name of a capture entry: ``"layer1.0.relu@1"`` -> ``"layer1.0.relu"``."""
    name, sep, count = entry.rpartition("@")
    return name if sep and count.isdigit() else entry


def layer_type(model: nn.Module, name: str) -> str:
    """The type of the module ``name`` of ``model`` (a capture entry like ``"x@1"`` also works):
    one of :data:`LAYER_TYPES`, or ``"other"``."""
    name = base_name(name)
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(f"model has no module named {name!r}")
    parent = modules[name.rpartition(".")[0]] if name else None
    return _type_of(modules[name], parent) or "other"


def layer_types(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{name: layer_type(model, name)}`` for every name (module names or capture entries)."""
    modules = dict(model.named_modules())
    out = {}
    for entry in names:
        name = base_name(entry)
        if name not in modules:
            raise KeyError(f"model has no module named {name!r}")
        parent = modules[name.rpartition(".")[0]] if name else None
        out[entry] = _type_of(modules[name], parent) or "other"
    return out


def select_layers(
    model: nn.Module,
    patterns: Sequence[str] | None = None,
    types: Sequence[str] | None = LAYER_TYPES,
) -> list[str]:
    """Names of the modules of ``model`` to analyse, in module (registration) order.

    Args:
        model: any ``nn.Module``, typically a timm model.
        patterns: regular expressions matched against whole module names (``re.fullmatch``):
            ``["layer[34]\\..*"]`` keeps everything inside ``layer3`` and ``layer4``,
            ``["act1", "layer\\d\\.\\d+"]`` the stem activation and the ResNet blocks. ``None``:
            every name.
        types: keep only modules of these types (subset of :data:`LAYER_TYPES`, see
            :func:`layer_type`); ``None``: any module (then ``patterns`` alone decide).

    A module is selected when its type is in ``types`` *and* its name matches one of the
    ``patterns``. The root module (name ``""``) is never selected.

    Raises:
        ValueError: an unknown type, or an invalid regular expression.
    """
    if types is not None:
        types = tuple(types)
        unknown = [t for t in types if t not in LAYER_TYPES]
        if unknown:
            raise ValueError(f"unknown layer type(s) {unknown}; choose from {LAYER_TYPES}")
    compiled = None
    if patterns is not None:
        if isinstance(patterns, str):
            patterns = [patterns]
        try:
            compiled = [re.compile(p) for p in patterns]
        except re.error as err:
            raise ValueError(f"invalid layer pattern: {err}") from err
    parents = _parents(model)
    selected = []
    for name, module in model.named_modules():
        if not name:
            continue
        if compiled is not None and not any(p.fullmatch(name) for p in compiled):
            continue
        if types is not None and _type_of(module, parents[name]) not in types:
            continue
        selected.append(name)
    return selected


def _bn_act_child(module: nn.Module) -> nn.Module | None:
    """The ``act`` child of a BatchNorm that applies its own activation (BatchNormAct2d), else None."""
    if not is_batchnorm(module):
        return None
    act = getattr(module, "act", None)
    return act if isinstance(act, nn.Module) and any(c is act for c in module.children()) else None


def _clone(t: Tensor) -> Tensor:
    return t.detach().clone()


class LayerCapture:
    """Forward hooks on named modules of ``model`` that record ``fn(output)`` for every call.

    Use it as a context manager; :meth:`run` calls the model's real forward and returns what the
    hooks recorded during that call::

        with LayerCapture(model, ["act1", "layer1.0", "layer4.1"]) as capture:
            outputs = capture.run(x)        # {"act1": tensor, "layer1.0": tensor, ...}

    Args:
        model: the model whose real ``forward`` (``model(*args)``) runs.
        layers: module names in ``model`` (from :func:`select_layers` or typed by hand).
        fn: applied to each captured tensor inside the hook, before the forward goes on
            (default: ``t.detach().clone()``); its result is what is recorded. Compute
            reductions here (a Gram matrix) to keep only small results in memory.

    See the module docstring for the treatment of BatchNormAct layers, repeated calls and
    non-tensor outputs.

    Raises:
        KeyError: a name that is not a module of ``model`` (on entering the context).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], fn: Callable[[Tensor], Any] = _clone):
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.fn = fn
        self.records: dict[str, Any] = {}
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self.output: Any = None

    # -- hooks ---------------------------------------------------------------------------------

    def _record(self, name: str, value: Any) -> None:
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        if isinstance(value, Tensor):
            self.records[name if count == 0 else f"{name}@{count}"] = self.fn(value)

    def _output_hook(self, name: str):
        def hook(module, args, output):
            self._record(name, output)

        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            self._record(name, args[0] if len(args) == 1 else None)

        return hook

    def attach(self) -> "LayerCapture":
        """Register the hooks (done by ``__enter__``)."""
        if self._handles:
            return self
        modules = dict(self.model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise KeyError(f"model has no module(s) named {missing}")
        try:
            for name in self.layers:
                module = modules[name]
                act = _bn_act_child(module)
                if act is not None:
                    self._handles.append(act.register_forward_pre_hook(self._input_hook(name)))
                else:
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this capture registered (done by ``__exit__``, also on errors)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "LayerCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- running -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the records and restart the per-module call counters."""
        self.records = {}
        self._calls = {}

    def run(self, *args, **kwargs) -> dict[str, Any]:
        """Reset, call ``model(*args, **kwargs)`` and return the records of that forward, in the
        order the outputs were produced. The model's own output is kept in :attr:`output`."""
        if not self._handles:
            raise RuntimeError("LayerCapture.run needs the hooks attached: use it inside a `with` block")
        self.reset()
        self.output = self.model(*args, **kwargs)
        return dict(self.records)
