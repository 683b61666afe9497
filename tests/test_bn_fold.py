"""Folding a frozen BatchNorm into its branched conv: same step up to rounding, merges untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import timm_branch
from timm_branch import bn_fold
from timm_branch.pairs import find_conv_norm_pairs

from conftest import make_model, max_rel_err, perturb_branches

# Post-activation ResNet (nn.BatchNorm2d), BatchNormAct2d with an activation (EfficientNet),
# DenseNet (folds inside its layers, none at a transition, whose conv feeds a pool).
_MODELS = ["resnet18", "efficientnet_b0", "densenet121"]


def _unfolded(model: nn.Module) -> nn.Module:
    """A deep copy of a branched ``model`` with every fold undone (the reference step)."""
    copied = copy.deepcopy(model)
    for module in list(copied.modules()):
        if bn_fold.is_folded(module):
            bn_fold.unfold(module)
    return copied


def _branched(name: str, shape: str = "cross", **kwargs) -> nn.Module:
    model = timm_branch.add_branches(make_model(name), shape=shape, **kwargs).train()
    perturb_branches(model, std=1e-2)
    return model


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(x)
    return out, list(torch.autograd.grad(out.pow(2).sum(), list(timm_branch.branch_parameters(model))))


@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
@pytest.mark.parametrize("name", _MODELS)
def test_a_folded_step_equals_the_unfolded_one_in_float64(name, shape, image, one_thread):
    model = _branched(name, shape)
    reference = _unfolded(model)
    folded = [m for m in model.modules() if bn_fold.is_folded(m)]
    assert folded and not any(bn_fold.is_folded(m) for m in reference.modules())
    out, grads = _step(model, image)
    expected_out, expected = _step(reference, image)
    assert max_rel_err(out, expected_out) < 1e-12
    for got, want in zip(grads, expected, strict=True):
        assert max_rel_err(got, want) < 1e-12


@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
def test_a_folded_channels_last_step_keeps_the_layout_and_the_values(shape, image):
    model = _branched("resnet18", shape).to(memory_format=torch.channels_last)
    reference = _unfolded(model)
    x = image.contiguous(memory_format=torch.channels_last)
    out, grads = _step(model, x)
    expected_out, expected = _step(reference, x)
    assert max_rel_err(out, expected_out) < 1e-12
    for got, want in zip(grads, expected, strict=True):
        assert max_rel_err(got, want) < 1e-12


def test_exactly_the_direct_pairs_fold(one_thread):
    model = make_model("densenet121")
    pairs = find_conv_norm_pairs(model)
    timm_branch.add_branches(model)
    folded = {name for name, m in model.named_modules() if bn_fold.is_folded(m)}
    assert folded == {pair.norms[0] for pair in pairs if pair.direct}
    # A transition's conv feeds the next block's layers through a pool and concatenations.
    transition = next(pair for pair in pairs if pair.conv == "features.transition1.conv")
    assert not transition.direct and len(transition.norms) > 1


@pytest.mark.parametrize("bn", ["affine", "train"])
def test_only_the_frozen_policy_folds(bn, resnet18):
    timm_branch.add_branches(resnet18, bn=bn)
    assert not any(bn_fold.is_folded(m) for m in resnet18.modules())


def test_without_gradients_or_a_trainable_branch_both_modules_run_their_own_forwards(image):
    model = _branched("resnet18")
    reference = _unfolded(model)
    with torch.no_grad():  # evaluation: bit for bit the unfolded model
        assert torch.equal(model(image), reference(image))
    # A frozen kernel without a trainable branch: the parametrized forward, so no fold either.
    for param in timm_branch.branch_parameters(model):
        param.requires_grad_(False)
    for param in timm_branch.branch_parameters(reference):
        param.requires_grad_(False)
    x = image.clone().requires_grad_(True)
    assert torch.equal(model(x), reference(x))


def test_a_norm_switched_to_train_mode_stops_folding(image):
    model = _branched("resnet18")
    reference = _unfolded(model)
    for module in (model.bn1, reference.bn1):
        nn.Module.train(module, True)  # past the frozen policy's pin
    out, expected = model(image), reference(image)
    assert max_rel_err(out, expected) < 1e-12
    assert not model.get_submodule("bn1")._fold.active()


def test_merging_a_folded_model_gives_the_stock_model_bit_for_bit(image):
    model = _branched("resnet18")
    reference = _unfolded(model)
    _step(model, image)  # a folded step leaves nothing behind
    timm_branch.merge_branches(model)
    timm_branch.merge_branches(reference)
    assert all(not type(m).__name__.startswith("Folded") and "_fold" not in m.__dict__ for m in model.modules())
    assert type(model.bn1) is nn.BatchNorm2d
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_a_deep_copy_folds_its_own_modules():
    model = _branched("resnet18")
    copied = copy.deepcopy(model)
    shared = copied.bn1._fold
    assert shared is copied.conv1._fold and shared.norm is copied.bn1 and shared.conv is copied.conv1
    assert shared is not model.bn1._fold


def test_fold_refuses_a_norm_it_cannot_reproduce():
    model = _branched("resnet18")
    with pytest.raises(ValueError, match="cannot fold"):
        bn_fold.fold(model.conv1, model.bn1)  # already folded
    with pytest.raises(ValueError, match="cannot fold"):
        bn_fold.fold(model.conv1, nn.GroupNorm(1, 64))


def test_a_norm_whose_conv_was_merged_alone_runs_its_own_forward(image):
    """``merge_branch`` on one conv (not ``merge_branches``): its folded layer must stop folding."""
    from timm_branch.branch import merge_branch

    model = _branched("resnet18")
    reference = _unfolded(model)
    merge_branch(model.conv1)
    merge_branch(reference.conv1)
    assert not model.bn1._fold.active()
    assert max_rel_err(model(image), reference(image)) < 1e-12


def test_a_norm_that_changes_class_in_place_stops_folding_on_both_sides(image):
    """A folded layer turned into a SyncBatchNorm in place runs its own forward: the conv must
    not fold it too (the layer would normalise twice)."""
    model = _branched("resnet18")
    reference = _unfolded(model)
    folded_class = type(model.bn1)
    model.bn1.__class__ = nn.SyncBatchNorm
    assert not model.bn1._fold.active()
    assert max_rel_err(model(image), reference(image)) < 1e-12
    model.bn1.__class__ = folded_class
    assert model.bn1._fold.active()
