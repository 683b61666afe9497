"""Test helpers: randomised BatchNorm, perturbed branches, error measures, snapshots of what merging restores."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn

from timm_branch import PairingFallbackWarning, branch_parameters
from timm_branch.bn import is_batchnorm


def randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters, in place.

    running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1), so that
    folding mistakes (a BN treated as identity, a mean or scale applied twice) show in the outputs.
    """
    with torch.no_grad():
        for module in model.modules():
            if not is_batchnorm(module):
                continue
            if module.running_mean is not None:
                mean, var = module.running_mean, module.running_var
                mean.copy_(torch.randn(mean.shape, generator=gen, dtype=mean.dtype) * 0.1)
                var.copy_(torch.rand(var.shape, generator=gen, dtype=var.dtype) * 1.5 + 0.5)
            if module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen, dtype=module.weight.dtype) + 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=module.bias.dtype) * 0.1)
    return model


def seeded_test_resnet(seed: int = 0) -> nn.Module:
    """timm's ``test_resnet`` without a head, in eval mode, with weights and BatchNorms random from
    ``seed`` (no zero-initialised, constant BN output)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    return randomise_batchnorm(model, torch.Generator().manual_seed(seed)).eval()


def perturb_branches(model: nn.Module, gen: torch.Generator, std: float = 1e-3) -> int:
    """Set every branch to N(0, std) values, as if trained; returns the number of branches."""
    count = 0
    with torch.no_grad():
        for branch in branch_parameters(model):
            branch.copy_(torch.randn(branch.shape, generator=gen, dtype=branch.dtype) * std)
            count += 1
    return count


def max_rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|``."""
    value, reference = value.detach(), reference.detach()
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((value - reference).abs().max() / scale)


def snapshot(model: nn.Module) -> dict[str, list]:
    """What merging must restore: module classes and modes, state-dict layout, requires_grad flags."""
    return {
        "module classes": [(name, type(module)) for name, module in model.named_modules()],
        "module modes": [(name, module.training) for name, module in model.named_modules()],
        "state-dict keys/shapes/dtypes": [(key, tuple(v.shape), v.dtype) for key, v in model.state_dict().items()],
        "requires_grad flags": [(name, param.requires_grad) for name, param in model.named_parameters()],
    }


def assert_restored(before: dict[str, list], after: dict[str, list], name: str) -> None:
    """``after`` equals ``before``, order included (optimiser states are indexed by position)."""
    for what in before:
        assert after[what] == before[what], f"{name}: merging changed the {what}"


@contextlib.contextmanager
def pairing_warnings(expect_fallback: bool, name: str) -> Iterator[None]:
    """Require a ``PairingFallbackWarning`` inside the block if ``expect_fallback``, forbid one otherwise.

    Other warnings are passed on unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallback = [w for w in caught if issubclass(w.category, PairingFallbackWarning)]
    for w in caught:
        if not issubclass(w.category, PairingFallbackWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if expect_fallback:
        assert fallback, f"{name} is listed in FALLBACK_MODELS but its pairing did not fall back"
    else:
        assert not fallback, f"unexpected PairingFallbackWarning for {name}: {fallback[0].message}"


def recorded_figures(monkeypatch, module: str) -> list:
    """The matplotlib figures that ``module`` (e.g. ``"timm_branch.evaluate.plots"``) makes from
    now on, in order; its PNGs are written as usual."""
    from matplotlib.figure import Figure

    made = []

    class Recorded(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(f"{module}.Figure", Recorded)
    return made
