"""The tap-only backward: exact gradients for every plain conv geometry, and when it is used."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import CondConv2d, Conv2dSame, ScaledStdConv2d, StdConv2d
from torch import nn

from timm_branch.branch import _branched_forward, attach_branch, get_branch, tap_indices
from timm_branch import branch_conv
from timm_branch.branch_conv import tap_boxes

from conftest import max_rel_err
from test_branch import _convs


@pytest.mark.parametrize("kernel, shape", [((3, 3), "1x1"), ((3, 3), "cross"), ((5, 5), "cross"), ((4, 4), "cross"),
                                           ((3, 5), "cross"), ((3, 3, 3), "cross"), ((7,), "1x1")])
def test_boxes_hold_exactly_the_taps_in_order(kernel, shape):
    taps = tap_indices(kernel, shape)
    boxes, runs = tap_boxes(kernel, taps)
    strides = [1] * len(kernel)
    for axis in range(len(kernel) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * kernel[axis + 1]
    flat = [[sum(t * s for t, s in zip(tap, strides)) for tap in box.taps()] for box in boxes]
    assert [f for b, i, j in runs for f in flat[b][i:j]] == taps.tolist()
    assert len(boxes) == (1 if shape == "1x1" else len(kernel))


def test_boxes_refuse_taps_that_are_not_a_centre_cross():
    with pytest.raises(ValueError, match=r"taps \[0, 4\] of a \(3, 3\) kernel are neither a centre tap nor a centre cross"):
        tap_boxes((3, 3), torch.tensor([0, 4]))


def _geometries():
    shared = _convs()  # the branch tests' plain geometries, plus the cases of the tap arithmetic
    return {
        **{name: shared[name] for name in ("plain", "strided", "dilated", "grouped", "depthwise")},
        "even": nn.Conv2d(4, 6, 4, padding=1),
        "unpadded": nn.Conv2d(4, 6, 3),
        "5x5/2": nn.Conv2d(4, 6, 5, stride=2, padding=2),
        "tf-same/2": Conv2dSame(4, 6, 3, stride=2),
        "tf-same-even": Conv2dSame(4, 6, 4),
        "padding='same'": nn.Conv2d(4, 6, 3, padding="same"),
        "1x7": nn.Conv2d(4, 6, (1, 7), padding=(0, 3)),
        "pointwise": nn.Conv2d(4, 6, 1),
        "conv1d": nn.Conv1d(4, 6, 5, padding=2),
        "conv3d": nn.Conv3d(4, 6, 3, padding=1),
    }


# Inputs the conv accepts: 9 px, and tiny ones where taps read padding only (1 px maps at 32 px
# input are common in timm CNNs); the input is one pixel taller than wide (odd and even sizes).
_SMALLEST = {"unpadded": 3, "even": 2}
_CASES = [(name, size) for name in _geometries() for size in (9, 2, 1) if size >= _SMALLEST.get(name, 1)]


# How the taps' gradient is computed: the device's rule (on the CPU, gathered GEMMs for ungrouped
# convs except for a whole kernel on larger maps), or one implementation forced for every case.
# CUDA takes the convolutions, which CPU-only test runs must cover as well.
_TAP_GRAD_PATHS = {"device-rule": None, "gathered": True, "convolution": False}


@pytest.fixture(params=list(_TAP_GRAD_PATHS))
def tap_grad_path(request, monkeypatch):
    forced = _TAP_GRAD_PATHS[request.param]
    if forced is not None:
        monkeypatch.setattr(branch_conv, "_gathers", lambda *args: forced)
    return request.param


@pytest.mark.parametrize("name, size", _CASES, ids=[f"{n}-{s}px" for n, s in _CASES])
@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
def test_gradients_equal_autograd_in_float64(name, shape, size, tap_grad_path):
    fast = _geometries()[name].double().requires_grad_(False)
    branch = attach_branch(fast, shape)
    assert type(fast).forward is _branched_forward
    with torch.no_grad():
        branch.branch.normal_(generator=torch.Generator().manual_seed(1))
    spatial = [size + 1] + [size] * (fast.weight.dim() - 3)
    x = torch.randn(3, fast.in_channels, *spatial, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = [branch.branch] + ([fast.bias.requires_grad_(True)] if fast.bias is not None else [])
    x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = fast(x_fast)
    reference_out = type(fast).__bases__[0].forward(fast, x_ref)  # the parametrized (autograd) path
    assert torch.equal(out, reference_out)
    assert out.grad_fn.name().startswith("BranchedConv")
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, [x_fast, *params], grad)
    expected = torch.autograd.grad(reference_out, [x_ref, *params], grad)
    for g, e in zip(got, expected):
        assert max_rel_err(g, e) < 1e-12



@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("make", [lambda: nn.Conv2d(16, 32, 3, padding=1), lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                  lambda: nn.Conv2d(16, 32, 5, padding=2, groups=4)], ids=["plain", "strided", "grouped"])
def test_float32_kernels_give_the_float64_gradients(make, memory_format, tap_grad_path):
    """float32 runs other CPU kernels (oneDNN) than float64: the tap gradients, whose sub-kernels
    are only shaped like the kernel, must still be float64's up to float32 rounding."""
    conv = make().requires_grad_(False)
    branch = attach_branch(conv, "cross")
    with torch.no_grad():
        branch.branch.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(16, 16, 12, 11, generator=torch.Generator().manual_seed(2))
    grads = []
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(conv).to(dtype)
        xi = x.to(dtype).contiguous(memory_format=memory_format).requires_grad_(True)
        delta = get_branch(model).branch
        grads.append(torch.autograd.grad(model(xi).pow(2).sum(), [xi, delta]))
    for g, e in zip(*grads):
        assert max_rel_err(g.double(), e) < 1e-5

