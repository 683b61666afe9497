"""The run folder under misuse: a resume trains the folder it is given, wherever it lies; one
process at a time writes a run; a resume refuses a configuration that no longer matches the
finished work; a failing Hub does not stop training, and the pushes it missed are made later."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _faults import tiny_config
from hub_server import hub_server  # noqa: F401 - fixture
from test_reliability_files import _copy, base  # noqa: F401 - fixture: task 0 finished, task 1 checkpointed
from timm_branch import cli
from timm_branch.train import checkpoint as ckpt
from timm_branch.train.continual import ContinualRun
from timm_branch.train.lock import LOCK_NAME, RunFolderLockedError

TOKEN = "hf_runReliabilityToken0123456"


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _edit_config(run: Path, **changes) -> None:
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))


@pytest.mark.parametrize("recorded", ["old-absolute-path", "relative-default"])
def test_resume_trains_the_folder_it_is_named_wherever_it_lies(base, tmp_path, monkeypatch, recorded):  # noqa: F811
    old = _copy(base, tmp_path)
    _edit_config(old, output=str(old) if recorded == "old-absolute-path" else "runs/default", eval_batch_size=128)
    moved = old.rename(tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["train", "--resume", str(moved), "--no-progress"]) == 0
    assert not old.exists() and not (elsewhere / "runs").exists()  # nothing trained at the recorded path
    assert ckpt.finished_tasks(moved) == 2
    assert yaml.safe_load((moved / "config.yaml").read_text())["output"] == str(moved)


@pytest.mark.parametrize("changes, named", [
    (dict(seed=1), ["seed from 0 to 1"]),
    (dict(num_tasks=3, epochs=3), ["num_tasks from 2 to 3", "epochs from 2 to 3"]),
    (dict(norms=["batch", "layer"], through=["shape"]), ["norms from ['batch'] to ['batch', 'layer']",
                                                          "through from ['shape', 'act'] to ['shape']"]),
])
def test_resume_refuses_a_config_change_that_invalidates_the_finished_work(base, tmp_path, capsys, changes, named):  # noqa: F811
    run = _copy(base, tmp_path)
    _edit_config(run, **changes)
    before = _files(run)
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-branch: error: cannot resume") and all(n in err for n in named), err
    assert _files(run) == before  # nothing was written


def _live_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _plant_lock(run: Path, pid: int, host: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(f'{{"pid": {pid}, "host": "{host or socket.gethostname()}"}}')


@pytest.mark.parametrize("where", ["this host", "another host"])
def test_a_second_process_on_one_run_folder_fails_at_once(base, tmp_path, where):  # noqa: F811
    run = _copy(base, tmp_path)
    holder = _live_process()
    try:
        _plant_lock(run, holder.pid if where == "this host" else 1, None if where == "this host" else "elsewhere.example")
        before = _files(run)
        with pytest.raises(RunFolderLockedError, match=r"is in use by another timm-branch process \(pid \d+ on "):
            ContinualRun(tiny_config(run, base[1], seed=1), progress=False).run(resume=True)
        assert _files(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_on_exit(base, tmp_path, caplog):  # noqa: F811
    run = _copy(base, tmp_path)
    gone = _live_process()
    gone.kill()
    gone.wait()  # its pid now names no process
    _plant_lock(run, gone.pid)
    with caplog.at_level(logging.WARNING):
        ContinualRun(tiny_config(run, base[1]), progress=False).run(resume=True)
    assert f"taking over a stale lock of pid {gone.pid}" in caplog.text
    assert ckpt.finished_tasks(run) == 2 and not (run / LOCK_NAME).exists()


def test_a_failing_hub_does_not_stop_training_and_missed_pushes_are_made_later(base, tmp_path, hub_server, monkeypatch,  # noqa: F811
                                                                               caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = _copy(base, tmp_path)
    _edit_config(run, push_to_hub="org/lineage")
    hub_server.fail(500, count=100, path_contains="/commit/")  # every commit fails
    with caplog.at_level(logging.WARNING):
        assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert ckpt.finished_tasks(run) == 2  # training went on
    assert ckpt.read_pending_pushes(run) == [1]
    assert "tasks 1 are not on the Hub" in caplog.text

    hub_server.clear_faults()
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0  # nothing left to train: the push is retried
    assert hub_server.files("org/lineage")["model.safetensors"] == (run / "task-1" / "model.safetensors").read_bytes()
    assert ckpt.read_pending_pushes(run) == [] and not (run / ckpt.PENDING_PUSHES).exists()


def test_pushes_missed_are_retried_in_order_at_the_next_task_end(base, tmp_path, hub_server, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = _copy(base, tmp_path)
    ckpt.write_pending_pushes(run, [0])  # task 0's push failed in the run's first process
    _edit_config(run, push_to_hub="org/ordered")
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    messages = [c.message for c in hub_server.repos["org/ordered"].history()][::-1]
    assert [m for m in messages if m.startswith("timm-branch")] == [
        "timm-branch: task 0 (branch, simclr)", "timm-branch: task 1 (branch, simclr)"]
    assert not (run / ckpt.PENDING_PUSHES).exists()
