"""Run-folder layout, finished-task folders and mid-task checkpoints: written atomically, read back checked.

A run folder holds::

    config.yaml            the resolved configuration
    metrics.json           evaluations after every finished task (+ accuracy_matrix.csv)
    task-K/                one folder per finished task, complete or absent:
        model.safetensors, config.json, README.md   the merged backbone, loadable by plain timm
        trainer_state.safetensors                   SSL heads, momentum backbone, queues
        task.json                                   the task's settings and the SHA-256 of every other file
    checkpoint.json        points at the newest mid-task checkpoint folder, with the SHA-256 of its files
    checkpoint-K-E/        state after epoch E of task K: modules.safetensors + optim.pt
    run.json               the resolved configuration the run started with, which a resume must keep
    pending_pushes.json    tasks whose push to the Hub failed, pushed again later (absent when none)
    run.lock               while a process trains the run (see :mod:`timm_branch.train.lock`)

``task-K`` is assembled in a hidden temporary folder and renamed into place in one step, so a
folder with that name is always complete. A checkpoint folder is complete before
``checkpoint.json`` (itself replaced atomically) points at it; older checkpoint folders are
removed after that. A run killed at any moment leaves at most hidden temporary entries, which
:func:`remove_leftovers` clears when the run starts again. Trained state holding NaN or Inf is
never written (:class:`NonFiniteStateError`), so the last checkpoint is always a good one.

Reading back checks each file against its recorded SHA-256, then parses it and checks it against
the model it is loaded into; every error names the file (``FileNotFoundError``,
:class:`~timm_branch._io.CorruptFileError`, or ``ValueError`` for state of another model).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Collection, NamedTuple

import torch
from torch import nn

from .._io import (CorruptFileError, atomic_write_json, fsync_path, read_json, read_safetensors, read_torch_state,
                   sha256_file, staging_folder, write_safetensors, write_torch_state)
from ..export import TASK_INFO, check_digests, load_exported, nonfinite_tensors

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.safetensors"
POINTER = "checkpoint.json"
MODULES = "modules.safetensors"
OPTIMIZER = "optim.pt"
RUN_RECORD = "run.json"
PENDING_PUSHES = "pending_pushes.json"


class NonFiniteStateError(ValueError):
    """Trained tensors hold NaN or Inf: they were not checkpointed, so the previous checkpoint
    stays the last good one."""


class Checkpoint(NamedTuple):
    """A mid-task checkpoint read back: ``path`` is its modules file, for error messages."""

    epoch: int
    tensors: dict[str, torch.Tensor]
    optim_state: dict
    path: Path


def task_dir(run: Path, task: int) -> Path:
    return run / f"task-{task}"


def finished_tasks(run: Path) -> int:
    """How many tasks are finished: the length of the run of ``task-0``, ``task-1``, ... folders."""
    count = 0
    while task_dir(run, count).is_dir():
        count += 1
    return count


def remove_leftovers(run: Path) -> None:
    """Remove what a killed run left half-written: hidden ``.task-K.*`` and ``.checkpoint-K-E.*``
    staging folders (and the ``..task-K.*`` ones an export stages beside them) and ``.*.tmp``
    files. Finished tasks and checkpoints are left alone."""
    for entry in run.glob(".*"):
        if entry.is_dir() and entry.name.lstrip(".").startswith(("task-", "checkpoint-")):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


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
            raise ValueError(
                f"{where}: the saved {name!r} state does not fit this run's {name}: it was written by a run with "
                f"another model, method or branch shape ({err})"
            ) from err


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}


def _verify(folder: Path, info: dict, record: Path, advice: str) -> None:
    """Check that every file ``record`` (whose contents are ``info``) lists is in ``folder`` with
    the recorded SHA-256."""
    if "files" not in info:
        log.warning("%s records no file digests (written by an older timm-branch): the files it names are parsed "
                    "and checked against the model, not against digests", record)
    check_digests(folder, info.get("files", {}), record, advice)


def write_task(run: Path, task: int, write_export, trainer_tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Assemble ``task-K`` in a temporary folder (``write_export(folder)`` writes the model) and
    rename it into place; ``task.json``, written last, records ``info`` and the files' digests."""
    final = task_dir(run, task)
    with staging_folder(final) as tmp:
        write_export(tmp)
        write_safetensors(tmp / TRAINER_STATE, trainer_tensors)
        atomic_write_json(tmp / TASK_INFO, {**info, "files": _digests(tmp)})
        os.rename(tmp, final)
    fsync_path(run)
    return final


