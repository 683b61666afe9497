"""LARS, parameter groups and the warmup-cosine schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from timm_branch.train.optim import LARS, build_optimizer, build_scheduler, param_groups, warmup_cosine


@pytest.mark.parametrize("lr", [0.3, 0.4, 0.6])
def test_lars_step_is_the_smaller_of_trust_ratio_and_lr(lr):
    """solo-learn's and CaSSLe's clipping: ``||w|| = ||g|| = 1``, eta 0.02 gives a step of 0.02 at
    any learning rate above it (clipping the ratio itself at 1 gave ``lr * 0.02``)."""
    w = nn.Parameter(torch.tensor([0.6, 0.8], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    LARS([w], lr=lr, momentum=0.0, weight_decay=0.0, eta=0.02).step()
    assert torch.equal(w.detach(), torch.tensor([0.6, 0.8 - 0.02], dtype=torch.float64))


def test_lars_clipped_at_the_learning_rate():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    w.grad = torch.tensor([0.0, 0.01], dtype=torch.float64)  # ratio 0.02 * 5 / 0.01 = 10 > lr -> step lr * g
    LARS([w], lr=0.1, momentum=0.0, eta=0.02).step()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0 - 0.001], dtype=torch.float64), rtol=0, atol=1e-15)


def test_lars_decay_in_the_denominator_and_excluded_groups():
    w = nn.Parameter(torch.tensor([300.0, 400.0], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    b.grad = torch.tensor([2.0], dtype=torch.float64)
    opt = LARS([dict(params=[w]), dict(params=[b], lars_exclude=True, weight_decay=0.0)], lr=0.1, momentum=0.0, weight_decay=0.5)
    opt.step()
    # ratio 0.02 * 500 / (||g|| + 0.5 * 500) = 10 / 251 < lr: the step is ratio * (g + 0.5 w)
    expected = torch.tensor([300.0, 400.0], dtype=torch.float64) - (10 / 251) * torch.tensor([150.0, 201.0], dtype=torch.float64)
    assert torch.allclose(w.detach(), expected, rtol=1e-14)
    assert b.item() == pytest.approx(1.0 - 0.1 * 2.0)  # plain SGD, no decay


def test_lars_zero_weight_takes_the_plain_gradient():
    """A zero-initialised branch: ``||w|| = 0``, so the reference applies neither ratio nor decay."""
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    LARS([w], lr=0.4, momentum=0.0, weight_decay=0.1).step()
    assert torch.equal(w.detach(), torch.tensor([0.0, -0.4], dtype=torch.float64))


def test_param_groups_exclude_one_dimensional_and_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [1, 4] and groups[1]["lars_exclude"]


@pytest.mark.parametrize("name, cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    assert isinstance(build_optimizer(name, nn.Linear(2, 2).named_parameters(), 0.1, 1e-4), cls)


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose one of lars, sgd, adamw"):
        build_optimizer("adam", nn.Linear(2, 2).named_parameters(), 0.1, 0.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("sgd", frozen.named_parameters(), 0.1, 0.0)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.003)
    assert warmup_cosine(5, 100, 10) == pytest.approx(0.003 + 0.997 * 0.5)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(0, 100, 0) == pytest.approx(1.0)


def test_scheduler_steps_per_step():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, total_steps=4, warmup_steps=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.003, 0.5015, 1.0, 0.5])


def test_lars_follows_the_per_parameter_formula_over_steps():
    """Several shapes, a decayed group with and without clipping, an excluded group, a parameter
    without gradient, momentum from its first step: equal, in float64, to the formula applied to
    each parameter on its own."""
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (8, 4), (5,), (2, 2)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    groups = [dict(params=params[:2]), dict(params=[params[2]], lars_exclude=True, weight_decay=0.0),
              dict(params=[params[3]], clip_lr=False)]
    opt = LARS(groups, lr=0.3, momentum=0.9, weight_decay=1e-2, eta=0.02)
    expected = [p.detach().clone() for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    settings = [(1e-2, False, True), (1e-2, False, True), (0.0, True, True), (1e-2, False, False)]  # wd, excluded, clip
    for step in range(4):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 and step == 2) else g.clone()
        opt.step()
        for i, g in enumerate(grads):
            if i == 1 and step == 2:
                continue
            wd, excluded, clip = settings[i]
            if not excluded:
                ratio = 0.02 * expected[i].norm() / (g.norm() + wd * expected[i].norm())
                g = (g + wd * expected[i]) * ((ratio / 0.3).clamp(max=1.0) if clip else ratio)
            buffers[i] = g.clone() if buffers[i] is None else 0.9 * buffers[i] + g
            expected[i] = expected[i] - 0.3 * buffers[i]
        for p, e in zip(params, expected):
            assert torch.allclose(p.detach(), e, rtol=1e-12, atol=1e-14)
