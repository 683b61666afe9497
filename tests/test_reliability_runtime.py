"""Faults while a run trains: NaN/Inf losses and weights, a full disk, GPU out-of-memory.

Each test injects the fault into the tiny run (see ``_faults.py``) and checks the error, that the
last good checkpoint and the finished tasks stay intact, and, where the run can go on, that it
resumes to the weights of an uninterrupted run. Refusing to merge non-finite branches is tested
at the source: test_surgery::test_non_finite_branch_refused_before_anything_changes.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import timm
import torch

from _faults import tiny_config, tiny_images
from timm_branch import cli, save_pretrained
from timm_branch.train import checkpoint as ckpt
from timm_branch.train import continual
from timm_branch.train.continual import ContinualRun, NonFiniteLossError


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return tiny_images(tmp_path_factory.mktemp("images") / "images.npz")


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The run folder of the uninterrupted tiny run (one thread, like every run here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ContinualRun(tiny_config(tmp_path_factory.mktemp("reference") / "run", images), progress=False).run().parent
    finally:
        torch.set_num_threads(threads)


def _assert_same_final_weights(run: Path, reference: Path) -> None:
    for name in ("model.safetensors", ckpt.TRAINER_STATE):
        assert (run / "task-1" / name).read_bytes() == (reference / "task-1" / name).read_bytes(), name


def _assert_intact(run: Path, tasks: int, checkpoint: tuple[int, int] | None) -> None:
    """``tasks`` finished tasks that load, the checkpoint ``(task, epoch)`` readable, no temporary entry."""
    assert ckpt.finished_tasks(run) == tasks
    for task in range(tasks):
        ckpt.load_task(run, task, timm.create_model("test_resnet", num_classes=0))  # checks every file
    if checkpoint is not None:
        assert ckpt.read_checkpoint(run, checkpoint[0]).epoch == checkpoint[1]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


class Steps:
    """Counts training steps (1-based over the run) and injects faults at chosen ones."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        self.nan_loss: set[int] = set()
        self.unchanged: list[bool] = []  # per NaN-loss step: were the parameters left as they were?
        step, features = ContinualRun.train_step, continual.features

        def counted_step(run, learner, *args):
            self.count += 1
            before = [p.detach().clone() for p in self._parameters(learner)]
            loss = step(run, learner, *args)
            if self.count in self.nan_loss:
                self.unchanged.append(all(torch.equal(a, b) for a, b in zip(before, self._parameters(learner))))
            return loss

        def poisoned(backbone, batch):  # the real forward, then NaN features: the loss is NaN
            out = features(backbone, batch)
            return out * float("nan") if self.count in self.nan_loss else out

        monkeypatch.setattr(ContinualRun, "train_step", counted_step)
        monkeypatch.setattr(continual, "features", poisoned)

    @staticmethod
    def _parameters(learner) -> list[torch.Tensor]:
        return [*learner.backbone.parameters(), *learner.method.parameters()]


def test_nan_loss_stops_the_task_and_the_last_checkpoint_resumes_to_the_same_weights(images, reference, tmp_path, monkeypatch,
                                                                                      one_thread):
    steps = Steps(monkeypatch)
    steps.nan_loss = {7}  # task 1, epoch 2, step 1
    config = tiny_config(tmp_path / "run", images)
    stopped = r"task 1, epoch 2, step 1: the loss is nan; the task stopped, the last checkpoint is intact"
    with pytest.raises(NonFiniteLossError, match=stopped):
        ContinualRun(config, progress=False).run()
    _assert_intact(tmp_path / "run", tasks=1, checkpoint=(1, 0))
    steps.nan_loss = set()
    ContinualRun(config, progress=False).run(resume=True)
    _assert_same_final_weights(tmp_path / "run", reference)


def test_skip_leaves_out_the_update_logs_it_and_finishes(images, tmp_path, monkeypatch, caplog, one_thread):
    steps = Steps(monkeypatch)
    steps.nan_loss = {2, 5}  # task 0 epoch 1 step 2, task 1 epoch 1 step 1
    with caplog.at_level(logging.WARNING, logger="timm_branch.train"):
        ContinualRun(tiny_config(tmp_path / "run", images, nonfinite="skip"), progress=False).run()
    skipped = [r.getMessage() for r in caplog.records if "update was skipped" in r.getMessage()]
    assert skipped == [f"task {t}, epoch 1, step {s}: the loss is nan; the update was skipped (1 in a row, the task stops at 10)"
                       for t, s in ((0, 2), (1, 1))]
    assert steps.unchanged == [True, True]  # no optimiser step
    _assert_intact(tmp_path / "run", tasks=2, checkpoint=None)


