"""Find the convolutions whose output feeds a norm layer, by data flow.

The model is traced into a ``torch.fx`` graph with timm's own no-trace lists
(``timm.layers.get_notrace_modules`` / ``get_notrace_functions``), convolutions, norm layers and
activation modules kept as leaves. A conv *feeds* a norm layer when every path from its output
reaches one of the selected norm layers (``norms``) through the selected kinds of op
(``through``) only:

- ``"shape"`` (always): the channel-preserving linear ops a norm layer sees through: residual
  additions (``x + conv(x)``), concatenation, splitting and indexing (DenseNet, DPN,
  ``MixedConv2d``'s concatenated child convs), ``torch.add``, ``permute`` (ConvNeXt's
  channels-last LayerNorm); dropout, drop-path, drop-block and identity modules; average pooling
  (DenseNet's transitions);
- ``"act"``: elementwise activations (ReLU, GELU, SiLU, ...: ConvMixer's conv -> GELU -> BN);
- ``"conv"``: a following conv (the depthwise conv of a depthwise -> pointwise -> norm chain).

``norms`` picks ``"batch"`` (any ``_BatchNorm``), ``"layer"`` (``nn.LayerNorm`` over one
dimension, timm's ``LayerNorm``/``LayerNorm2d``/``LayerNormAct2d``) and ``"group"``
(``nn.GroupNorm``, timm's ``GroupNorm``/``GroupNormAct``). The defaults, ``("batch",)`` and
``("shape", "act")``, are the paper's setting plus activations.

Shape queries (``x.shape``, ``x.size()``) are not data flow and are ignored. This covers
post-activation nets (conv -> BN), pre-activation nets (ResNetV2, DenseNet, DPN, xception41p:
a conv feeds the next block's BN across the residual addition or concatenation) and timm's
conv classes (``Conv2dSame``, ``StdConv2d``, ``CondConv2d``, ``MixedConv2d``). A path into a
multiplicative gate, a reshape, the model output or an op not selected disqualifies the conv.

timm marks some modules as untraceable (``MobileVitBlock``, attention blocks, ...). Such a leaf
that contains convs or norm layers is traced on its own; when that, or the whole model, cannot be
traced, the **fallback rule** applies to the untraceable part and a :class:`PairingFallbackWarning`
says so: one real forward pass (on ``example_input``, or a random batch of the model's
``pretrained_cfg['input_size']``) pairs a conv with a norm layer only when the conv's output tensor
is passed unchanged to that norm layer. It is conservative: it never pairs across additions,
concatenations or leaf boundaries, so it may leave a conv without a branch, never add a wrong one.

Neither the trace nor the fallback forward leaves anything behind in the model: what hooks stored,
caches and attributes the forward set, buffers it updated are all put back
(:mod:`timm_branch._preserve`), so the model still copies and saves as before.
"""
from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn
from torch.nn import functional as F

from ._preserve import preserved
from .bn import is_batchnorm


class PairingFallbackWarning(UserWarning):
    """Part of a model could not be FX-traced; its convs were paired by the fallback rule."""


NORM_KINDS: tuple[str, ...] = ("batch", "layer", "group")
THROUGH_KINDS: tuple[str, ...] = ("shape", "act", "conv")
DEFAULT_NORMS: tuple[str, ...] = ("batch",)
DEFAULT_THROUGH: tuple[str, ...] = ("shape", "act")


@dataclass(frozen=True)
class ConvBNPair:
    """A convolution and the BatchNorm layers its output feeds (module names in ``model``)."""

    conv: str
    bns: tuple[str, ...]


@dataclass(frozen=True)
class ConvNormPair:
    """A convolution, the norm layers its output feeds (module names in ``model``), and ``path``:
    the widest kind of op on the way, ``"shape"``, ``"act"`` or ``"conv"`` (see the module doc).

    ``direct``: the traced graph calls the conv once and passes its output, unchanged, to
    ``norms[0]`` alone, which it calls once (what folding a frozen BatchNorm into the conv needs).
    Never set for pairs found by the fallback rule.
    """

    conv: str
    norms: tuple[str, ...]
    path: str
    direct: bool = False