def test_a_frozen_first_conv_gets_no_input_gradient_computed():
    conv = nn.Conv2d(3, 4, 3, padding=1).double().requires_grad_(False)
    branch = attach_branch(conv, "cross")
    out = conv(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    out.sum().backward()
    assert branch.branch.grad is not None and conv.parametrizations.weight.original.grad is None


@pytest.mark.parametrize("make", [
    lambda: StdConv2d(4, 6, 3, padding=1),
    lambda: ScaledStdConv2d(4, 6, 3, padding=1),
    lambda: CondConv2d(4, 6, 3, padding=1, num_experts=2),
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 4, padding="same"),  # PyTorch pads the odd pixel after: not symmetric
], ids=["StdConv2d", "ScaledStdConv2d", "CondConv2d", "reflect", "same-even"])
def test_convs_that_transform_their_weight_keep_the_autograd_path(make):
    conv = make()
    attach_branch(conv, "cross")
    assert type(conv).forward is not _branched_forward


def test_autograd_path_when_the_kernel_trains_or_without_grad():
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    attach_branch(conv, "cross")
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    conv.parametrizations.weight.original.requires_grad_(True)  # a user who unfreezes the kernel
    out = conv(x)
    assert not out.grad_fn.name().startswith("BranchedConv")
    out.sum().backward()
    assert conv.parametrizations.weight.original.grad is not None


def test_bf16_autocast_runs_the_convolution_as_autocast_would():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    branch = attach_branch(conv, "cross")
    with torch.no_grad():
        branch.branch.normal_(std=0.1)
    conv.bias.requires_grad_(True)
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    results = []
    for forward in (_branched_forward, type(conv).__bases__[0].forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(conv, x)
        grads = torch.autograd.grad(out.float().pow(2).sum(), [x, branch.branch, conv.bias])
        results.append((out, grads))
    (out, grads), (ref_out, ref_grads) = results
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    for g, e, like in zip(grads, ref_grads, (x, branch.branch, conv.bias)):
        assert g.dtype == like.dtype == torch.float32
        # Both sum bf16 products, in different orders: bf16's 8-bit mantissa bounds the difference.
        assert max_rel_err(g, e) < 2e-2


def test_the_autocast_query_for_cpu_and_cuda_is_one_dynamo_traces(monkeypatch):
    """torch.amp.is_autocast_available is opaque to dynamo before torch 2.13: calling it in the
    branched forward cost a graph break per conv under torch.compile (seen on torch 2.11, H200)."""
    def opaque(device_type):
        raise AssertionError(f"is_autocast_available({device_type!r}) called")

    monkeypatch.setattr(torch.amp, "is_autocast_available", opaque)
    conv = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    attach_branch(conv, "cross")
    x = torch.randn(1, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32


def test_channels_last_input_gives_the_same_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1).double().requires_grad_(False)
    branch = attach_branch(conv, "cross")
    with torch.no_grad():
        branch.branch.normal_()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=memory_format).requires_grad_(True)
        grads.append(torch.autograd.grad(conv(xi).pow(2).sum(), [xi, branch.branch]))
    for g, e in zip(*grads):
        assert max_rel_err(g, e) < 1e-12


def test_deep_copies_share_the_fast_forward_and_merge_exactly():
    from timm_branch.branch import merge_branch

    conv = nn.Conv2d(4, 6, 3, padding=1).double().requires_grad_(False)
    branch = attach_branch(conv, "cross")
    with torch.no_grad():
        branch.branch.normal_()
    twin = copy.deepcopy(conv)
    assert type(twin).forward is _branched_forward and get_branch(twin) is not get_branch(conv)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    out = twin(x)
    merge_branch(twin)
    assert type(twin) is nn.Conv2d
    assert torch.equal(twin(x), out)
    assert type(conv).forward is _branched_forward  # the original is untouched


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)).eval()
    from timm_branch import add_branches, branch_parameters

    add_branches(model, shape="cross")
    for p in branch_parameters(model):
        nn.init.normal_(p, std=0.1)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model)
    out = compiled(x)
    out.pow(2).sum().backward()
    ref = eager(x)
    ref.pow(2).sum().backward()
    assert max_rel_err(out, ref) < 1e-5
    for p, q in zip(branch_parameters(model), branch_parameters(eager)):
        assert max_rel_err(p.grad, q.grad) < 1e-4
