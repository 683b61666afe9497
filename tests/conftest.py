"""Shared fixtures: small timm models in float64 with randomised BatchNorm state."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                n = module.num_features
                like = dict(dtype=module.running_mean.dtype if module.running_mean is not None else torch.float32)
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(n, generator=gen, **like) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=gen, **like) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(n, generator=gen, **like) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=gen, **like) * 0.1)
    return model


def perturb_branches(model: nn.Module, std: float = 1e-3, seed: int = 1) -> None:
    """Set every branch to small random values, as if trained."""
    from timm_branch import branch_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in branch_parameters(model):
            branch.copy_(torch.randn(branch.shape, generator=gen, dtype=branch.dtype) * std)


def make_model(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """A timm model (no pretrained weights), randomised BN, in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomize_bn(model.to(dtype)).eval()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))


@pytest.fixture
def resnet18() -> nn.Module:
    return make_model("resnet18")


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