def check_norms_through(norms: Sequence[str], through: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the choices when ``norms`` or ``through`` holds an unknown kind."""
    for what, given, choices in (("norms", norms, NORM_KINDS), ("through", through, THROUGH_KINDS)):
        unknown = sorted(set(given) - set(choices))
        if unknown or not given or isinstance(given, str):
            named = f" ({', '.join(map(repr, unknown))} unknown)" if unknown and not isinstance(given, str) else ""
            raise ValueError(f"{what}={given!r}{named}: give a non-empty list of {', '.join(choices)}")


def norm_kind(module: nn.Module) -> str | None:
    """``"batch"``, ``"layer"`` or ``"group"`` for a norm layer a branch can pair with, else ``None``."""
    if is_batchnorm(module):
        return "batch"
    if isinstance(module, nn.GroupNorm):
        return "group"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:  # over channels only
        return "layer"
    return None


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution a branch can live on.

    Any non-transposed ``torch.nn`` convolution (``Conv1d/2d/3d`` and subclasses such as timm's
    ``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d``) and timm's ``CondConv2d``.
    """
    from timm.layers import CondConv2d

    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.transposed and not isinstance(module, nn.modules.lazy.LazyModuleMixin)
    return isinstance(module, CondConv2d)


def find_conv_norm_pairs(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    norms: Sequence[str] = DEFAULT_NORMS,
    through: Sequence[str] = DEFAULT_THROUGH,
) -> list[ConvNormPair]:
    """Every conv of ``model`` whose output feeds one of the ``norms`` through ``through`` ops, in module order.

    Args:
        model: any ``nn.Module``, typically a timm model. Left unchanged.
        example_input: a batch for the fallback rule's forward pass; only used where tracing fails.
            Defaults to a random batch of ``model.pretrained_cfg['input_size']``.
        norms: which norm layers count, among :data:`NORM_KINDS`.
        through: which ops may stand between conv and norm, among :data:`THROUGH_KINDS`
            (``"shape"`` is always allowed).

    Returns:
        One :class:`ConvNormPair` per paired conv. Empty when the model has no such conv.
    """
    return _pairing(model, example_input, norms, through)[0]


def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor | None = None) -> list[ConvBNPair]:
    """Every conv of ``model`` whose output feeds a BatchNorm, with :func:`add_branches`'s defaults
    (through shape-only ops and elementwise activations), in module order.

    Args:
        model: any ``nn.Module``, typically a timm model. Left unchanged.
        example_input: a batch for the fallback rule's forward pass; only used where tracing fails.
            Defaults to a random batch of ``model.pretrained_cfg['input_size']``.

    Returns:
        One :class:`ConvBNPair` per paired conv. Empty when the model has no such conv.
    """
    return [ConvBNPair(pair.conv, pair.norms) for pair in find_conv_norm_pairs(model, example_input)]


def _pairing(
    model: nn.Module,
    example_input: torch.Tensor | None,
    norms: Sequence[str] = DEFAULT_NORMS,
    through: Sequence[str] = DEFAULT_THROUGH,
) -> tuple[list[ConvNormPair], dict[str, str]]:
    """The pairs, and for every conv left unpaired a short reason (for reports).

    The trace and the fallback forward leave the model as they found it (:func:`preserved`).
    """
    check_norms_through(norms, through)
    rule = _Rule(frozenset(norms), frozenset(through))
    found: dict[str, tuple[set[str], int]] = {}
    direct: set[str] = set()
    reasons: dict[str, str] = {}
    untraced: list[tuple[str, Exception]] = []
    with preserved(model):
        _pairs_in(model, "", rule, found, direct, reasons, untraced)
        if untraced:
            _add_fallback_pairs(model, rule, untraced, example_input, found)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    pairs = [
        ConvNormPair(conv, tuple(sorted(found[conv][0], key=order.__getitem__)), THROUGH_KINDS[found[conv][1]],
                     conv in direct)
        for conv in sorted(found, key=order.__getitem__)
    ]
    for name, module in model.named_modules():
        if is_conv(module) and name not in found:
            inside = next((prefix for prefix, _ in untraced if name.startswith(prefix)), None)
            traced = inside is None
            reason = "not reached by the trace" if traced else "untraceable module; fallback found no direct norm layer"
            reasons.setdefault(name, reason)
    return pairs, {name: reasons[name] for name in sorted(reasons, key=order.__getitem__) if name not in found}


_THROUGH_RANK = {kind: rank for rank, kind in enumerate(THROUGH_KINDS)}


@dataclass(frozen=True)
class _Rule:
    """The selected norm kinds and kinds of op between conv and norm."""

    norms: frozenset[str]
    through: frozenset[str]

    def is_norm(self, module: nn.Module) -> bool:
        return norm_kind(module) in self.norms

    @property
    def noun(self) -> str:
        """What reasons call the selected norm layers."""
        return "BatchNorm" if self.norms == {"batch"} else "selected norm layer"


