"""EMA update (all parameters, buffers copied, branched pairs) and BYOL's cosine momentum schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from timm_branch import add_branches, branch_parameters
from timm_branch.ssl import cosine_momentum, ema_update


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2),
    ).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
    return model


def test_cosine_momentum_schedule():
    # 1 - (1 - 0.99) * (cos(pi * k / K) + 1) / 2
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)  # cos(pi/2) = 0 -> 0.995
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.sqrt(0.5) + 1) / 2)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(250, 100, 0.99) == pytest.approx(1.0)  # clamped
    assert cosine_momentum(100, 100, 0.99, final=0.999) == pytest.approx(0.999)  # MoCo v2+ end point
    assert cosine_momentum(50, 100, 0.99, final=0.999) == pytest.approx(0.9945)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_momentum(0, 0, 0.99)


def test_ema_update_formula_frozen_parameters_and_buffers():
    online, target = tiny_cnn(0), tiny_cnn(1)
    online[1].weight.requires_grad_(False)  # frozen parameters are averaged too
    params_o = {n: p.clone() for n, p in online.named_parameters()}
    params_t = {n: p.clone() for n, p in target.named_parameters()}
    ema_update(online, target, 0.9)
    for name, p in target.named_parameters():
        assert torch.allclose(p, 0.9 * params_t[name] + 0.1 * params_o[name]), name
    for (name, b), (_, ob) in zip(target.named_buffers(), online.named_buffers()):
        assert torch.equal(b, ob), name  # copied, not averaged
    assert torch.equal(dict(online.named_parameters())["1.weight"], params_o["1.weight"])  # online untouched


def test_ema_update_extremes_and_bad_momentum():
    online, target = tiny_cnn(0), tiny_cnn(1)
    before = [p.clone() for p in target.parameters()]
    ema_update(online, target, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    ema_update(online, target, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update(online, target, 1.5)


def test_ema_of_branched_pair_follows_effective_weights():
    # Online and target with different base weights and different trained branches.
    online, target = tiny_cnn(0), tiny_cnn(1)
    add_branches(online, shape="cross")
    add_branches(target, shape="cross")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for model in (online, target):
            for branch in branch_parameters(model):
                branch.copy_(torch.randn(branch.shape, generator=gen, dtype=branch.dtype))
    eff_o = [online[i].weight.clone() for i in (0, 3)]  # parametrized: W + delta
    eff_t = [target[i].weight.clone() for i in (0, 3)]
    assert not online[0].parametrizations.weight.original.requires_grad  # the frozen base weight
    m = 0.8
    ema_update(online, target, m)
    for i, o, t in zip((0, 3), eff_o, eff_t):
        assert torch.allclose(target[i].weight, m * t + (1 - m) * o, atol=1e-12)
    # the target computes with those weights
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    target.eval()
    assert torch.isfinite(target(x)).all()


def test_ema_refuses_mismatched_networks():
    online, target = tiny_cnn(0), tiny_cnn(1)
    add_branches(online)
    with pytest.raises(ValueError, match="one network has branches and the other does not"):
        ema_update(online, target, 0.99)
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(4, 3, 3, 3\) in online but \(5, 3, 3, 3\)"):
        ema_update(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 5, 3)), 0.99)
    with pytest.raises(ValueError, match="buffers differ"):
        ema_update(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False), 0.99)
