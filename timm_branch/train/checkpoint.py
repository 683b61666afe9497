"""Run-folder layout, finished-task folders and mid-task checkpoints, all written atomically.

A run folder holds::

    config.yaml            the resolved configuration
    metrics.json           evaluations after every finished task (+ accuracy_matrix.csv)
    task-K/                one folder per finished task, complete or absent:
        model.safetensors, config.json, README.md   the merged backbone, loadable by plain timm
        trainer_state.safetensors                   SSL heads, momentum backbone, queues
    checkpoint.json        points at the newest mid-task checkpoint folder
    checkpoint-K-E/        state after epoch E of task K: modules + optimiser + scheduler

``task-K`` is assembled in a temporary folder and renamed into place in one step, so a folder with
that name is always complete. A checkpoint folder is complete before ``checkpoint.json`` (itself
replaced atomically) points at it; older checkpoint folders are removed after that.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .._io import atomic_write_json, fsync_path

TRAINER_STATE = "trainer_state.safetensors"
POINTER = "checkpoint.json"


def task_dir(run: Path, task: int) -> Path:
    return run / f"task-{task}"


def finished_tasks(run: Path) -> int:
    """How many tasks are finished: the length of the run of ``task-0``, ``task-1``, ... folders."""
    count = 0
    while task_dir(run, count).is_dir():
        count += 1
    return count


def module_tensors(modules: dict[str, nn.Module | None]) -> dict[str, torch.Tensor]:
    """The state dicts of ``modules`` under ``"<name>."`` prefixes, as contiguous CPU tensors."""
    tensors = {}
    for name, module in modules.items():
        if module is not None:
            for key, value in module.state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def load_module_tensors(tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module | None], where: Path) -> None:
    """Load ``tensors`` written by :func:`module_tensors` into ``modules`` (strict per module)."""
    for name, module in modules.items():
        if module is None:
            continue
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{where}: the saved {name!r} state does not fit this run's {name}: {err}") from err


def write_task(run: Path, task: int, write_export, trainer_tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Assemble ``task-K`` in a temporary folder (``write_export(folder)`` writes the model) and
    rename it into place."""
    final = task_dir(run, task)
    tmp = Path(tempfile.mkdtemp(prefix=f".task-{task}.", dir=run))
    try:
        write_export(tmp)
        safetensors.torch.save_file(trainer_tensors, tmp / TRAINER_STATE)
        fsync_path(tmp / TRAINER_STATE)
        atomic_write_json(tmp / "task.json", info)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(run)
    return final


def read_task_state(run: Path, task: int) -> dict[str, torch.Tensor]:
    path = task_dir(run, task) / TRAINER_STATE
    return safetensors.torch.load_file(path)


def write_checkpoint(run: Path, task: int, epoch: int, tensors: dict[str, torch.Tensor], optim_state: dict) -> Path:
    """Write the state after ``epoch`` of ``task`` and point ``checkpoint.json`` at it."""
    folder = run / f"checkpoint-{task}-{epoch}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=run))
    try:
        safetensors.torch.save_file(tensors, tmp / "modules.safetensors")
        torch.save(optim_state, tmp / "optim.pt")
        for name in ("modules.safetensors", "optim.pt"):
            fsync_path(tmp / name)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(run / POINTER, {"task": task, "epoch": epoch, "folder": folder.name})
    for old in run.glob("checkpoint-*-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def read_checkpoint(run: Path, task: int) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """``(epoch, module tensors, optimiser state)`` of the newest checkpoint of ``task``, or ``None``."""
    pointer = run / POINTER
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text(encoding="utf-8"))
    if info.get("task") != task:
        return None
    folder = run / info["folder"]
    tensors = safetensors.torch.load_file(folder / "modules.safetensors")
    optim_state = torch.load(folder / "optim.pt", weights_only=True)
    return int(info["epoch"]), tensors, optim_state


def clear_checkpoints(run: Path) -> None:
    """Remove mid-task checkpoints (after a task is finished they are no longer needed)."""
    (run / POINTER).unlink(missing_ok=True)
    for old in run.glob("checkpoint-*-*"):
        shutil.rmtree(old, ignore_errors=True)