class _Tracer(fx.Tracer):
    """An FX tracer that keeps convs, norm layers, activations and timm's no-trace modules as leaves."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._notrace = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_conv(m) or norm_kind(m) is not None or isinstance(m, _act_modules() + self._notrace)
                or super().is_leaf_module(m, module_qualified_name))


def _pairs_in(
    root: nn.Module,
    prefix: str,
    rule: _Rule,
    found: dict[str, tuple[set[str], int]],
    direct: set[str],
    reasons: dict[str, str],
    untraced: list[tuple[str, Exception]],
) -> None:
    """Trace ``root`` and record its pairs (and in ``direct`` the direct ones); recurse into opaque
    leaves holding both convs and norms."""
    try:
        graph = _Tracer().trace(root)
    except Exception as err:  # FX raises many types (TraceError, TypeError, RuntimeError, ...)
        untraced.append((prefix, err))
        return
    modules = dict(root.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    memo: dict[fx.Node, _Reach] = {}
    for target, nodes in calls.items():
        module = modules[target]
        if is_conv(module):
            reached = [_norms_fed_by(node, modules, rule, memo) for node in nodes]
            blocked = [r for r in reached if isinstance(r, str)]
            if blocked:
                reasons[prefix + target] = blocked[0]
            else:
                norms = {n for r in reached for n in r[0]}
                found[prefix + target] = ({prefix + n for n in norms}, max(r[1] for r in reached))
                if _is_direct(nodes, calls, norms):
                    direct.add(prefix + target)
        elif _holds_pairs(module, rule) and not rule.is_norm(module):
            _pairs_in(module, f"{prefix}{target}.", rule, found, direct, reasons, untraced)
        else:
            for name, inner in module.named_modules(prefix=prefix + target):
                if is_conv(inner):
                    reasons[name] = f"inside {type(module).__name__}, an untraceable module without {rule.noun}"


def _is_direct(conv_calls: list[fx.Node], calls: dict[str, list[fx.Node]], norms: set[str]) -> bool:
    """Whether a paired conv, called at ``conv_calls`` and feeding ``norms``, is called once and its
    output's only data user is the call of its one norm layer on it (as its sole input), that
    layer's only call."""
    if len(conv_calls) != 1 or len(norms) != 1:
        return False
    users = [u for u in conv_calls[0].users if not _is_shape_query(u)]
    return (len(users) == 1 and users[0].op == "call_module" and users[0].target in norms
            and users[0].args == (conv_calls[0],) and not users[0].kwargs and len(calls[users[0].target]) == 1)


def _holds_pairs(module: nn.Module, rule: _Rule) -> bool:
    inner = list(module.modules())
    return any(is_conv(m) for m in inner) and any(rule.is_norm(m) for m in inner)


# The norms every path reaches and the widest rank of op on the way, or why a path does not.
_Reach = tuple[frozenset[str], int] | str


def _norms_fed_by(node: fx.Node, modules: dict[str, nn.Module], rule: _Rule, memo: dict[fx.Node, _Reach]) -> _Reach:
    """The norms every data path from ``node`` reaches through ``rule``'s ops, or why one path doesn't."""
    if node in memo:
        return memo[node]
    norms: set[str] = set()
    rank = 0
    users = [u for u in node.users if not _is_shape_query(u)]
    reached: _Reach = "unused" if not users else (frozenset(), 0)
    for user in users:
        kind = _op_kind(user, node, modules, rule)
        if kind == "norm":
            norms.add(user.target)
            continue
        if kind is None:
            reached = _describe(user, modules, rule)
            break
        further = _norms_fed_by(user, modules, rule, memo)
        if isinstance(further, str):
            reached = further
            break
        norms |= further[0]
        rank = max(rank, further[1], _THROUGH_RANK[kind])
    if not isinstance(reached, str):
        reached = (frozenset(norms), rank)
    memo[node] = reached
    return reached


def _op_kind(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module], rule: _Rule) -> str | None:
    """How ``user`` (a consumer of ``node``) counts: ``"norm"``, a selected kind of op, or ``None``."""
    module = modules[user.target] if user.op == "call_module" else None
    if module is not None and rule.is_norm(module) and user.args[0] is node:
        return "norm"
    if _is_op(user, modules, _PASS_FUNCTIONS, _PASS_METHODS, _pass_modules()):
        return "shape"
    if "act" in rule.through and _is_op(user, modules, _ACT_FUNCTIONS, _ACT_METHODS, _act_modules()):
        return "act"
    if "conv" in rule.through and module is not None and is_conv(module) and user.args[0] is node:
        return "conv"
    return None


