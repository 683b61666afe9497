"""Data-parallel training over the processes ``torchrun`` starts, computing what one process computes.

``torchrun --nproc_per_node N -m timm_branch train ...`` starts N processes (ranks) with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`process_group` joins them (NCCL on GPUs, gloo on CPUs). Then, at every step:

- every rank draws the same global batch and takes its rows, :func:`local_rows`;
- the backbone runs on those rows inside ``DistributedDataParallel`` (:func:`data_parallel`);
- :func:`gather_rows` concatenates the backbone features of all ranks in rank order: the global
  batch's features, exactly as one process has them, on every rank. The SSL heads (their
  BatchNorm included), losses, queues, Sinkhorn, CaSSLe distiller and online probe run on them,
  so every rank computes one process's loss and head updates;
- rank 0 alone writes (:func:`is_main_process`); the others wait at :func:`barrier`.

Gradient scaling. Every rank computes the same global loss ``L``. The backward of
:func:`gather_rows` sums, over the ranks, the gradient each rank's copy of ``L`` sends to rank
``r``'s rows: ``N dL/dx_r``. So rank ``r``'s backbone gradient is ``N`` times its rows' share
``g_r`` of ``dL/dtheta``, and DDP's average over the ranks gives ``(1/N) sum_r N g_r = dL/dtheta``,
one process's gradient. The parameters after the gather (heads, distiller, probe) get
``dL/dtheta`` itself on every rank: they need no averaging and stay identical on every rank, so
only the backbone is wrapped in DDP. The price: every rank runs the heads on the whole batch,
which is small next to the backbone's share.

Without torchrun (no ``WORLD_SIZE`` above 1) nothing here does anything: one rank, no process
group, and the trainer's code path is the one-process path.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import bn as bn_policy

__all__ = [
    "barrier", "data_parallel", "gather_rows", "is_main_process", "launched_by_torchrun", "local_rows",
    "process_group", "rank", "resolve_device", "synced_batchnorm", "world_size",
]

TIMEOUT = timedelta(hours=2)
"""How long a rank waits in a collective: rank 0 evaluates and exports each task while the others wait."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    """The number of ranks training together; 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_world_size() -> int:
    """The number of ranks on this machine (torchrun's ``LOCAL_WORLD_SIZE``); 1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def rank() -> int:
    """This process's rank, 0 to ``world_size() - 1``; 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this rank writes the run's outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here (a no-op on one process)."""
    if world_size() > 1:
        dist.barrier()


def resolve_device(spec: str) -> torch.device:
    """The device this process trains on, from ``TrainConfig.device``.

    ``"auto"`` is CUDA when available, else the CPU. Under torchrun a CUDA device without an index
    is this process's own GPU, ``cuda:LOCAL_RANK``.
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the process group torchrun describes for the block, then leave it.

    NCCL for a CUDA ``device`` (made this process's current GPU), gloo otherwise. Outside
    torchrun, or when the caller already initialised a group, it does nothing.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_rows(batch: int) -> slice:
    """This rank's rows of a global batch of ``batch`` samples: equal consecutive slices in rank order.

    Raises:
        ValueError: ``batch`` is not a multiple of the number of ranks.
    """
    n = world_size()
    if batch % n:
        raise ValueError(f"the global batch of {batch} does not split evenly over {n} processes")
    size = batch // n
    return slice(rank() * size, (rank() + 1) * size)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of every rank (solo-learn's GatherLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # A copy: all_reduce works in place, and autograd may still hold this gradient elsewhere.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` ``(b, ...)`` concatenated in rank order, ``(N b, ...)``; ``x`` itself on one process.

    Differentiable: the gradient that reaches ``x`` is the sum over the ranks of the gradients their
    losses send to these rows (see the module docstring for why that is the right scale).
    """
    return _GatherRows.apply(x) if world_size() > 1 else x


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when several ranks train, else ``module`` itself."""
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def _sync_class(norm: nn.Module) -> type[nn.Module]:
    # timm's BatchNormAct2d also applies its drop and act children; SyncBatchNormAct does the same.
    return SyncBatchNormAct if isinstance(norm, BatchNormAct2d) else nn.SyncBatchNorm


@contextlib.contextmanager
def synced_batchnorm(*modules: nn.Module | None) -> Iterator[None]:
    """Within the block, every BatchNorm of ``modules`` is a ``torch.nn.SyncBatchNorm``: in train
    mode it normalises with the statistics of the global batch (on GPUs; torch synchronises CUDA
    tensors only). Afterwards each layer is of its original class again. Layers that
    :mod:`timm_branch.bn`'s ``"frozen"`` policy pins in eval mode stay as they are: they use no
    batch statistics.

    The layers change class in place (``BatchNormAct2d`` becomes timm's ``SyncBatchNormAct``, any
    other BatchNorm ``SyncBatchNorm``), so parameters, buffers, state-dict keys, children,
    parametrizations and the pinning of :mod:`timm_branch.bn`'s ``"frozen"`` policy stay as they
    are: the model merges and exports as the stock timm architecture. ``None`` entries are skipped.
    On one process a ``SyncBatchNorm`` computes exactly what the original layer computes.
    """
    # A layer pinned in eval mode by the "frozen" policy never uses batch statistics: synchronising
    # would change nothing but end its folding into its conv (timm_branch.bn_fold).
    converted = [(norm, type(norm)) for module in modules if module is not None
                 for norm in module.modules()
                 if bn_policy.is_batchnorm(norm) and not isinstance(norm, nn.SyncBatchNorm) and not bn_policy.is_pinned(norm)]
    for norm, _ in converted:
        norm.__class__ = _sync_class(norm)
        norm.process_group = None  # SyncBatchNorm's attribute: None is the default (world) group
    try:
        yield
    finally:
        for norm, original in converted:
            del norm.process_group
            norm.__class__ = original
