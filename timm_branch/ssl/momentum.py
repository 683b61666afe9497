"""Momentum (EMA) networks: the update and BYOL's cosine schedule of the momentum.

BYOL (Grill et al., NeurIPS 2020) and MoCo (He et al., CVPR 2020) keep a target network whose
weights trail the online network's: ``target <- m * target + (1 - m) * online`` after every
optimiser step.

Branch-tuning note (arXiv 2403.18266). Under :func:`timm_branch.add_branches` a conv's effective
weight is ``W + delta`` with ``W`` frozen (``requires_grad=False``) and the branch ``delta``
trainable. The update here runs over *every* parameter, frozen or not, so with a target that
carries branches too (``add_branches`` on both, or a deep copy of the branched online network)::

    W_t + delta_t  <-  m (W_t + delta_t) + (1 - m) (W_o + delta_o)

because a weight-space branch enters the effective weight linearly: the target follows the
online network's effective weights exactly as without branches. (The Branch-tuning authors'
code never switched on the target's branches, so their target ignored what the branches learnt.)
A parameter-name mismatch, such as branches on one side only, raises instead of silently
pairing the wrong tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["cosine_momentum", "ema_update"]


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` on all parameters; buffers copied.

    Every parameter takes part, including those with ``requires_grad=False`` (frozen base
    weights of branched convs, frozen BatchNorm affines). Buffers (BatchNorm running statistics,
    ``num_batches_tracked``, MoCo queues, ...) are copied from ``online``, not averaged.

    Args:
        online: the network being trained.
        target: its momentum copy, with the same parameter and buffer names and shapes.
        momentum: ``m`` in ``[0, 1]``; 1 leaves the parameters unchanged, 0 copies them.

    Raises:
        ValueError: ``momentum`` outside ``[0, 1]``, or the two modules' parameter or buffer
            names or shapes differ (the message names the first difference).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    params_o, params_t = _matched(online.named_parameters(), target.named_parameters(), "parameter")
    buffers_o, buffers_t = _matched(online.named_buffers(), target.named_buffers(), "buffer")
    if params_t:
        weight = 1.0 - momentum
        same = all(t.dtype == o.dtype and t.device == o.device for t, o in zip(params_t, params_o))
        if same:
            torch._foreach_lerp_(params_t, params_o, weight)
        else:
            for t, o in zip(params_t, params_o):
                t.lerp_(o.to(device=t.device, dtype=t.dtype), weight)
    for t, o in zip(buffers_t, buffers_o):
        t.copy_(o)


def _matched(online, target, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    online, target = dict(online), dict(target)
    if online.keys() != target.keys():
        only_o = sorted(online.keys() - target.keys())
        only_t = sorted(target.keys() - online.keys())
        hint = ""
        if any("parametrizations" in n for n in only_o + only_t):
            hint = (
                "; one network has branches and the other does not: give the target the same branches "
                "(timm_branch.add_branches on it, or deep-copy the online network after add_branches)"
            )
        raise ValueError(
            f"ema_update: online and target {kind}s differ: only in online {only_o[:3]}, "
            f"only in target {only_t[:3]}{hint}"
        )
    for name, o in online.items():
        if o.shape != target[name].shape:
            raise ValueError(
                f"ema_update: {kind} {name!r} has shape {tuple(o.shape)} in online but "
                f"{tuple(target[name].shape)} in target"
            )
    names = list(online)
    return [online[n] for n in names], [target[n] for n in names]


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / total_steps) + 1) / 2``.

    With the default ``final=1`` this is ``1 - (1 - base) * (cos(pi k / K) + 1) / 2``: ``base``
    at step 0, rising to 1 at ``total_steps``. solo-learn / CaSSLe end MoCo v2+ at 0.999
    (``Recipe.final_momentum``). ``step`` is clamped to ``[0, total_steps]``.

    Raises:
        ValueError: ``total_steps < 1``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    step = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1) / 2
