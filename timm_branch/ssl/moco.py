"""MoCo v2+ (Chen, Fan, Girshick, He, arXiv 2003.04297; symmetric form of solo-learn / CaSSLe).

MoCo v2 (He et al., CVPR 2020 + the v2 improvements) with the symmetrised loss of MoCo v3
(Chen, Xie, He, ICCV 2021): each view's query is contrasted with the other view's momentum key
and with a queue of past keys of that other view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SSLMethod, SSLOutput, momentum_copy, no_grad_apply

__all__ = ["MoCo", "moco_loss"]


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries against their keys (positives) and a queue of keys (negatives).

    ::

        logits_b = [q_b . k_b, q_b . queue_1, ..., q_b . queue_K] / T
        loss = mean_b cross_entropy(logits_b, 0)

    Args:
        q: queries, ``(B, D)``; L2-normalised here.
        k: keys of the same samples, ``(B, D)``; L2-normalised and detached here.
        queue: negative keys, ``(K, D)``, rows already unit-norm (``K`` may be 0).
        temperature: ``T > 0``.

    Returns:
        Scalar tensor.
    """
    if q.shape != k.shape or q.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"q, k must be (B, D) and queue (K, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
        )
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.detach().to(q.dtype).T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(SSLMethod):
    """MoCo v2+: projector ``Linear -> ReLU -> Linear``, its momentum copy, and one key queue per view.

    Loss: ``(moco_loss(q1, k2, queue[1]) + moco_loss(q2, k1, queue[0])) / 2`` with
    ``q_v = normalize(projector(feats[v]))`` and ``k_v = normalize(momentum_projector(momentum_feats[v]))``.
    After the loss, in training mode only, ``k_v`` is enqueued into ``queue[v]`` (first in,
    first out; no gradient). The method does no all-gather of its own: in data-parallel training
    it is given the features of the global batch (see :mod:`timm_branch.ssl.base`), so every
    process enqueues the same keys, in one process's order.

    ``z`` are the normalised queries ``q_v``, ``(B, proj_output_dim)`` (what CaSSLe distils).

    Buffers (persistent, so a checkpoint restores them):
        queue: ``(2, queue_size, proj_output_dim)``, initialised with random unit vectors as in
            MoCo and solo-learn.
        queue_ptr: ``(1,)`` int64, the next row to overwrite.
    """

    name = "moco"
    uses_momentum = True

    def __init__(self, feature_dim: int, recipe=None):
        super().__init__(feature_dim, recipe)
        self._require("temperature", "queue_size", "base_momentum")
        if self.recipe.queue_size < 1:
            raise ValueError(f"moco needs queue_size >= 1, got {self.recipe.queue_size}")
        self.momentum_projector = momentum_copy(self.projector)
        queue = F.normalize(torch.randn(2, self.recipe.queue_size, self.recipe.proj_output_dim), dim=2)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def momentum_pairs(self):
        return [(self.projector, self.momentum_projector)]

    def project(self, feats):
        return [F.normalize(z, dim=1) for z in super().project(feats)]

    def _forward(self, feats, momentum_feats):
        q1, q2 = (F.normalize(self.projector(f), dim=1) for f in feats)
        k1, k2 = (F.normalize(k, dim=1) for k in no_grad_apply(self.momentum_projector, momentum_feats))
        # The loss keeps the queue for its backward: use a copy, the buffer is updated below.
        queue = self.queue.clone() if self.training else self.queue
        t = self.recipe.temperature
        loss = (moco_loss(q1, k2, queue[1], t) + moco_loss(q2, k1, queue[0], t)) / 2
        if self.training:
            self._enqueue(torch.stack([k1, k2]))
        return SSLOutput(loss=loss, z=[q1, q2])

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` ``(2, B, D)`` at ``queue_ptr``, wrapping around; keep the last if ``B > K``."""
        size = self.queue.shape[1]
        keys = keys[:, -size:].to(self.queue.dtype)
        n = keys.shape[1]
        ptr = int(self.queue_ptr)
        rows = (torch.arange(n, device=self.queue.device) + ptr) % size
        self.queue[:, rows] = keys
        self.queue_ptr[0] = (ptr + n) % size
