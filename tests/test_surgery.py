"""add_branches / merge_branches on real timm models: exactness, freezing, restoring, checkpoints."""
from __future__ import annotations

import copy

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import timm_branch as tb
from timm_branch.bn import is_batchnorm

from conftest import make_model, max_rel_err, perturb_branches


def _snapshot(model: nn.Module) -> dict:
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "keys": [(k, v.shape, v.dtype, v.device) for k, v in model.state_dict().items()],
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def _sgd_steps(model: nn.Module, params, steps: int = 3) -> None:
    opt = torch.optim.SGD(params, lr=0.1)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("shape", ["1x1", "cross", "full", "cross-pair"])
def test_exact_at_insertion_and_after_merge_float64(resnet18, image, shape):
    original = resnet18(image)
    before = _snapshot(resnet18)
    tb.add_branches(resnet18, shape=shape)
    assert max_rel_err(resnet18(image), original) <= 1e-12
    perturb_branches(resnet18)
    branched = resnet18(image)
    assert max_rel_err(branched, original) > 1e-6  # the branches do change the function
    tb.merge_branches(resnet18)
    assert max_rel_err(resnet18(image), branched) <= 1e-10
    assert _snapshot(resnet18) == before


def test_exact_in_float32():
    model = make_model("resnet18", dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    tb.add_branches(model, shape="full")
    perturb_branches(model, std=1e-2)
    branched = model(x)
    tb.merge_branches(model)
    assert max_rel_err(model(x), branched) <= 1e-5


def test_dilated_and_strided_stems_merge_exactly(image):
    # output_stride=8 dilates the later stages; resnet18d has a deep stem of strided 3x3 convs
    for name, kwargs in (("resnet18", {"output_stride": 8}), ("resnet18d", {})):
        model = make_model(name, **kwargs)
        tb.add_branches(model, shape="cross")
        perturb_branches(model)
        branched = model(image)
        tb.merge_branches(model)
        assert max_rel_err(model(image), branched) <= 1e-10


def test_frozen_bn_buffers_bit_identical_and_only_branches_get_gradients(resnet18):
    tb.add_branches(resnet18)
    resnet18.train()
    buffers = {k: v.clone() for k, v in resnet18.named_buffers()}
    branches = list(tb.branch_parameters(resnet18))
    assert len(branches) == 20 and all(b.requires_grad for b in branches)
    _sgd_steps(resnet18, branches)
    assert all(torch.equal(buffers[k], v) for k, v in resnet18.named_buffers())
    with_grad = {id(p) for p in resnet18.parameters() if p.grad is not None}
    assert with_grad == {id(b) for b in branches}
    assert all(not m.training for m in resnet18.modules() if is_batchnorm(m))


def test_affine_policy_updates_statistics_but_not_affine(resnet18):
    tb.add_branches(resnet18, bn="affine")
    resnet18.train()
    weights = resnet18.bn1.weight.clone()
    running = resnet18.bn1.running_mean.clone()
    _sgd_steps(resnet18, tb.branch_parameters(resnet18), steps=1)
    assert not torch.equal(resnet18.bn1.running_mean, running)
    assert torch.equal(resnet18.bn1.weight, weights) and resnet18.bn1.weight.grad is None


def test_train_policy_trains_bn_affine(resnet18):
    tb.add_branches(resnet18, bn="train")
    bn_params = [p for m in resnet18.modules() if is_batchnorm(m) for p in m.parameters()]
    assert all(p.requires_grad for p in bn_params)
    tb.merge_branches(resnet18)
    assert all(p.requires_grad for p in bn_params)  # as before add_branches


def test_train_unpaired_leaves_the_head_trainable(resnet18):
    tb.add_branches(resnet18)
    assert not resnet18.fc.weight.requires_grad
    tb.merge_branches(resnet18)
    tb.add_branches(resnet18, train_unpaired=True)
    assert resnet18.fc.weight.requires_grad and not resnet18.conv1.parametrizations.weight.original.requires_grad


def test_merge_restores_user_flags_and_bn_follows_the_model_mode(resnet18):
    resnet18.layer1[0].conv1.weight.requires_grad_(False)  # the user froze it before
    before = _snapshot(resnet18)
    resnet18.train()
    tb.add_branches(resnet18)
    tb.merge_branches(resnet18)
    assert _snapshot(resnet18) == before
    assert resnet18.bn1.training
    resnet18.eval()
    resnet18.train()
    assert resnet18.bn1.training  # no longer pinned


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (r"layer1\..*", None, 4),
        (["conv1"], None, 9),  # suffix match: conv1 and every block's conv1
        (None, r".*downsample.*", 17),
        (["layer4.1.conv2"], None, 1),
    ],
)
def test_include_exclude(resnet18, include, exclude, expected):
    tb.add_branches(resnet18, include=include, exclude=exclude)
    assert len(list(tb.branch_parameters(resnet18))) == expected


def test_selection_that_leaves_nothing_is_an_error(resnet18):
    with pytest.raises(ValueError, match="no conv selected: 20 convs feed a norm layer"):
        tb.add_branches(resnet18, include="nothing.*")
    assert next(tb.branch_parameters(resnet18), None) is None


@pytest.mark.parametrize("kwargs, match", [({"shape": "3x3"}, "unknown branch shape"), ({"bn": "eval"}, "unknown BatchNorm policy")])
def test_bad_arguments_change_nothing(resnet18, kwargs, match):
    before = _snapshot(resnet18)
    with pytest.raises(ValueError, match=match):
        tb.add_branches(resnet18, **kwargs)
    assert _snapshot(resnet18) == before


