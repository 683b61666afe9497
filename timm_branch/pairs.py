"""Find the convolutions whose output feeds a BatchNorm, by data flow.

The model is traced into a ``torch.fx`` graph with timm's own no-trace lists
(``timm.layers.get_notrace_modules`` / ``get_notrace_functions``), convolutions and BatchNorms
kept as leaves. A conv *feeds* a BatchNorm when every path from its output reaches a BatchNorm
before any operation other than the channel-preserving linear ones below, which a
BatchNorm sees through:

- residual additions (``x + conv(x)``), concatenation, splitting and indexing (DenseNet,
  DPN, ``MixedConv2d``'s concatenated child convs), ``torch.add``;
- dropout, drop-path, drop-block and identity modules;
- average pooling (DenseNet's transitions).

Shape queries (``x.shape``, ``x.size()``) are not data flow and are ignored. This covers
post-activation nets (conv -> BN), pre-activation nets (ResNetV2, DenseNet, DPN, xception41p:
a conv feeds the next block's BN across the residual addition or concatenation) and timm's
conv classes (``Conv2dSame``, ``StdConv2d``, ``CondConv2d``, ``MixedConv2d``). A path into a
non-linearity, a multiplicative gate, a reshape or the model output disqualifies the conv.

timm marks some modules as untraceable (``MobileVitBlock``, attention blocks, ...). Such a leaf
that contains convs or BatchNorms is traced on its own; when that, or the whole model, cannot be
traced, the **fallback rule** applies to the untraceable part and a :class:`PairingFallbackWarning`
says so: one real forward pass (on ``example_input``, or a random batch of the model's
``pretrained_cfg['input_size']``) pairs a conv with a BatchNorm only when the conv's output tensor
is passed unchanged to that BatchNorm. It is conservative: it never pairs across additions,
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

import torch
from torch import fx, nn

from ._preserve import preserved
from .bn import is_batchnorm


class PairingFallbackWarning(UserWarning):
    """Part of a model could not be FX-traced; its convs were paired by the fallback rule."""


@dataclass(frozen=True)
class ConvBNPair:
    """A convolution and the BatchNorm layers its output feeds (module names in ``model``)."""

    conv: str
    bns: tuple[str, ...]


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution a branch can live on.

    Any non-transposed ``torch.nn`` convolution (``Conv1d/2d/3d`` and subclasses such as timm's
    ``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d``) and timm's ``CondConv2d``.
    """
    from timm.layers import CondConv2d

    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.transposed and not isinstance(module, nn.modules.lazy.LazyModuleMixin)
    return isinstance(module, CondConv2d)


def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor | None = None) -> list[ConvBNPair]:
    """Every conv of ``model`` whose output feeds a BatchNorm, in module order.

    Args:
        model: any ``nn.Module``, typically a timm model.
        example_input: a batch for the fallback rule's forward pass; only used where tracing fails.
            Defaults to a random batch of ``model.pretrained_cfg['input_size']``.

    Returns:
        One :class:`ConvBNPair` per paired conv. Empty when the model has no such conv.
    """
    return _pairing(model, example_input)[0]


def _pairing(model: nn.Module, example_input: torch.Tensor | None) -> tuple[list[ConvBNPair], dict[str, str]]:
    """The pairs, and for every conv left unpaired a short reason (for reports).

    The trace and the fallback forward leave the model as they found it (:func:`preserved`).
    """
    found: dict[str, set[str]] = {}
    reasons: dict[str, str] = {}
    untraced: list[tuple[str, Exception]] = []
    with preserved(model):
        _pairs_in(model, "", found, reasons, untraced)
        if untraced:
            _add_fallback_pairs(model, untraced, example_input, found)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    pairs = [ConvBNPair(conv, tuple(sorted(found[conv], key=order.__getitem__))) for conv in sorted(found, key=order.__getitem__)]
    for name, module in model.named_modules():
        if is_conv(module) and name not in found:
            inside = next((prefix for prefix, _ in untraced if name.startswith(prefix)), None)
            reasons.setdefault(name, "untraceable module; fallback found no direct BatchNorm" if inside is not None else "not reached by the trace")
    return pairs, {name: reasons[name] for name in sorted(reasons, key=order.__getitem__) if name not in found}


