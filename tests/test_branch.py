"""The weight-space branch: tap sets, exactness through every timm conv class, merge arithmetic."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import CondConv2d, Conv2dSame, MixedConv2d, ScaledStdConv2d, StdConv2d
from torch import nn

from timm_branch.branch import ConvBranch, attach_branch, get_branch, merge_branch, tap_indices

from conftest import max_rel_err


@pytest.mark.parametrize(
    "kernel, shape, expected",
    [
        ((3, 3), "1x1", [4]),
        ((3, 3), "cross", [1, 3, 4, 5, 7]),
        ((5, 5), "cross", [2, 7, 10, 11, 12, 13, 14, 17, 22]),
        ((4, 4), "1x1", [5]),  # even kernel: first of the two middle taps, (1, 1)
        ((4, 4), "cross", [1, 4, 5, 6, 7, 9, 13]),
        ((1, 1), "1x1", [0]),
        ((1, 1), "cross", [0]),
        ((1, 7), "cross", list(range(7))),  # a 1 x k kernel: cross is every tap
        ((3, 3, 3), "cross", [4, 10, 12, 13, 14, 16, 22]),
    ],
)
def test_tap_indices(kernel, shape, expected):
    assert tap_indices(kernel, shape).tolist() == expected


def test_full_shape_has_no_index_and_unknown_shape_is_named():
    assert tap_indices((3, 3), "full") is None
    with pytest.raises(ValueError, match="unknown branch shape 'diag'.*1x1, cross, full"):
        tap_indices((3, 3), "diag")


@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
def test_delta_is_zero_off_the_taps(shape):
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    branch = ConvBranch(weight, (3, 3), shape)
    with torch.no_grad():
        branch.branch.normal_()
    delta = branch.delta().view(4, 2, 3, 3)
    on = torch.zeros(9, dtype=torch.bool)
    taps = tap_indices((3, 3), shape)
    on[taps if taps is not None else slice(None)] = True
    assert (delta.flatten(2)[..., ~on] == 0).all()
    assert (delta.flatten(2)[..., on] != 0).all()
    assert torch.equal(branch(weight), weight + delta)


def _convs():
    torch.manual_seed(0)
    return {
        "plain": nn.Conv2d(4, 6, 3, padding=1),
        "strided": nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        "dilated": nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False),
        "grouped": nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False),
        "depthwise": nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False),
        "even": nn.Conv2d(4, 6, 4, stride=2, padding=1, bias=False),
        "reflect": nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False),
        "same": Conv2dSame(4, 6, 3, stride=2, bias=False),
        "same-even": Conv2dSame(4, 6, 4, stride=2, bias=False),
        "std": StdConv2d(4, 6, 3, padding=1, bias=False),
        "scaled-std": ScaledStdConv2d(4, 6, 3, padding=1, bias=False),
        "conv1d": nn.Conv1d(4, 6, 3, padding=1, bias=False),
        "conv3d": nn.Conv3d(4, 6, 3, padding=1, bias=False),
    }


def _input_for(conv: nn.Module) -> torch.Tensor:
    spatial = {nn.Conv1d: (9,), nn.Conv3d: (5, 6, 7)}.get(type(conv), (9, 10))
    return torch.randn(3, 4, *spatial, dtype=torch.float64)


@pytest.mark.parametrize("kind", sorted(_convs()))
@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
def test_branched_conv_is_its_own_forward_with_w_plus_delta(kind, shape):
    conv = _convs()[kind].double()
    x = _input_for(conv)
    before = conv(x)
    reference = _convs()[kind].double()  # same seed: same weights
    branch = attach_branch(conv, shape)
    assert torch.equal(conv(x), before)  # W + 0 is exact
    with torch.no_grad():
        branch.branch.normal_(0, 0.1)
        reference.weight.add_(branch.delta().view_as(reference.weight))
    assert max_rel_err(conv(x), reference(x)) <= 1e-12
    branched = conv(x)
    merge_branch(conv)
    assert type(conv) is type(reference)
    assert max_rel_err(conv(x), branched) <= 1e-10


def test_branch_gradient_is_the_weight_gradient_at_the_taps():
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False).double()
    reference = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False).double()
    reference.load_state_dict(conv.state_dict())
    conv.weight.requires_grad_(False)
    branch = attach_branch(conv, "cross")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    conv(x).square().sum().backward()
    reference(x).square().sum().backward()
    taps = tap_indices((3, 3), "cross")
    assert torch.allclose(branch.branch.grad, reference.weight.grad.flatten(2)[..., taps], rtol=1e-12, atol=0)
    assert conv.parametrizations.weight.original.grad is None


def test_cond_conv_expert_weights():
    torch.manual_seed(0)
    conv = CondConv2d(4, 6, 3, padding=1, num_experts=3).double()
    reference = CondConv2d(4, 6, 3, padding=1, num_experts=3).double()
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    routing = torch.rand(2, 3, dtype=torch.float64)
    branch = attach_branch(conv, "cross")
    assert branch.branch.shape == (3, 6 * 4, 5)  # (experts, out * in, taps)
    with torch.no_grad():
        branch.branch.normal_(0, 0.1)
        reference.weight.add_(branch.delta().view_as(reference.weight))
    assert max_rel_err(conv(x, routing), reference(x, routing)) <= 1e-12
    branched = conv(x, routing)
    merge_branch(conv)
    assert type(conv) is CondConv2d and max_rel_err(conv(x, routing), branched) <= 1e-10


def test_mixed_conv_children_branch_independently():
    torch.manual_seed(0)
    mixed = MixedConv2d(6, 6, kernel_size=[3, 5, 7], depthwise=True).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    before = mixed(x)
    branches = [attach_branch(child, "cross") for child in mixed.values()]
    assert [b.branch.shape[-1] for b in branches] == [5, 9, 13]
    assert torch.equal(mixed(x), before)
    for b in branches:
        with torch.no_grad():
            b.branch.normal_(0, 0.1)
    branched = mixed(x)
    for child in mixed.values():
        merge_branch(child)
    assert max_rel_err(mixed(x), branched) <= 1e-10


def test_merge_keeps_parameter_identity_layout_and_flag():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    weight = conv.weight
    strides = weight.stride()
    weight.requires_grad_(False)
    branch = attach_branch(conv, "full")
    with torch.no_grad():
        branch.branch.fill_(0.5)
    effective = conv.weight.detach().clone()
    merge_branch(conv)
    assert conv.weight is weight and weight.stride() == strides and not weight.requires_grad
    assert torch.equal(conv.weight, effective)
    assert list(conv.state_dict()) == ["weight"] and get_branch(conv) is None



@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_the_effective_weight_keeps_the_kernels_layout(shape, memory_format):
    """A kernel in another layout than the conv's input is copied by the convolution (cuDNN,
    oneDNN) at every forward and backward: W + delta must be laid out as W."""
    conv = nn.Conv2d(4, 6, 3, padding=1).to(memory_format=memory_format)
    attach_branch(conv, shape)
    assert conv.weight.is_contiguous(memory_format=memory_format)

def test_merge_keeps_the_parameter_order_of_a_conv_with_bias():
    conv = nn.Conv2d(3, 4, 3, bias=True)
    attach_branch(conv)
    merge_branch(conv)
    assert list(conv.state_dict()) == ["weight", "bias"] and [p.shape[0] for p in conv.parameters()] == [4, 4]
    assert conv.weight.dim() == 4


def test_attach_twice_and_merge_without_branch_are_refused():
    conv = nn.Conv2d(2, 2, 3)
    attach_branch(conv)
    with pytest.raises(ValueError, match="already has a branch"):
        attach_branch(conv)
    merge_branch(conv)
    with pytest.raises(ValueError, match="no branch to merge"):
        merge_branch(conv)


@pytest.mark.parametrize("shape", ["1x1", "cross", "full"])
def test_branch_state_lives_on_the_weights_device(shape):
    """Attached to a conv already on an accelerator, the tap index must follow it (a CPU index
    broke every branched forward on CUDA). The meta device stands in for CUDA here."""
    conv = nn.Conv2d(4, 6, 3, padding=1, device="meta")
    attach_branch(conv, shape)
    branch = get_branch(conv)
    assert {t.device.type for t in (*branch.parameters(), *branch.buffers())} == {"meta"}
    assert conv.weight.device.type == "meta"  # W + delta computed on the device


def test_cross_pair_has_one_tensor_per_axis_and_sums_them_on_the_centre():
    """The authors' ``k x 1 + 1 x k`` pair: two tensors, the cross's taps, the centre in both."""
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    branch = ConvBranch(weight, (3, 3), "cross-pair")
    assert [(n, tuple(p.shape)) for n, p in branch.named_parameters()] == [("line_0", (4, 2, 3)), ("line_1", (4, 2, 3))]
    with torch.no_grad():
        branch.line_0.normal_()
        branch.line_1.normal_()
    delta = branch.delta().view(4, 2, 3, 3)
    expected = torch.zeros_like(delta)
    expected[..., :, 1] += branch.line_0  # the column through the centre (along the first kernel axis)
    expected[..., 1, :] += branch.line_1  # the row through the centre
    assert torch.equal(delta, expected)
    assert torch.equal(branch(weight), weight + delta)
    assert tap_indices((3, 3), "cross-pair").tolist() == tap_indices((3, 3), "cross").tolist()


def test_cross_pair_merges_exactly_and_every_line_gets_the_taps_gradient():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double().requires_grad_(False)
    reference = copy.deepcopy(conv)
    branch = attach_branch(conv, "cross-pair")
    with torch.no_grad():
        branch.line_0.normal_(0, 0.1)
        branch.line_1.normal_(0, 0.1)
        reference.weight += branch.delta().view_as(reference.weight)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    out = conv(x)
    assert torch.equal(out, nn.functional.conv2d(x, conv.weight, padding=1))
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad)
    reference.requires_grad_(True)(x).backward(grad)
    w_grad = reference.weight.grad
    assert max_rel_err(branch.line_0.grad, w_grad[..., :, 1]) < 1e-12
    assert max_rel_err(branch.line_1.grad, w_grad[..., 1, :]) < 1e-12
    merge_branch(conv)
    assert max_rel_err(conv(x), out) == 0