def load_task(run: Path, task: int, backbone: nn.Module, kept: dict[str, nn.Module | None] | None = None) -> nn.Module:
    """Load finished task ``task`` into ``backbone`` (and its trainer state into ``kept``), every
    file checked; returns ``backbone``."""
    folder = task_dir(run, task)
    advice = f"restore {folder.name} from a backup, or delete it and every later task folder and resume to train again"
    _verify(folder, read_json(folder / TASK_INFO), folder / TASK_INFO, advice)
    load_exported(backbone, folder)
    if kept is not None:
        load_module_tensors(read_safetensors(folder / TRAINER_STATE), kept, folder / TRAINER_STATE)
    return backbone


def read_task_state(run: Path, task: int) -> dict[str, torch.Tensor]:
    return read_safetensors(task_dir(run, task) / TRAINER_STATE)


def write_checkpoint(run: Path, task: int, epoch: int, tensors: dict[str, torch.Tensor], optim_state: dict) -> Path:
    """Write the state after ``epoch`` of ``task`` and point ``checkpoint.json`` at it.

    Raises:
        NonFiniteStateError: a floating-point tensor holds NaN or Inf (nothing is written).
        WriteError: the disk is full or not writable; the previous checkpoint is intact.
    """
    bad = nonfinite_tensors(tensors)
    if bad:
        raise NonFiniteStateError(
            f"task {task}, epoch {epoch + 1}: {len(bad)} trained tensors hold NaN or Inf ({', '.join(bad[:5])}); "
            f"they were not checkpointed, so {run / POINTER} still names the last good state. Lower --lr"
        )
    folder = run / f"checkpoint-{task}-{epoch}"
    with staging_folder(folder) as tmp:
        write_safetensors(tmp / MODULES, tensors)
        write_torch_state(tmp / OPTIMIZER, optim_state)
        digests = _digests(tmp)
        if folder.exists():  # complete, but a kill came before the pointer named it: this epoch ran again
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    fsync_path(run)
    atomic_write_json(run / POINTER, {"task": task, "epoch": epoch, "folder": folder.name, "files": digests})
    for old in run.glob("checkpoint-*-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def read_checkpoint(run: Path, task: int) -> Checkpoint | None:
    """The newest checkpoint of ``task``, every file checked, or ``None`` if there is none."""
    pointer = run / POINTER
    if not pointer.is_file():
        return None
    info = read_json(pointer)
    if info.get("task") != task:
        return None
    folder = run / str(info.get("folder"))
    _verify(folder, info, pointer, f"delete {pointer} to train task {task} again from its first epoch")
    modules = folder / MODULES
    return Checkpoint(int(info["epoch"]), read_safetensors(modules), read_torch_state(folder / OPTIMIZER), modules)


def clear_checkpoints(run: Path) -> None:
    """Remove mid-task checkpoints (after a task is finished they are no longer needed)."""
    (run / POINTER).unlink(missing_ok=True)
    for old in run.glob("checkpoint-*-*"):
        shutil.rmtree(old, ignore_errors=True)


def record_run(run: Path, config: dict) -> None:
    """Record ``config`` (the resolved configuration, as plain values) as the one the run started with."""
    atomic_write_json(run / RUN_RECORD, {"config": config})


def check_unchanged(run: Path, config: dict, may_change: Collection[str]) -> None:
    """Refuse to resume ``run`` with a ``config`` that differs from the recorded one in a field
    outside ``may_change`` (a field whose change would not match the finished work); fields the
    record lacks (added by a later timm-branch) and runs without a record are not compared.

    Raises:
        ValueError: naming each changed field with its recorded and its new value.
    """
    path = run / RUN_RECORD
    if not path.is_file():
        return
    recorded = read_json(path).get("config")
    if not isinstance(recorded, dict):
        raise CorruptFileError(f"{path} holds no 'config' mapping: it is damaged; restore it from a backup")
    changed = [f"{name} from {recorded[name]!r} to {value!r}" for name, value in config.items()
               if name in recorded and name not in may_change and recorded[name] != value]
    if changed:
        raise ValueError(
            f"cannot resume {run}: its configuration changes {', '.join(changed)}, but its finished work was "
            f"trained with the values in {path}. Restore them in {run / 'config.yaml'}, or train a new run "
            "with --config and another --output")


def read_pending_pushes(run: Path) -> list[int]:
    """The tasks whose push to the Hub failed and is still to be made, oldest first."""
    path = run / PENDING_PUSHES
    if not path.is_file():
        return []
    tasks = read_json(path).get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, int) for t in tasks):
        raise CorruptFileError(f"{path} holds no list of task numbers under 'tasks': it is damaged; delete it "
                               "and push the tasks you need with timm-branch push RUN/task-K")
    return tasks


def write_pending_pushes(run: Path, tasks: list[int]) -> None:
    """Record ``tasks`` as still to be pushed (none: the record is removed)."""
    path = run / PENDING_PUSHES
    if tasks:
        atomic_write_json(path, {"tasks": sorted(tasks)})
    else:
        path.unlink(missing_ok=True)