class _Tracer(fx.Tracer):
    """An FX tracer that keeps convs, BatchNorms and timm's no-trace modules as leaves."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._notrace = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_conv(m) or is_batchnorm(m) or isinstance(m, self._notrace) or super().is_leaf_module(m, module_qualified_name)


def _pairs_in(
    root: nn.Module,
    prefix: str,
    found: dict[str, set[str]],
    reasons: dict[str, str],
    untraced: list[tuple[str, Exception]],
) -> None:
    """Trace ``root`` and record its pairs; recurse into opaque leaves holding both convs and BNs."""
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
    memo: dict[fx.Node, set[str] | str] = {}
    for target, nodes in calls.items():
        module = modules[target]
        if is_conv(module):
            reached = [_bns_fed_by(node, modules, memo) for node in nodes]
            blocked = [r for r in reached if isinstance(r, str)]
            if blocked:
                reasons[prefix + target] = blocked[0]
            else:
                found[prefix + target] = {prefix + bn for r in reached for bn in r}
        elif _holds_pairs(module) and not is_batchnorm(module):
            _pairs_in(module, f"{prefix}{target}.", found, reasons, untraced)
        else:
            for name, inner in module.named_modules(prefix=prefix + target):
                if is_conv(inner):
                    reasons[name] = f"inside {type(module).__name__}, an untraceable module without BatchNorm"


def _holds_pairs(module: nn.Module) -> bool:
    inner = list(module.modules())
    return any(is_conv(m) for m in inner) and any(is_batchnorm(m) for m in inner)


def _bns_fed_by(node: fx.Node, modules: dict[str, nn.Module], memo: dict[fx.Node, set[str] | str]) -> set[str] | str:
    """The BNs every data path from ``node`` reaches through pass-through ops, or why one path doesn't."""
    if node in memo:
        return memo[node]
    reached: set[str] | str = set()
    users = [u for u in node.users if not _is_shape_query(u)]
    if not users:
        reached = "unused"
    for user in users:
        if user.op == "call_module" and is_batchnorm(modules[user.target]) and user.args[0] is node:
            reached.add(user.target)
        elif _is_pass_through(user, modules):
            further = _bns_fed_by(user, modules, memo)
            if isinstance(further, str):
                reached = further
                break
            reached |= further
        else:
            reached = _describe(user, modules)
            break
    memo[node] = reached
    return reached


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "output":
        return "output leaves the model without a BatchNorm"
    if node.op == "call_module":
        return f"feeds {type(modules[node.target]).__name__} before any BatchNorm"
    name = getattr(node.target, "__name__", str(node.target))
    return f"feeds {name} before any BatchNorm"


_PASS_FUNCTIONS = {
    operator.add, operator.iadd, operator.getitem, torch.add, torch.cat, torch.concat, torch.split,
    torch.chunk, torch.nn.functional.dropout, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
}
_PASS_METHODS = {"add", "add_", "split", "chunk", "contiguous"}
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}


@functools.cache
def _pass_modules() -> tuple[type, ...]:
    from timm.layers import AvgPool2dSame, DropBlock2d, DropPath

    return (
        nn.Identity, nn.modules.dropout._DropoutNd, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, AvgPool2dSame, DropPath, DropBlock2d,
    )


def _is_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    if node.op == "call_module":
        return isinstance(modules[node.target], _pass_modules())
    return False


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS


def _add_fallback_pairs(
    model: nn.Module,
    untraced: list[tuple[str, Exception]],
    example_input: torch.Tensor | None,
    found: dict[str, set[str]],
) -> None:
    for prefix, err in untraced:
        where = f"module {prefix[:-1]!r} ({type(model.get_submodule(prefix[:-1])).__name__})" if prefix else "the model"
        warnings.warn(
            f"FX tracing of {where} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "its convs are paired by the conservative fallback rule (a conv is paired only with a BatchNorm "
            "that receives its output tensor unchanged in a real forward pass), which may leave some convs "
            "without a branch.",
            PairingFallbackWarning,
            stacklevel=3,
        )
    direct = _direct_pairs_by_forward(model, example_input)
    for conv, bns in direct.items():
        for prefix, _ in untraced:
            inside = [bn for bn in bns if bn.startswith(prefix)]
            if conv.startswith(prefix) and inside:
                found.setdefault(conv, set()).update(inside)


def _direct_pairs_by_forward(model: nn.Module, example_input: torch.Tensor | None) -> dict[str, set[str]]:
    """Pairs (conv -> BNs) where a BN's input *is* a conv's output tensor in one real forward."""
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
        elif is_batchnorm(module):
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
