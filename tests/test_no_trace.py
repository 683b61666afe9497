"""add_branches / merge_branches leave no trace of the pairing's forward in the model (issue 23).

The pairing traces the model with ``torch.fx`` (Proxy inputs) and, where tracing fails, runs it
once. Whatever that forward stores (timm's ``FeatureHooks`` outputs, caches, attributes, buffers)
must be gone afterwards. For every model checked, after ``add_branches`` and again after
``merge_branches``:

- ``copy.deepcopy`` and ``torch.save`` succeed if they succeeded before;
- no ``fx.Proxy``, ``fx.Node`` or ``fx.Graph`` is reachable from a module's ``__dict__`` that was
  not reachable before (timm's ``FeatureGraphNet`` legitimately holds its own graph);
- every module's attributes equal a snapshot taken before the surgery, except what the surgery
  documents: the branched convs, the BatchNorm policy while branched, the branch record/history.

The checks below are written independently of :mod:`timm_branch._preserve`: reachability walks
``gc.get_referents``. The slow tier sweeps every third zoo model (``tests/zoo.py``) and the sweep tier
(``pytest -m sweep``, about 7 minutes on 2 cores) the other two thirds, with their features-only
variants; the default tier runs the issue's reproduction and each features-only class on a tiny net.
"""
from __future__ import annotations

import copy
import functools
import gc
import io
import types
import warnings
from typing import NamedTuple

import pytest
import timm
import torch
from torch import fx, nn

from _helpers import assert_restored, snapshot
from timm_branch import PairingFallbackWarning, add_branches, merge_branches
from timm_branch._preserve import preserved
from timm_branch.bn import is_batchnorm
from timm_branch.branch import iter_branches
from timm_branch.history import _ACTIVE, _HISTORY
from zoo import DEFAULT_INPUT_SIZE, FAMILY_MODELS, INPUT_SIZES, SPECIAL_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURE_CLASSES = ("list", "hook", "getter", "fx")
_FX_TYPES = (fx.Proxy, fx.Node, fx.Graph)


# -- the checks ------------------------------------------------------------------------------------

def _copyable(model: nn.Module) -> dict[str, bool]:
    """Whether ``copy.deepcopy`` and ``torch.save`` (to a buffer) succeed on ``model``."""
    result = {}
    for what, op in (("deepcopy", copy.deepcopy), ("torch.save", lambda m: torch.save(m, io.BytesIO()))):
        try:
            op(model)
            result[what] = True
        except Exception:  # any failure counts: the point is whether it worked before
            result[what] = False
    return result


