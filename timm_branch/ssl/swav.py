"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, NeurIPS 2020, arXiv 2006.09882).

Swapped prediction: the prototype assignment ("code") of one view, computed with
Sinkhorn-Knopp, is the target of the other view's prototype scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SSLMethod, SSLOutput
from .heads import Prototypes

__all__ = ["SwAV", "sinkhorn", "swav_loss"]


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float, iters: int) -> Tensor:
    """Soft, equipartitioned assignments of ``B`` samples to ``K`` prototypes (SwAV, Algorithm 1).

    Starts from ``Q = exp(scores / epsilon)`` and alternately rescales it so that every
    prototype gets total mass ``1 / K`` and every sample ``1 / B``, ``iters`` times; the result is
    multiplied by ``B``. Hence, on return, each row sums to exactly 1 (an assignment per sample)
    and each column sums to ``B / K`` up to the convergence left after ``iters`` rounds.
    Computed in the log domain, in float32 at least, without gradient.

    Args:
        scores: prototype scores, ``(B, K)``, e.g. cosine similarities.
        epsilon: entropic regularisation (smaller is sharper).
        iters: number of (prototype, sample) rescaling rounds, at least 1.

    Returns:
        Codes ``(B, K)``, in the dtype of ``scores``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    work = torch.promote_types(scores.dtype, torch.float32)
    # In the log domain: the same iterations as exp-then-divide, without under- or overflow.
    log_q = (scores.to(work) / epsilon).T  # (K, B)
    k, b = log_q.shape
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(k)  # each prototype: mass 1 / K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)  # each sample: mass 1 / B
    return torch.exp(log_q + math.log(b)).T.to(scores.dtype)


def swav_loss(scores: list[Tensor], codes: list[Tensor], temperature: float) -> Tensor:
    """Swapped prediction: every view's code is the target of every other view's scores.

    ::

        loss = mean over ordered pairs (i, j), i != j, of
               mean_b  -sum_k codes[i][b, k] * log_softmax(scores[j][b] / T)[k]

    Args:
        scores: per view, prototype scores ``(B, K)`` of the normalised projections.
        codes: per view, assignments ``(B, K)`` (from :func:`sinkhorn`); used without gradient.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor.
    """
    if len(scores) != len(codes) or len(scores) < 2:
        raise ValueError(f"need as many codes as scores, at least 2 views; got {len(scores)} and {len(codes)}")
    losses = []
    for i, code in enumerate(codes):
        for j, score in enumerate(scores):
            if i != j:
                log_p = F.log_softmax(score / temperature, dim=1)
                losses.append(-(code.detach() * log_p).sum(dim=1).mean())
    return torch.stack(losses).mean()


class SwAV(SSLMethod):
    """SwAV with two views: projector ``Linear -> BN -> ReLU -> Linear``, :class:`Prototypes`,
    Sinkhorn-Knopp codes, and an optional feature queue for the codes.

    Per step: ``z_v = projector(feats[v])``; ``scores_v = prototypes(normalize(z_v))``;
    ``code_v = sinkhorn(scores_v [+ scores of queue[v]])[:B]``; loss ``swav_loss(scores, codes, T)``.

    Prototypes: in training mode, every forward first re-normalises the prototypes in place
    (:meth:`Prototypes.normalize_`, as the reference code does before each iteration); the
    trainer does nothing for it.

    Epoch hook (:meth:`on_epoch_start`, optional, epochs counted from 0 within each task as in
    CaSSLe, where every task is a fresh run):

    - while ``epoch < freeze_prototypes_epochs`` the scores use detached prototypes (so their
      gradient stays ``None`` and the optimiser skips them); ``requires_grad`` never changes, so
      the set of trainable parameters, and an optimiser state saved in any epoch, stay the same;
    - the queue enters the codes from ``epoch_queue_starts`` on (only filled rows are used).

    Without the hook, prototypes always train and the queue is never used. The queue is filled
    in training mode whatever the epoch.

    ``z`` are the raw (unnormalised) projector outputs ``(B, proj_output_dim)``.

    Buffers (persistent): ``queue`` ``(2, queue_size, proj_output_dim)`` of normalised past
    projections, newest first; ``queue_len`` ``(1,)`` int64, how many rows are filled.
    """

    name = "swav"
    uses_momentum = False

    def __init__(self, feature_dim: int, recipe=None):
        super().__init__(feature_dim, recipe)
        self._require("temperature", "num_prototypes", "sk_epsilon", "sk_iters")
        r = self.recipe
        self.prototypes = Prototypes(r.proj_output_dim, r.num_prototypes)
        self.register_buffer("queue", torch.zeros(2, r.queue_size or 0, r.proj_output_dim))
        self.register_buffer("queue_len", torch.zeros(1, dtype=torch.long))
        self.use_queue = False
        self.prototypes_frozen = False

    def on_epoch_start(self, epoch: int) -> None:
        r = self.recipe
        self.prototypes_frozen = epoch < (r.freeze_prototypes_epochs or 0)
        self.use_queue = bool(r.queue_size) and r.epoch_queue_starts is not None and epoch >= r.epoch_queue_starts

    def _forward(self, feats, momentum_feats):
        if self.training:
            self.prototypes.normalize_()
        z = [self.projector(f) for f in feats]
        zn = [F.normalize(v, dim=1) for v in z]
        scores = [self._scores(v) for v in zn]
        codes = self._codes(scores)
        loss = swav_loss(scores, codes, self.recipe.temperature)
        if self.training and self.queue.shape[1]:
            self._enqueue(torch.stack([v.detach() for v in zn]))
        return SSLOutput(loss=loss, z=z)

    def _scores(self, zn: Tensor) -> Tensor:
        """Cosine scores ``(B, num_prototypes)`` of normalised projections ``zn`` ``(B, D)``."""
        if self.prototypes_frozen:
            return F.linear(zn, self.prototypes.weight.detach())
        return self.prototypes(zn)

    @torch.no_grad()
    def _codes(self, scores: list[Tensor]) -> list[Tensor]:
        b = scores[0].shape[0]
        filled = int(self.queue_len)
        codes = []
        for v, s in enumerate(scores):
            s = s.detach()
            if self.use_queue and filled:
                s = torch.cat([s, self.prototypes(self.queue[v, :filled].to(s.dtype))])
            codes.append(sinkhorn(s, self.recipe.sk_epsilon, self.recipe.sk_iters)[:b])
        return codes

    @torch.no_grad()
    def _enqueue(self, zn: Tensor) -> None:
        """Shift the queue by ``B`` rows and put ``zn`` ``(2, B, D)`` in front."""
        size, n = self.queue.shape[1], zn.shape[1]
        if n >= size:
            self.queue.copy_(zn[:, :size])
        else:
            self.queue[:, n:] = self.queue[:, :-n].clone()
            self.queue[:, :n] = zn
        self.queue_len.fill_(min(size, int(self.queue_len) + n))