def test_skipping_stops_after_too_many_nonfinite_steps_in_a_row(images, tmp_path, monkeypatch, one_thread):
    steps = Steps(monkeypatch)
    steps.nan_loss = {1, 2}
    config = tiny_config(tmp_path / "run", images, nonfinite="skip", nonfinite_limit=2)
    limit = r"task 0, epoch 1, step 2: the loss is nan \(2 non-finite steps in a row, --nonfinite-limit 2\)"
    with pytest.raises(NonFiniteLossError, match=limit):
        ContinualRun(config, progress=False).run()
    _assert_intact(tmp_path / "run", tasks=0, checkpoint=None)


def test_nonfinite_weights_are_never_checkpointed(images, tmp_path, monkeypatch, one_thread):
    """A finite loss whose update made a weight NaN: the epoch's checkpoint is refused, the previous one stays."""
    step = ContinualRun.train_step
    count = 0

    def diverging_step(run, learner, *args):
        nonlocal count
        count += 1
        loss = step(run, learner, *args)
        if count == 4:  # task 0's last step
            with torch.no_grad():
                learner.backbone.conv1[0].weight[0, 0, 0, 0] = float("inf")
        return loss

    monkeypatch.setattr(ContinualRun, "train_step", diverging_step)
    refused = r"task 0, epoch 2: 1 trained tensors hold NaN or Inf \(backbone.conv1.0.weight\)"
    with pytest.raises(ckpt.NonFiniteStateError, match=refused):
        ContinualRun(tiny_config(tmp_path / "run", images), progress=False).run()
    _assert_intact(tmp_path / "run", tasks=0, checkpoint=(0, 0))


def test_export_refuses_nonfinite_weights(tmp_path):
    model = timm.create_model("test_resnet", num_classes=0)
    with torch.no_grad():
        model.conv1[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to export .* NaN or Inf \(1 tensors: conv1.0.weight\)"):
        save_pretrained(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def _fill_disk_at(monkeypatch, run: Path, name: str, n: int) -> None:
    """From the ``n``-th write of a file named like ``name`` inside ``run`` on, the disk is full:
    that write stores half its bytes, then it and every later write into ``run`` fail with ENOSPC."""
    original, seen, full = os.write, 0, False

    def write(fd, data):
        nonlocal seen, full
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.startswith(str(run)):
            seen += name in os.path.basename(path)
            if not full and seen == n:
                full = True
                original(fd, memoryview(data)[: len(data) // 2])
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd, data)

    monkeypatch.setattr(os, "write", write)


DISK_FULL = [
    # (file, n, what the error names, the checkpoint that must stay: (task, epoch))
    pytest.param("model.safetensors", 2, "task-1 (model.safetensors)", (1, 1), id="exporting-task-1"),
    pytest.param("modules.safetensors", 4, "checkpoint-1-1 (modules.safetensors)", (1, 0), id="checkpointing-task-1"),
]


@pytest.mark.parametrize("name, n, target, checkpoint", DISK_FULL)
def test_full_disk_is_a_clear_error_that_loses_nothing(images, reference, tmp_path, monkeypatch, capsys, one_thread,
                                                       name, n, target, checkpoint):
    run = tmp_path / "run"
    (tmp_path / "config.yaml").write_text(tiny_config(run, images).to_yaml())
    _fill_disk_at(monkeypatch, run, name, n)
    assert cli.main(["train", "--config", str(tmp_path / "config.yaml"), "--no-progress"]) == 2
    assert (f"timm-branch: error: cannot write {run / target}: No space left on device; nothing was replaced "
            "and no temporary file is left") in capsys.readouterr().err
    _assert_intact(run, tasks=1, checkpoint=checkpoint)
    monkeypatch.undo()  # space was freed
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_final_weights(run, reference)


def test_out_of_memory_names_the_batch_size(images, tmp_path, monkeypatch):
    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ContinualRun, "train_step", no_memory)
    with pytest.raises(torch.OutOfMemoryError, match=(
            r"task 0, epoch 1, step 1: out of memory training a batch of batch_size=16 .* Lower --batch-size \(e.g. 8\) "
            r"or use --precision bf16; the last checkpoint is intact. \[CUDA out of memory")):
        ContinualRun(tiny_config(tmp_path / "run", images), progress=False).run()