def _fx_objects(model: nn.Module) -> dict[int, object]:
    """Every fx Proxy/Node/Graph reachable from a module's ``__dict__``, by id (kept alive)."""
    found: dict[int, object] = {}
    seen: set[int] = set()
    stack: list[object] = [module.__dict__ for module in model.modules()]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, _FX_TYPES):
            found[id(obj)] = obj
        if isinstance(obj, types.FunctionType):  # closures, not the globals of the function's module
            stack.extend(cell.cell_contents for cell in obj.__closure__ or () if _filled(cell))
        else:
            stack.extend(gc.get_referents(obj))
    return found


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _render(obj: object, memo: dict[int, int]) -> object:
    """A comparable picture of ``obj``: tensors and modules by identity (and version), containers and
    plain objects by content, cycles as back-references."""
    if isinstance(obj, torch.Tensor):  # values: _buffer_values (restoring a buffer bumps its version)
        return ("tensor", id(obj))
    if isinstance(obj, nn.Module):
        return ("module", id(obj))
    if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, int, float,
                        bool, type(None), torch.dtype, torch.device)):
        return obj
    if id(obj) in memo:
        return ("seen", memo[id(obj)])
    memo[id(obj)] = len(memo)
    if isinstance(obj, dict):
        return (type(obj), [(_render(k, memo), _render(v, memo)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj), [_render(x, memo) for x in obj])
    if isinstance(obj, (set, frozenset)):
        return (type(obj), sorted(id(x) for x in obj))
    if isinstance(obj, functools.partial):
        return ("partial", _render(obj.func, memo), _render(obj.args, memo), _render(obj.keywords, memo))
    if isinstance(obj, types.MethodType):
        return ("method", _render(obj.__self__, memo), obj.__func__)
    state = getattr(obj, "__dict__", None)
    return (type(obj), _render(state, memo)) if isinstance(state, dict) else ("object", id(obj))


def _attributes(model: nn.Module) -> dict[str, object]:
    """Every module's ``__dict__`` pictured, without the branch record and history (documented)."""
    return {
        name: _render({k: v for k, v in module.__dict__.items() if k not in (_ACTIVE, _HISTORY)}, {})
        for name, module in model.named_modules(remove_duplicate=False)
    }


def _buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer's values."""
    return {name: b.clone() for name, b in model.named_buffers()}


class _Before(NamedTuple):
    """What the model was before the surgery."""

    attributes: dict[str, object]
    buffers: dict[str, torch.Tensor]
    fx_objects: dict[int, object]
    copyable: dict[str, bool]


def _before(model: nn.Module) -> _Before:
    return _Before(_attributes(model), _buffer_values(model), _fx_objects(model), _copyable(model))


def _assert_untouched(model: nn.Module, before: _Before, skip: set[str], copies: tuple[str, ...], when: str) -> None:
    """Attributes outside ``skip`` and buffer values as ``before``, no new fx object, ``copies`` still work."""
    after = _attributes(model)
    changed = [name for name in before.attributes if name not in skip and after.get(name) != before.attributes[name]]
    assert not changed, f"{when}: attributes of {changed[:5]} differ from before the surgery"
    now = _buffer_values(model)
    changed = [name for name, value in before.buffers.items() if not torch.equal(now[name], value)]
    assert not changed, f"{when}: buffers {changed[:5]} changed values"
    new_fx = [type(obj).__name__ for key, obj in _fx_objects(model).items() if key not in before.fx_objects]
    assert not new_fx, f"{when}: {len(new_fx)} fx objects reachable from the model ({new_fx[:3]})"
    works = _copyable(model)
    lost = [what for what in copies if before.copyable[what] and not works[what]]
    assert not lost, f"{when}: {' and '.join(lost)} worked before and fails now"


def _subtrees(model: nn.Module, roots: set[str]) -> set[str]:
    """The modules named ``roots`` and everything inside them."""
    return {name for name, _ in model.named_modules(remove_duplicate=False)
            if any(name == root or name.startswith(root + ".") for root in roots)}


def _check_no_trace(model: nn.Module, example_input: torch.Tensor | None = None) -> None:
    """add_branches then merge_branches on ``model``, checking after each that nothing is left behind."""
    before, layout = _before(model), snapshot(model)
    add_branches(model, example_input=example_input)
    branched = _subtrees(model, {name for name, _, _ in iter_branches(model)})
    # The BatchNorm policy pins each norm layer, and with it the children of timm's BatchNormAct2d, in eval.
    norms = _subtrees(model, {name for name, m in model.named_modules() if is_batchnorm(m)})
    _assert_untouched(model, before, branched | norms, ("deepcopy", "torch.save"), "after add_branches")
    merge_branches(model)
    _assert_untouched(model, before, branched, ("deepcopy", "torch.save"), "after merge_branches")
    assert_restored(layout, snapshot(model), type(model).__name__)


# -- preserved(), on purpose-built state -----------------------------------------------------------

class _Slotted:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class _Messy(nn.Module):
    """A forward that leaves traces everywhere a module can keep state."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("steps", torch.zeros(()))
        self.cache: dict = {}
        self.seen: list = []
        self.keys: set = set()
        self.slotted = _Slotted()
        self.outputs: dict = {}
        self.conv.register_forward_hook(functools.partial(self._store, "conv"))  # as timm's FeatureHooks
        last = None

        def remember(module, args, output):
            nonlocal last
            last = output

        self.bn.register_forward_hook(remember)
        self.last = lambda: last

    def _store(self, key, module, args, output):
        self.outputs[output.device] = {key: output}

    def forward(self, x):
        self.steps.add_(1)  # a real in-place update, Proxy or not
        self.cache[str(x.device)] = x
        self.seen.append(x)
        self.keys.add(x)
        self.slotted.value = x
        self.shape = x.shape  # a new attribute
        return self.bn(self.conv(x))


def test_preserved_puts_back_every_kind_of_state():
    model = _Messy()
    before = _attributes(model)
    with preserved(model):
        fx.symbolic_trace(model)
        model(torch.randn(1, 3, 4, 4))
    assert _attributes(model) == before
    assert float(model.steps) == 0 and model.slotted.value == 0 and model.last() is None
    assert not model.outputs and not model.cache and not model.seen and not model.keys


def test_preserved_refuses_a_forward_that_changes_a_parameter():
    model = nn.Conv2d(3, 4, 1)
    with pytest.raises(RuntimeError, match="modified in place"), preserved(model):
        with torch.no_grad():
            model.weight.mul_(2)


def test_pairing_keeps_the_global_random_stream():
    model = timm.create_model("mobilevit_xxs", pretrained=False)  # falls back: one real forward
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with pytest.warns(PairingFallbackWarning):
        add_branches(model)
    assert torch.equal(torch.rand(3), expected)


# -- timm models -----------------------------------------------------------------------------------

def test_xception41p_features_only_copies_and_saves_after_surgery():
    """The issue's reproduction: FeatureHooks used to keep Proxies keyed by Proxy devices."""
    torch.manual_seed(0)
    model = timm.create_model("xception41p", pretrained=False, features_only=True)
    _check_no_trace(model)


@pytest.mark.parametrize("feature_cls", FEATURE_CLASSES)
def test_features_only_variants_leave_no_trace(feature_cls):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, features_only=True, feature_cls=feature_cls)
    _check_no_trace(model)


