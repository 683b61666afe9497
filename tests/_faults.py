"""Fault injection for the reliability tests: a training run killed with SIGKILL at a chosen point.

``python tests/_faults.py POINT N -- ARGS`` runs ``timm-branch ARGS`` (e.g. ``train --output
RUN ...``) in this process with POINT armed: at its N-th occurrence the process sends itself
SIGKILL, as a power cut or the kernel's OOM killer would end it (no exception handler, no
``finally`` block, no ``atexit`` runs). Points:

- ``none``: no fault (a plain run, or ``train --resume RUN``);
- ``step``: just before the N-th training step;
- ``merge``: as the N-th merge of branches into their convs starts;
- ``finished``: right after the N-th task folder was renamed into place, before its checkpoints
  are cleared and its metrics are written;
- ``write:NAME``: half-way through writing the N-th file whose name contains NAME (at the
  ``os.write`` that fills it: half the bytes reach the file, then the kill), e.g.
  ``write:optim.pt`` inside a checkpoint, ``write:model.safetensors`` inside an export.

``python tests/_faults.py --serve`` imports torch, timm and timm-branch once, then reads jobs
from stdin, one JSON object per line (``{"argv": [POINT, N, "--", ARGS...], "log": FILE}``),
and runs each in a forked child (one intra-op thread, output to FILE), answering ``pid PID``
when the child starts and ``exit CODE`` when it ends (``-9``: killed by SIGKILL). Forking skips
the seconds of imports each run would otherwise cost; the server itself runs no torch operation,
so the children start from a clean state.

The helpers at the end describe the tiny run the reliability tests train (seconds on a CPU).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _on_nth_call(owner, name: str, n: int, before: bool = True) -> None:
    """Replace ``owner.name`` by a wrapper that kills the process at its ``n``-th call, before the
    original runs (``before``) or right after it returned."""
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if before and calls == n:
            _kill()
        result = original(*args, **kwargs)
        if not before and calls == n:
            _kill()
        return result

    setattr(owner, name, wrapper)


def _half_way_through_write(name: str, n: int) -> None:
    """Make the ``n``-th ``os.write`` to a file whose name contains ``name`` write half its bytes, then kill."""
    original = os.write
    calls = 0

    def write(fd, data):
        nonlocal calls
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if name in os.path.basename(path):
            calls += 1
            if calls == n:
                original(fd, memoryview(data)[: len(data) // 2])
                os.fsync(fd)
                _kill()
        return original(fd, data)

    os.write = write


def arm(point: str, n: int) -> None:
    """Install the fault ``point`` to fire at its ``n``-th occurrence."""
    from timm_branch.train import checkpoint, continual

    if point == "none":
        return
    if point == "step":
        _on_nth_call(continual.ContinualRun, "train_step", n)
    elif point == "merge":
        _on_nth_call(continual, "merge_branches", n)
    elif point == "finished":
        _on_nth_call(checkpoint, "clear_checkpoints", n)
    elif point.startswith("write:"):
        _half_way_through_write(point[len("write:"):], n)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def run_job(argv: list[str]) -> int:
    """``POINT N -- ARGS``: arm the fault, then run the command line ``timm-branch ARGS`` here."""
    import torch

    from timm_branch import cli

    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: _faults.py POINT N -- ARGS  |  _faults.py --serve")
    torch.set_num_threads(1)  # what the reference run uses: the same reductions, the same bits
    arm(argv[0], int(argv[1]))
    return cli.main(argv[3:])


def _child(job: dict) -> None:
    """The forked child: output to the job's log, run it, exit without the parent's exit handlers."""
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = run_job(job["argv"])
    except BaseException:  # noqa: BLE001 - the log is the only place a child can report to
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> int:
    """Run the jobs read from stdin, each in a forked child; report pids and exit codes on stdout."""
    import timm  # noqa: F401 - imported once here, inherited by every child
    import torch  # noqa: F401

    import timm_branch.cli  # noqa: F401
    import timm_branch.train.continual  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


TINY = dict(model="test_resnet", data=[], scenario="data", num_tasks=2, image_size=16, batch_size=16, epochs=2,
            strategy="branch", method="simclr", linear_probe=False, knn_k=5)
"""Two tasks of 32 unlabeled 16x16 images, two epochs of two steps each: every kind of state a run
writes (checkpoints, merges, exports) in a few seconds."""


def tiny_images(path: Path) -> Path:
    """64 seeded random 16x16 RGB images, unlabeled, as an ``.npz`` data source."""
    import numpy as np

    np.savez(path, x_train=np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
    return path


def tiny_config(output: Path, data: Path, **overrides):
    """The tiny run's :class:`~timm_branch.train.config.TrainConfig` writing to ``output``."""
    from timm_branch.train.config import TrainConfig

    return TrainConfig(**{**TINY, "data": [str(data)], "output": str(output), **overrides})


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else run_job(sys.argv[1:]))
