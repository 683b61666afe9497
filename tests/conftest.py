"""Shared fixtures: small timm models in float64 with randomised BatchNorm state."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from _helpers import max_rel_err, randomise_batchnorm  # noqa: F401 - max_rel_err is shared with the tests
from _helpers import perturb_branches as _perturb


def perturb_branches(model: nn.Module, std: float = 1e-3, seed: int = 1) -> None:
    """Set every branch to small random values, as if trained."""
    _perturb(model, torch.Generator().manual_seed(seed), std)


def make_model(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """A timm model (no pretrained weights), randomised BN, in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return randomise_batchnorm(model.to(dtype), torch.Generator().manual_seed(0)).eval()


@pytest.fixture
def resnet18() -> nn.Module:
    return make_model("resnet18")


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test, then the previous setting.

    For modules of many tiny models: one thread is about as fast as two, and on a busy 2-core
    machine two OpenMP threads spin-wait for each other (xception41p: 4 s alone, 146 s loaded).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
