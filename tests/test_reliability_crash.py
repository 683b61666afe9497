"""Crash and resume: a run killed with SIGKILL anywhere resumes, with ``--resume``, to the same
final weights as an uninterrupted run (CPU, same seed), and never leaves a half-written task
folder that looks finished.

Every run here is a child forked by one ``tests/_faults.py --serve`` process (see there), so that
the kills are real SIGKILLs of a real ``timm-branch train`` and the imports are paid once.
"""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch

from _faults import tiny_config, tiny_images
from timm_branch._io import sha256_file
from timm_branch.train import checkpoint as ckpt

FAULTS = Path(__file__).with_name("_faults.py")
KILLED = -signal.SIGKILL
JOB_TIMEOUT = 600  # seconds a job may take before the test fails instead of hanging

# (point, n): where the fault fires in the tiny run (two tasks x two epochs x two steps; no
# branches in task 0, so the first merge is task 1's). Each leaves task 0 finished, task 1 not.
# The four kinds the issue names run in the default tier, the finer points in the slow one.
POINTS = [
    pytest.param("step", 8, id="mid-epoch"),                       # task 1, epoch 2, step 2: a checkpoint of epoch 1 exists
    pytest.param("write:optim.pt", 4, id="writing-checkpoint"),    # task 1, epoch 2's checkpoint, half written
    pytest.param("merge", 1, id="merging"),                        # task 1 trained, its branches being merged
    pytest.param("write:model.safetensors", 2, id="exporting"),    # task 1's model.safetensors, half written
    pytest.param("write:checkpoint.json", 4, id="writing-pointer",  # epoch 2's folder complete, the pointer half written
                 marks=pytest.mark.slow),
    pytest.param("write:task.json", 2, id="finishing-task-folder",  # task 1's folder complete but for task.json
                 marks=pytest.mark.slow),
    pytest.param("finished", 1, id="task-folder-in-place",         # task-0/ renamed in; checkpoints and metrics not yet
                 marks=pytest.mark.slow),
]


class Forker:
    """The ``_faults.py --serve`` process: runs jobs in forked children, one at a time."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        # Unbuffered: select() then sees every answer line the server has written.
        self.proc = subprocess.Popen([sys.executable, str(FAULTS), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)

    def start(self, point: str, n: int, *args: str) -> tuple[int, Path]:
        """Fork a child running ``timm-branch ARGS`` with the fault armed; returns its pid and log."""
        self.count += 1
        log = self.logs / f"job-{self.count}.log"
        self.proc.stdin.write(json.dumps({"argv": [point, str(n), "--", *args], "log": str(log)}).encode() + b"\n")
        return int(self._answer("pid")), log

    def wait(self) -> int:
        """The exit code of the running child (``-9``: killed by SIGKILL)."""
        return int(self._answer("exit"))

    def run(self, point: str, n: int, *args: str) -> tuple[int, str]:
        """Run a child to its end; returns its exit code and output."""
        _, log = self.start(point, n, *args)
        code = self.wait()
        return code, log.read_text()

    def _answer(self, key: str) -> str:
        if not select.select([self.proc.stdout], [], [], JOB_TIMEOUT)[0]:
            self.proc.kill()
            pytest.fail(f"the fault server gave no {key!r} answer within {JOB_TIMEOUT} s")
        line = self.proc.stdout.readline().decode()
        assert line.startswith(key + " "), f"the fault server stopped (answered {line!r})"
        return line.split()[1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    server = Forker(tmp_path_factory.mktemp("fault-logs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The tiny run's configuration file and images."""
    folder = tmp_path_factory.mktemp("setting")
    config = tiny_config(folder / "unused", tiny_images(folder / "images.npz"))
    (folder / "config.yaml").write_text(config.to_yaml())
    return folder / "config.yaml"


def _train(config: Path, run: Path) -> list[str]:
    return ["train", "--config", str(config), "--output", str(run), "--no-progress"]


def _resume(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--no-progress"]


@pytest.fixture(scope="module")
def reference(forker, setting, tmp_path_factory) -> Path:
    """The run folder of the uninterrupted tiny run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    code, log = forker.run("none", 0, *_train(setting, run))
    assert code == 0, log
    return run


def _leftovers(run: Path) -> list[str]:
    """Temporary entries and mid-task checkpoints: what a finished run must not hold."""
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".", "checkpoint")))


def _assert_task_folders_complete(run: Path) -> None:
    """Every ``task-K`` holds exactly the files its task.json lists, with the recorded digests."""
    for folder in run.glob("task-*"):
        info = json.loads((folder / ckpt.TASK_INFO).read_text())
        assert {p.name for p in folder.iterdir()} == {*info["files"], ckpt.TASK_INFO}, folder
        for name, digest in info["files"].items():
            assert sha256_file(folder / name) == digest, folder / name
        safetensors.torch.load_file(folder / "model.safetensors")


def _assert_same_tasks(run: Path, reference: Path) -> None:
    """Both runs hold the same task folders, byte for byte (weights, trainer state, config, card)."""
    for folder in reference.glob("task-*"):
        ours = run / folder.name
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in folder.iterdir())
        for path in folder.iterdir():
            assert (ours / path.name).read_bytes() == path.read_bytes(), f"{path.name} of {folder.name} differs"


@pytest.mark.parametrize("point, n", POINTS)
def test_sigkill_then_resume_reaches_the_uninterrupted_weights(point, n, forker, setting, reference, tmp_path):
    run = tmp_path / "run"
    code, log = forker.run(point, n, *_train(setting, run))
    assert code == KILLED, f"the fault {point} #{n} did not fire:\n{log}"
    assert ckpt.finished_tasks(run) == 1  # task 1 is not marked finished, whatever state it was in
    _assert_task_folders_complete(run)
    if point.startswith("write:"):
        assert _leftovers(run), "the kill in mid-write left no partial file to clean up"

    code, log = forker.run("none", 0, *_resume(run))
    assert code == 0, log
    _assert_same_tasks(run, reference)
    assert _leftovers(run) == []


@pytest.mark.slow
def test_kills_at_random_moments_then_resume_reach_the_uninterrupted_weights(forker, setting, tmp_path):
    """Up to five kills at seeded random moments of one run (BYOL, CaSSLe + branches: momentum
    network, distiller and frozen teacher), each followed by a resume; the last resume runs to the end."""
    config = tmp_path / "byol.yaml"
    text = setting.read_text().replace("method: simclr", "method: byol")
    config.write_text(text.replace("strategy: branch", "strategy: cassle+branch"))
    reference, run = tmp_path / "reference", tmp_path / "run"
    _, log = forker.start("none", 0, *_train(config, reference))
    started = time.perf_counter()  # the child is running: the server's imports are not counted
    assert forker.wait() == 0, log.read_text()
    duration = time.perf_counter() - started
    delays, kills = random.Random(0), 0
    while kills < 5:
        args = _resume(run) if (run / "config.yaml").is_file() else _train(config, run)
        pid, log = forker.start("none", 0, *args)
        time.sleep(delays.uniform(0.05, 0.5) * duration)  # within the work a resume has left, mostly
        try:
            _kill_if_running(pid)
        finally:
            code = forker.wait()
        assert code in (KILLED, 0), log.read_text()
        _assert_task_folders_complete(run)
        if code == 0:  # the run ended before the kill
            break
        kills += 1
    assert kills >= 2
    code, log = forker.run("none", 0, *_resume(run))
    assert code == 0, log
    _assert_same_tasks(run, reference)
    assert _leftovers(run) == []


def _kill_if_running(pid: int) -> None:
    """SIGKILL ``pid`` (a child of the fault server) unless it has already ended."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
