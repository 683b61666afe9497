"""Coverage: add -> perturb -> merge round trip on one model of every timm family that can be branched.

Every model runs in float64, in eval mode, with randomised BatchNorm statistics and affine
parameters, on a batch of 2:

1. ``find_conv_norm_pairs`` finds at least one pair (with the defaults, or the ``WIDENED_MODELS``'
   ``norms``/``through``);
2. ``add_branches`` leaves the output unchanged (relative error <= 1e-12);
3. after random small branches, ``merge_branches`` reproduces the branched output (<= 1e-10) and
   restores module classes, modes, state-dict keys/shapes/dtypes and ``requires_grad`` flags.

Models whose pairing falls back (``FALLBACK_MODELS`` in ``tests/zoo.py``, ``WIDE_FALLBACK_MODELS``
with the widest settings) must emit a ``PairingFallbackWarning``; the others must not. The fast tier
(default) runs a few small, diverse models in every branch shape; ``pytest -m slow`` runs every family
of docs/COVERAGE.md with the widest ``norms``/``through`` and the shapes rotated, and checks that the
families it lists as unbranchable are refused.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch

from _helpers import (
    assert_restored,
    max_rel_err,
    pairing_warnings,
    perturb_branches,
    randomise_batchnorm,
    snapshot,
)
from timm_branch import (
    BRANCH_SHAPES,
    NoBatchNormError,
    add_branches,
    find_conv_norm_pairs,
    merge_branches,
)
from timm_branch.bn import is_batchnorm
from timm_branch.branch import iter_branches
from timm_branch.pairs import NORM_KINDS, THROUGH_KINDS, norm_kind
from zoo import (
    DEFAULT_INPUT_SIZE,
    FALLBACK_MODELS,
    FAMILY_MODELS,
    FAST_MODELS,
    INPUT_SIZES,
    NO_BATCHNORM_EXAMPLES,
    NO_BATCHNORM_FAMILIES,
    NO_PAIR_FAMILIES,
    SPECIAL_MODELS,
    SWEEP_KWARGS,
    UNBRANCHABLE_FAMILIES,
    WIDE_FALLBACK_MODELS,
    WIDENED_FAMILY_MODELS,
    WIDENED_MODELS,
)

ADD_TOL = 1e-12
MERGE_TOL = 1e-10
WIDEST = {"norms": NORM_KINDS, "through": THROUGH_KINDS}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _available() -> frozenset[str]:
    return frozenset(timm.list_models())


def _create(name: str, **kwargs) -> torch.nn.Module:
    if name not in _available():
        pytest.skip(f"{name} is not in timm {timm.__version__}")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _round_trip(name: str, shape: str, pairing: dict | None = None, **kwargs) -> None:
    """``pairing``: ``norms``/``through`` for find_conv_norm_pairs and add_branches (default: theirs)."""
    pairing = pairing or {}
    fallbacks = WIDE_FALLBACK_MODELS if pairing == WIDEST else FALLBACK_MODELS
    gen = torch.Generator().manual_seed(0)
    model = randomise_batchnorm(_create(name, **kwargs).double().eval(), gen)
    x = torch.randn(2, 3, *INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE), dtype=torch.float64, generator=gen)
    before = snapshot(model)
    with torch.no_grad():
        original = model(x)

    with pairing_warnings(name in fallbacks, name):
        pairs = find_conv_norm_pairs(model, example_input=x, **pairing)
        assert pairs, f"{name}: no conv -> norm pair found"
        add_branches(model, shape=shape, example_input=x, **pairing)
    assert sum(1 for _ in iter_branches(model)) == len(pairs)  # one branch per paired conv, whatever its tensors
    with torch.no_grad():
        branched = model(x)
    assert max_rel_err(branched, original) <= ADD_TOL

    perturb_branches(model, gen, std=1e-3)
    with torch.no_grad():
        perturbed = model(x)
    assert torch.isfinite(perturbed).all(), f"{name}: non-finite output with perturbed branches"
    assert max_rel_err(perturbed, original) > 0, f"{name}: the branches do not change the output"

    model.train()
    for module in model.modules():  # the "frozen" policy, on every norm kind that was selected
        if norm_kind(module) in pairing.get("norms", ("batch",)):
            assert not module.training and not any(p.requires_grad for p in module.parameters(recurse=False))
    model.eval()
    merge_branches(model)
    with torch.no_grad():
        merged = model(x)
    assert max_rel_err(merged, perturbed) <= MERGE_TOL
    assert_restored(before, snapshot(model), name)


def _fast_cases():
    for case_id, (name, kwargs) in FAST_MODELS.items():
        for shape in BRANCH_SHAPES:
            yield pytest.param(name, kwargs, shape, id=f"{case_id}-{shape}")


@pytest.mark.parametrize("name, kwargs, shape", list(_fast_cases()))
def test_round_trip_fast(name, kwargs, shape):
    _round_trip(name, shape, **kwargs)


def _sweep_cases():
    families = {name: family for family, name in {**FAMILY_MODELS, **WIDENED_FAMILY_MODELS}.items()}
    names = [*families, *(name for name in SPECIAL_MODELS if name not in families)]
    for i, name in enumerate(names):
        shape = BRANCH_SHAPES[i % len(BRANCH_SHAPES)]
        case_id = f"{families.get(name, 'special')}-{name}-{shape}"
        yield pytest.param(name, shape, SWEEP_KWARGS.get(name, {}), id=case_id, marks=pytest.mark.slow)


@pytest.mark.parametrize("name, shape, kwargs", list(_sweep_cases()))
def test_round_trip_sweep(name, shape, kwargs):
    """Every family of docs/COVERAGE.md that can be branched, with the widest settings."""
    _round_trip(name, shape, WIDEST, **kwargs)


def _widened_cases():
    for case_id, (name, pairing, slow) in WIDENED_MODELS.items():
        yield pytest.param(name, pairing, id=case_id, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("name, pairing", list(_widened_cases()))
def test_round_trip_widened(name, pairing):
    """LayerNorm/GroupNorm CNNs and separable chains, branched with wider norms/through."""
    _round_trip(name, "cross", pairing)
    with torch.device("meta"):
        model = _create(name)
    assert len(find_conv_norm_pairs(model)) < len(find_conv_norm_pairs(model, **pairing))


@pytest.mark.parametrize("name", NO_BATCHNORM_EXAMPLES)
def test_no_batchnorm_model_is_refused(name):
    model = _create(name)
    with pytest.raises(NoBatchNormError, match="BatchNorm"):
        add_branches(model)


def _first_on_meta(family: str) -> torch.nn.Module:
    """The family's first model on the ``meta`` device: no memory, no init cost; only the module tree
    and its graph matter."""
    names = timm.list_models(module=family)
    if not names:
        pytest.skip(f"family {family} is not in timm {timm.__version__}")
    with torch.device("meta"):
        return timm.create_model(names[0], pretrained=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", NO_BATCHNORM_FAMILIES)
def test_no_batchnorm_family_is_refused(family):
    model = _first_on_meta(family)
    assert not any(is_batchnorm(m) for m in model.modules())
    with pytest.raises(NoBatchNormError, match="BatchNorm"):
        add_branches(model)


@pytest.mark.slow
@pytest.mark.parametrize("family", UNBRANCHABLE_FAMILIES)
def test_unbranchable_family_is_refused(family):
    """docs/COVERAGE.md's families that cannot be branched: add_branches refuses even with the widest settings."""
    model = _first_on_meta(family)
    x = torch.empty(2, 3, *model.pretrained_cfg["input_size"][1:], device="meta")  # for a pairing fallback
    with pytest.raises((NoBatchNormError, ValueError), match="no norm layer|no convolution feeds one"):
        add_branches(model, example_input=x, **WIDEST)