def test_add_twice_and_merge_without_branches_are_refused(resnet18):
    with pytest.raises(ValueError, match="no branches to merge"):
        tb.merge_branches(resnet18)
    tb.add_branches(resnet18)
    with pytest.raises(ValueError, match="already has branches; call merge_branches"):
        tb.add_branches(resnet18)


def test_non_finite_branch_refused_before_anything_changes(resnet18, image):
    tb.add_branches(resnet18)
    perturb_branches(resnet18)
    with torch.no_grad():
        resnet18.layer2[1].conv1.parametrizations.weight[0].branch[0, 0, 0] = float("nan")
    state = {k: v.clone() for k, v in resnet18.state_dict().items()}
    with pytest.raises(ValueError, match=r"NaN or Inf.*layer2\.1\.conv1"):
        tb.merge_branches(resnet18)
    after = resnet18.state_dict()
    assert list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state if "layer2.1.conv1" not in k)


def test_continual_tasks_add_train_merge_repeatedly(resnet18, image):
    before = _snapshot(resnet18)
    for task, shape in enumerate(["cross", "1x1", "full"]):
        tb.add_branches(resnet18, shape=shape)
        resnet18.train()
        _sgd_steps(resnet18, tb.branch_parameters(resnet18), steps=1)
        resnet18.eval()
        branched = resnet18(image)
        tb.merge_branches(resnet18)
        assert max_rel_err(resnet18(image), branched) <= 1e-10
    assert _snapshot(resnet18) == before
    assert [h["shape"] for h in tb.branch_history(resnet18)] == ["cross", "1x1", "full"]
    assert tb.branch_history(resnet18)[0]["branches"] == 20


def test_branch_checkpoint_round_trip_through_safetensors(resnet18, image, tmp_path):
    tb.add_branches(resnet18, shape="1x1")
    perturb_branches(resnet18)
    expected = resnet18(image)
    path = tmp_path / "branches.safetensors"
    safetensors.torch.save_file(tb.branch_state_dict(resnet18), path)
    assert path.stat().st_size < 0.15 * sum(p.numel() * 8 for p in resnet18.parameters())

    fresh = make_model("resnet18")
    tb.add_branches(fresh, shape="1x1")
    tb.load_branch_state_dict(fresh, safetensors.torch.load_file(path))
    assert torch.equal(fresh(image), expected)


def test_branch_checkpoint_mismatches_are_named(resnet18, tmp_path):
    tb.add_branches(resnet18, shape="cross")
    state = tb.branch_state_dict(resnet18)
    other_shape = make_model("resnet18")
    tb.add_branches(other_shape, shape="full")
    with pytest.raises(ValueError, match=r"shapes differ.*conv1: checkpoint \(64, 3, 13\) vs model \(64, 3, 49\).*branch shape is .full."):
        tb.load_branch_state_dict(other_shape, state)
    other_model = make_model("resnet34")
    tb.add_branches(other_model, shape="cross")
    with pytest.raises(ValueError, match="missing .* unexpected|another model"):
        tb.load_branch_state_dict(other_model, state)
    with pytest.raises(ValueError, match="no branches"):
        tb.load_branch_state_dict(make_model("resnet18"), state)


def test_deepcopy_of_a_branched_model_is_independent(resnet18, image):
    tb.add_branches(resnet18)
    twin = copy.deepcopy(resnet18)  # momentum encoders and frozen teachers are deep copies
    perturb_branches(twin)
    assert not torch.equal(twin(image), resnet18(image))
    twin.train()
    assert not twin.bn1.training
    expected = resnet18(image)
    tb.merge_branches(twin)  # merging the copy must leave the original's branches working
    assert torch.equal(resnet18(image), expected)
    tb.merge_branches(resnet18)
    assert type(resnet18.conv1) is type(twin.conv1) is nn.Conv2d


def test_model_without_batchnorm_is_refused_with_the_reason():
    model = timm.create_model("convnext_atto", pretrained=False)
    with pytest.raises(tb.NoBatchNormError, match="convnext_atto has no BatchNorm layer .*LayerNorm.*Branch-tuning"):
        tb.add_branches(model)


def test_branches_added_on_a_submodule_merge_from_the_wrapper(image):
    wrapper = nn.Sequential(make_model("resnet18", num_classes=0), nn.Linear(512, 8).double())
    before = _snapshot(wrapper)
    tb.add_branches(wrapper[0])
    assert wrapper[1].weight.requires_grad  # outside the branched module: untouched
    perturb_branches(wrapper)
    branched = wrapper(image)
    tb.merge_branches(wrapper)
    assert max_rel_err(wrapper(image), branched) <= 1e-10 and _snapshot(wrapper) == before
    assert len(tb.branch_history(wrapper[0])) == 1


@pytest.mark.parametrize("shape", ["cross", "cross-pair"])
def test_a_branched_model_pickles_and_loads_as_it_was(shape, resnet18, image):
    """torch.save(model) while branches are attached (parametrize alone refuses it): the loaded
    model computes the same, trains its own branches, and merges into the stock model."""
    import io

    model = tb.add_branches(resnet18, shape=shape).train()
    perturb_branches(model, std=1e-2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.bn1._fold.conv is loaded.conv1  # the fold's shared state is the loaded pair's
    loaded.train()
    assert not loaded.bn1.training  # still pinned by the frozen policy
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))
    grads = [torch.autograd.grad(m(image).pow(2).sum(), list(tb.branch_parameters(m))) for m in (model, loaded)]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    tb.merge_branches(model)
    tb.merge_branches(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert type(loaded.conv1) is nn.Conv2d and type(loaded.bn1) is nn.BatchNorm2d
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
