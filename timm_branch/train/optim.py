"""Optimisers and learning-rate schedules for SSL training: LARS with warmup-cosine, SGD, AdamW.

The continual-SSL papers (CaSSLe, Branch-tuning; solo-learn's recipes) train with LARS
(You et al. 2017, arXiv 1708.03888) and a linear-warmup + cosine-decay schedule, with biases and
normalisation parameters excluded from weight decay and from LARS's trust-ratio scaling.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

OPTIMIZERS: tuple[str, ...] = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (LARS, You et al. 2017), as solo-learn and
    CaSSLe implement it (``solo/utils/lars.py``).

    For a parameter ``w`` with gradient ``g``, both norms non-zero, the local rate is
    ``ratio = eta * ||w|| / (||g|| + wd * ||w||)`` and the update direction ``ratio * (g + wd * w)``.
    With ``clip_lr`` the ratio is first divided by the group's current learning rate and clipped at
    1, so the step ``lr * min(ratio / lr, 1) * (g + wd * w)`` is ``min(ratio, lr) * (g + wd * w)``:
    the local rate never exceeds the global one. Where ``||w||`` or ``||g||`` is 0 (a
    zero-initialised branch's first step) the parameter gets plain ``g``, without decay, as in the
    reference. Groups with ``lars_exclude=True`` (biases, norms) get plain SGD with momentum and no
    weight decay.

    Args:
        params: parameters or groups.
        lr: learning rate (units of the parameter per unit gradient).
        momentum: heavy-ball momentum, 0.9 in the papers.
        weight_decay: L2 coefficient.
        eta: trust coefficient, 0.02 in solo-learn's CIFAR recipes.
        clip_lr: clip ``ratio / lr`` at 1 (solo-learn's and CaSSLe's ``clip_lr=True``).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02, clip_lr: bool = True):
        if lr <= 0:
            raise ValueError(f"LARS learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One foreach call per operation and group, not a dozen small ops per parameter: on a GPU
        # each op is a kernel launch the host pays for.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                ratios, decays = _trust_ratios(params, grads, group["eta"], group["weight_decay"],
                                               group["lr"] if group["clip_lr"] else None)
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, torch._foreach_mul(params, decays))
                grads = torch._foreach_mul(grads, ratios)
            if group["momentum"]:
                grads = self._momentum(params, grads, group["momentum"])
            torch._foreach_add_(params, grads, alpha=-group["lr"])
        return loss

    def _momentum(self, params: list[torch.Tensor], grads: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
        """The parameters' momentum buffers after ``buf = momentum * buf + grad`` (``grad`` on the first step)."""
        states = [self.state[p] for p in params]
        old = [i for i, st in enumerate(states) if "momentum_buffer" in st]
        if old:
            buffers = [states[i]["momentum_buffer"] for i in old]
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, [grads[i] for i in old])
        for i, st in enumerate(states):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = grads[i].clone()
        return [st["momentum_buffer"] for st in states]


def _trust_ratios(params: list[torch.Tensor], grads: list[torch.Tensor], eta: float, weight_decay: float,
                  clip_lr: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per parameter the LARS factor and the weight decay it gets, as 0-dim tensors.

    Where both norms are non-zero: ``ratio = eta * ||w|| / (||g|| + weight_decay * ||w||)``, divided
    by ``clip_lr`` and clipped at 1 when ``clip_lr`` (the group's current learning rate) is given,
    and decay ``weight_decay``; elsewhere factor 1 and decay 0 (the reference leaves such a
    gradient untouched)."""
    w_norms = torch.stack(torch._foreach_norm(params))
    g_norms = torch.stack(torch._foreach_norm(grads))
    active = (w_norms > 0) & (g_norms > 0)
    ratios = eta * w_norms / (g_norms + weight_decay * w_norms)
    if clip_lr is not None:
        ratios = (ratios / clip_lr).clamp(max=1.0)
    ratios = torch.where(active, ratios, torch.ones_like(ratios))
    decays = torch.where(active, torch.full_like(w_norms, weight_decay), torch.zeros_like(w_norms))
    return list(ratios.unbind()), list(decays.unbind())


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 branch_weight_decay: float | None = None, branch_lr: float | None = None) -> list[dict]:
    """Split named trainable parameters into a decayed group, an excluded one (1-D: biases, norm
    affines) and, with ``branch_weight_decay`` or ``branch_lr``, a group of the branch tensors
    (names starting with ``branch.``) with that decay and learning rate instead.

    The excluded group carries ``lars_exclude=True`` and ``weight_decay=0``. Branch tensors are
    never 1-D; by default they are decayed like any kernel (towards the old kernel, since the
    decay acts on the delta); the authors passed ``weight_decay=0.`` for them
    (``branch_weight_decay=0``).
    """
    own = branch_weight_decay is not None or branch_lr is not None
    decay, keep, branches = [], [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1:
            keep.append(p)
        elif own and name.startswith("branch."):
            branches.append(p)
        else:
            decay.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay)]
    if branches:
        group = dict(params=branches, weight_decay=weight_decay if branch_weight_decay is None else branch_weight_decay)
        groups.append(group if branch_lr is None else {**group, "lr": branch_lr})
    if keep:
        groups.append(dict(params=keep, weight_decay=0.0, lars_exclude=True))
    return groups


def build_optimizer(name: str, params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                    branch_weight_decay: float | None = None, branch_lr: float | None = None) -> torch.optim.Optimizer:
    """``"lars"`` (momentum 0.9, eta 0.02, clipped), ``"sgd"`` (momentum 0.9) or ``"adamw"`` over
    :func:`param_groups` (learning rates: ``lr``, ``branch_lr`` for the branch tensors if given)."""
    groups = param_groups(params, weight_decay, branch_weight_decay, branch_lr)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: nothing to optimise")
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, start_factor: float = 0.003, end_factor: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear warmup from ``start_factor`` to 1 over ``warmup_steps``,
    then cosine decay to ``end_factor`` at ``total_steps`` (solo-learn's ``LinearWarmupCosineAnnealingLR``,
    applied per step)."""
    if step < warmup_steps:
        return start_factor + (1 - start_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup-cosine schedule (call ``.step()`` after every optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps))