def test_zoo_classifies_every_family():
    """Each family of the installed timm is in exactly one list of tests/zoo.py, and each one without
    a default pair is either branched with wider settings or listed, with its reason, as unbranchable."""
    lists = [set(FAMILY_MODELS), set(NO_PAIR_FAMILIES), set(NO_BATCHNORM_FAMILIES)]
    assert not (lists[0] & lists[1] or lists[0] & lists[2] or lists[1] & lists[2])
    assert not set(WIDENED_FAMILY_MODELS) & set(UNBRANCHABLE_FAMILIES)
    assert {*WIDENED_FAMILY_MODELS, *UNBRANCHABLE_FAMILIES} == lists[1] | lists[2]
    unknown = sorted(set(timm.list_modules()) - set().union(*lists))
    assert not unknown, (
        f"timm {timm.__version__} has families tests/zoo.py does not know: {unknown}; "
        "rerun `python scripts/coverage.py --select` and update tests/zoo.py"
    )
    assert set(FALLBACK_MODELS) <= {*FAMILY_MODELS.values(), *SPECIAL_MODELS, *(name for name, _ in FAST_MODELS.values())}
    assert set(WIDE_FALLBACK_MODELS) <= {*FAMILY_MODELS.values(), *WIDENED_FAMILY_MODELS.values(), *SPECIAL_MODELS}