def _describe(node: fx.Node, modules: dict[str, nn.Module], rule: _Rule) -> str:
    if node.op == "output":
        return f"output leaves the model without {rule.noun}"
    if node.op == "call_module":
        return f"feeds {type(modules[node.target]).__name__} before any {rule.noun}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"feeds {name} before any {rule.noun}"


_PASS_FUNCTIONS = {
    operator.add, operator.iadd, operator.getitem, torch.add, torch.cat, torch.concat, torch.split,
    torch.chunk, torch.nn.functional.dropout, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
}
_PASS_METHODS = {"add", "add_", "split", "chunk", "contiguous", "permute"}
_ACT_FUNCTIONS = {
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.celu, F.selu, F.softplus, F.sigmoid, F.tanh,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}


@functools.cache
def _pass_modules() -> tuple[type, ...]:
    from timm.layers import AvgPool2dSame, DropBlock2d, DropPath

    return (
        nn.Identity, nn.modules.dropout._DropoutNd, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, AvgPool2dSame, DropPath, DropBlock2d,
    )


def _is_op(node: fx.Node, modules: dict[str, nn.Module], functions: set, methods: set[str],
           module_types: tuple[type, ...]) -> bool:
    """Whether ``node`` calls one of ``functions``, ``methods`` or a module of ``module_types``."""
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_module":
        return isinstance(modules[node.target], module_types)
    return False


@functools.cache
def _act_modules() -> tuple[type, ...]:
    """Elementwise activation modules of torch and timm (not Softmax, GLU, ...: those mix channels)."""
    from timm.layers import activations, activations_me

    torch_acts = (
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU,
        nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.PReLU,
    )
    timm_acts = tuple(
        cls for module in (activations, activations_me) for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__
    )
    return torch_acts + timm_acts


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS


def _add_fallback_pairs(
    model: nn.Module,
    rule: _Rule,
    untraced: list[tuple[str, Exception]],
    example_input: torch.Tensor | None,
    found: dict[str, tuple[set[str], int]],
) -> None:
    for prefix, err in untraced:
        where = f"module {prefix[:-1]!r} ({type(model.get_submodule(prefix[:-1])).__name__})" if prefix else "the model"
        warnings.warn(
            f"FX tracing of {where} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"its convs are paired by the conservative fallback rule (a conv is paired only with a {rule.noun} "
            "that receives its output tensor unchanged in a real forward pass), which may leave some convs "
            "without a branch.",
            PairingFallbackWarning,
            stacklevel=3,
        )
    direct = _direct_pairs_by_forward(model, rule, example_input)
    for conv, norms in direct.items():
        for prefix, _ in untraced:
            inside = [norm for norm in norms if norm.startswith(prefix)]
            if conv.startswith(prefix) and inside:
                found.setdefault(conv, (set(), 0))[0].update(inside)


def _direct_pairs_by_forward(model: nn.Module, rule: _Rule, example_input: torch.Tensor | None) -> dict[str, set[str]]:
    """Pairs (conv -> norms) where a norm's input *is* a conv's output tensor in one real forward."""
    if example_input is None:
        input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
        if input_size is None:
            raise ValueError(
                "the model cannot be FX-traced and has no pretrained_cfg['input_size'] for the fallback "
                "forward pass; pass example_input=<a batch the model accepts>"
            )
        param = next(model.parameters())
        # A generator of its own: pairing must not advance the program's global random stream.
        gen = torch.Generator(device=param.device).manual_seed(0)
        example_input = torch.randn(2, *input_size, dtype=param.dtype, device=param.device, generator=gen)
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, set[str]] = {}

    def conv_hook(name):
        def hook(module, args, output):
            outputs[id(output)] = (name, output)  # keeping the tensor alive keeps its id unique
        return hook

    def bn_hook(name):
        def hook(module, args):
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                pairs.setdefault(hit[0], set()).add(name)
        return hook

    handles = []
    for name, module in model.named_modules():
        if is_conv(module):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif rule.is_norm(module):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for module, training in modes:
            module.training = training
        for handle in handles:
            handle.remove()
    return pairs