def test_trainer_deep_copies_of_a_branched_features_only_model():
    """The trainer's copies, in its order, on xception41p features_only.

    ``ContinualTrainer`` builds its backbone itself (``timm.create_model(name, num_classes=0)``) and
    calls ``forward_features``/``forward_head``, which a features-only model lacks, so it cannot
    train one; this runs exactly its copy paths: the momentum network (``copy.deepcopy`` of the
    backbone), both branched and merged, then the next task's teacher
    (``copy.deepcopy(backbone).eval().requires_grad_(False)``) and the backbone's next branches.
    """
    torch.manual_seed(0)
    backbone = timm.create_model("xception41p", pretrained=False, features_only=True)
    momentum = copy.deepcopy(backbone)
    for net in (backbone, momentum):
        add_branches(net)
    momentum.requires_grad_(False)
    for net in (backbone, momentum):
        merge_branches(net)
    teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
    add_branches(backbone)
    torch.save(teacher, io.BytesIO())
    assert not _fx_objects(teacher) and not _fx_objects(momentum) and not _fx_objects(backbone)


def _sweep_cases():
    names = list(dict.fromkeys([*FAMILY_MODELS.values(), *SPECIAL_MODELS]))
    for index, name in enumerate(names):
        for feature_cls in (None, *FEATURE_CLASSES):
            variant = "model" if feature_cls is None else f"features-{feature_cls}"
            # Every third zoo model in the slow tier (CI's budget), the others in the sweep tier.
            tier = pytest.mark.slow if index % 3 == 0 or name == "xception41p" else pytest.mark.sweep
            yield pytest.param(name, feature_cls, id=f"{name}-{variant}", marks=tier)


@pytest.mark.parametrize("name, feature_cls", list(_sweep_cases()))
def test_zoo_leaves_no_trace(name, feature_cls):
    kwargs = {} if feature_cls is None else {"features_only": True, "feature_cls": feature_cls}
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:  # timm offers features_only / this feature_cls for some models only
        pytest.skip(f"timm does not build {name} with {kwargs}: {type(err).__name__}")
    if not any(is_batchnorm(m) for m in model.modules()):
        pytest.skip(f"{name} {kwargs} keeps no BatchNorm")
    x = torch.randn(2, 3, *INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as err:  # e.g. selecsls42 features-hook: timm's hook gets a list, not a tensor
        pytest.skip(f"timm's {name} {kwargs} does not run: {type(err).__name__}: {err}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PairingFallbackWarning)  # which models fall back: test_coverage.py
        _check_no_trace(model, x)
