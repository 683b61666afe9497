"""Data-parallel training: two gloo ranks on the CPU compute what one process computes.

Every run starts from a saved ``test_resnet`` (``pretrained=local-dir:...``), so Branch-tuning
applies from task 0 and the backbone's BatchNorms stay frozen in eval mode throughout: per-rank
batch statistics cannot differ from one process's. (The SSL heads' BatchNorms see the gathered
global batch, so they need nothing.)

What differs from one process is rounding: the backbone's weight gradients are summed over 16
rows per rank, then over the ranks, instead of over 32 rows at once. The per-method cases run in
float64 from the augmented views on, so that the comparison sees the algorithm rather than
float32 rounding, which training amplifies. Measured in float32 after 4 to 8 steps: losses within
2e-5 (BYOL; SimCLR, MoCo and VICReg 1e-7), backbone weights within 6e-5, but the projector
BatchNorm bias of SwAV and BYOL off by up to 2e-2 of its largest entry; in float64 everything
agrees within 2e-13 (``TOL64``). The command-line case runs SimCLR as shipped, in float32
(``TOL32``): with LARS as the reference clips it (steps up to 1 / lr larger than before that
fix) training amplifies rounding there too, to 8.5e-5 of the projector bias after 8 steps
(measured 2026-12-03; 3e-7 before). A broken resume or a rank training other rows differs by
whole steps, orders of magnitude more.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.multiprocessing as mp
from PIL import Image

from timm_branch import add_branches, cli, save_pretrained
from timm_branch.train import checkpoint as ckpt
from timm_branch.train import distributed
from timm_branch.train.config import TrainConfig
from timm_branch.train.continual import ContinualRun

TOL64 = 1e-10
TOL32 = 1e-3
WORLD = 2
CASES = {  # in float64
    # SwAV (Sinkhorn over the batch, queue, prototypes) with CaSSLe's distiller (a predictor with
    # BatchNorm) and the online probe.
    "swav": dict(method="swav", strategy="cassle+branch", online_probe=True),
    "barlow": dict(method="barlow", strategy="branch", epochs=1),
    # The npz's images as a streamed folder of PNGs, decoded by one DataLoader worker per rank.
    "streamed": dict(method="simclr", strategy="branch", epochs=1, stream=True, workers=1),
}
STREAMED_IN_MEMORY = dict(method="simclr", strategy="branch", epochs=1)  # its one-process reference
SLOW_CASES = {  # the momentum networks (EMA), and MoCo's 65536-key queue (slow to checkpoint)
    "moco": dict(method="moco", strategy="cassle+branch", online_probe=True),
    "byol": dict(method="byol", strategy="cassle+branch"),
    "vicreg": dict(method="vicreg", strategy="branch"),
}
CLI_CASE = dict(method="simclr", strategy="branch")  # in float32, through the command line
CLI_CRASH_AT = 6  # task 1, epoch 2's first step: the run resumes from the mid-task checkpoint


class _Crash(Exception):
    """A simulated failure of every rank at the same step."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny labelled npz (4 classes, 128 training images of 16 x 16), the same images as a folder
    of PNGs in the same order, and a saved test_resnet to start from."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (128, 16, 16, 3), dtype=np.uint8), y_train=np.repeat(np.arange(4), 32),
                  x_test=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8), y_test=np.repeat(np.arange(4), 8))
    np.savez(root / "tiny.npz", **arrays)
    for split in ("train", "test"):
        for row, (pixels, label) in enumerate(zip(arrays[f"x_{split}"], arrays[f"y_{split}"])):
            (root / "tiny" / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "tiny" / split / str(label) / f"{row:03d}.png")
    torch.manual_seed(0)
    save_pretrained(timm.create_model("test_resnet", num_classes=0), root / "base")
    return root


def _config(data: Path, output: Path, **kwargs) -> TrainConfig:
    """2 tasks of 64 images, global batch 32, 2 epochs: 4 steps per task; the folder with ``stream``."""
    base = dict(model="test_resnet", data=[str(data / ("tiny" if kwargs.get("stream") else "tiny.npz"))], pretrained=f"local-dir:{data / 'base'}",
                image_size=16, batch_size=32, epochs=2, num_tasks=2, linear_probe=False, knn_k=5, device="cpu")
    return TrainConfig(**{**base, **kwargs, "output": str(output)})


def _argv(config: TrainConfig) -> list[str]:
    """``config`` as ``timm-branch train`` flags: the fields that differ from the defaults."""
    default, argv = TrainConfig(), ["train", "--no-progress"]
    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if value == getattr(default, field.name):
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


def _recording(step, losses: list[float], crash_at_step: int | None = None):
    """``step`` (``ContinualRun.train_step``, bound or not) appending every loss to ``losses``; raises
    :class:`_Crash` when step number ``crash_at_step`` (from 0) begins."""

    def recording(*args):
        if len(losses) == crash_at_step:
            raise _Crash
        loss = step(*args)
        losses.append(loss.item())
        return loss

    return recording


def _run(config: TrainConfig) -> list[float]:
    """Run ``config`` in float64 without evaluation; the loss of every step, in order."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the models and heads the run creates
    try:
        run = ContinualRun(config, progress=False)
        augment = run.augment
        run.augment = lambda *args, **kwargs: [v.double() for v in augment(*args, **kwargs)]  # float32 by design
        run.evaluate = lambda *args: None  # float32 features; the command-line case covers evaluation
        losses: list[float] = []
        run.train_step = _recording(run.train_step, losses)
        run.run()
        return losses
    finally:
        torch.set_default_dtype(previous)


def _cli(argv: list[str], losses: list[float], crash_at_step: int | None = None) -> str:
    """``timm-branch argv`` in this process, recording its step losses; returns what it printed."""
    original = ContinualRun.train_step
    ContinualRun.train_step = _recording(original, losses, crash_at_step)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert cli.main(argv) == 0
    finally:
        ContinualRun.train_step = original
    return printed.getvalue()


def _cli_case(data: Path, root: Path) -> None:
    """The command line on every rank, interrupted and resumed; losses and output in ``root/cli-<rank>.json``."""
    out = root / "cli"
    losses: list[float] = []
    with pytest.raises(_Crash):
        _cli(_argv(_config(data, out, **CLI_CASE)), losses, CLI_CRASH_AT)
    distributed.barrier()  # a real restart begins after rank 0's last checkpoint is written
    printed = _cli(["train", "--resume", str(out), "--no-progress"], losses)
    (root / f"cli-{distributed.rank()}.json").write_text(json.dumps({"losses": losses, "printed": printed}))


def _gather_gradient(root: Path) -> None:
    """Each rank's gradient of one global loss through gather_rows, saved for the parent to check."""
    x = torch.arange(24, dtype=torch.float64).reshape(8, 3).div(7).sin()[distributed.local_rows(8)].requires_grad_()
    gathered = distributed.gather_rows(x)
    (gathered.T @ gathered).pow(2).sum().backward()  # a loss coupling every row, like a cross-correlation
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, root / f"gather-{distributed.rank()}.pt")


def _sync_bn_refusal(data: Path, root: Path) -> None:
    try:
        ContinualRun(_config(data, root / "refused", sync_bn=True))
    except ValueError as err:
        (root / f"sync-bn-{distributed.rank()}.txt").write_text(str(err))


def _worker(rank: int, port: int, data: Path, root: Path, cases: dict, checks: bool) -> None:
    """Rank ``rank``: the float64 ``cases`` (losses in ``root/losses-<case>-<rank>.json``) and, with
    ``checks``, the gather, sync-BN and command-line checks, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")):
        for name, case in cases.items():
            losses = _run(_config(data, root / name, **case))
            (root / f"losses-{name}-{rank}.json").write_text(json.dumps(losses))
        if checks:
            _gather_gradient(root)
            _sync_bn_refusal(data, root)
            _cli_case(data, root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(data: Path, root: Path, cases: dict, checks: bool) -> Path:
    mp.spawn(_worker, args=(_free_port(), data, root, cases, checks), nprocs=WORLD, join=True)
    return root


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> Path:
    """The folder of the two-rank runs of CASES and the checks (one process group for all of them)."""
    return _spawn(data, tmp_path_factory.mktemp("ranks"), CASES, checks=True)


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _files(run: Path) -> set[str]:
    """The run's files, TensorBoard event files (named after time, host and process) as one name."""
    names = (p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    return {n.split("events.out.tfevents")[0] + "events" if "events.out.tfevents" in n else n for n in names}


def _assert_same_outputs(parallel: Path, single: Path, tol: float) -> None:
    """The same files; every saved tensor (merged backbones, heads, queues, momentum networks,
    probe) within ``tol`` of its largest entry."""
    assert _files(parallel) == _files(single)
    for task in range(2):
        for name in ("model.safetensors", ckpt.TRAINER_STATE):
            got = safetensors.torch.load_file(ckpt.task_dir(parallel, task) / name)
            want = safetensors.torch.load_file(ckpt.task_dir(single, task) / name)
            assert got.keys() == want.keys()
            for key, value in want.items():
                if value.is_floating_point():
                    assert _max_rel_err(got[key], value) <= tol, (task, name, key, _max_rel_err(got[key], value))
                else:
                    assert torch.equal(got[key], value), (task, name, key)


def _assert_same_losses(per_rank: list[list[float]], reference: list[float], tol: float) -> None:
    assert per_rank[0] == per_rank[1]  # every rank computes the global batch's loss
    assert len(per_rank[0]) == len(reference) > 0
    for got, want in zip(per_rank[0], reference):
        assert abs(got - want) <= tol * abs(want), (got, want)


def _check_case(data: Path, ranks: Path, single_root: Path, name: str, case: dict) -> None:
    reference = _run(_config(data, single_root / name, **case))
    per_rank = [json.loads((ranks / f"losses-{name}-{r}.json").read_text()) for r in range(WORLD)]
    _assert_same_losses(per_rank, reference, TOL64)
    _assert_same_outputs(ranks / name, single_root / name, TOL64)
    # One event file, rank 0's: rank 1 wrote none of its own.
    assert len(list((ranks / name / "tensorboard").iterdir())) == 1


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_train_what_one_process_trains(two_ranks, data, tmp_path, name):
    """Each case against one process; the streamed folder against one process holding the npz in
    memory (each rank decodes only its half of every batch)."""
    _check_case(data, two_ranks, tmp_path, name, STREAMED_IN_MEMORY if name == "streamed" else CASES[name])


@pytest.mark.slow
def test_two_ranks_match_one_process_for_every_other_method(data, tmp_path):
    ranks = _spawn(data, tmp_path / "ranks", SLOW_CASES, checks=False)
    for name, case in SLOW_CASES.items():
        _check_case(data, ranks, tmp_path / "single", name, case)


@pytest.mark.slow
def test_two_compiled_ranks_match_one_eager_process(data, tmp_path):
    """``compile`` under DDP: torch.compile of the DistributedDataParallel encoder (aot_eager, which
    runs eager's kernels) on both ranks, against one eager process."""
    case = dict(method="byol", strategy="branch", epochs=1)
    ranks = _spawn(data, tmp_path / "ranks", {"compiled": {**case, "compile": "aot_eager"}}, checks=False)
    reference = _run(_config(data, tmp_path / "single" / "compiled", **case))
    per_rank = [json.loads((ranks / f"losses-compiled-{r}.json").read_text()) for r in range(WORLD)]
    _assert_same_losses(per_rank, reference, TOL64)
    _assert_same_outputs(ranks / "compiled", tmp_path / "single" / "compiled", TOL64)


def test_command_line_on_two_ranks_resumes_and_matches_one_process(two_ranks, data, tmp_path):
    run = ContinualRun(_config(data, tmp_path / "single", **CLI_CASE), progress=False)
    reference: list[float] = []
    run.train_step = _recording(run.train_step, reference)
    run.run()
    saved = [json.loads((two_ranks / f"cli-{r}.json").read_text()) for r in range(WORLD)]
    _assert_same_losses([s["losses"] for s in saved], reference, TOL32)
    assert saved[0]["printed"].count("final model:") == 1 and saved[1]["printed"] == ""  # rank 0 alone prints
    _assert_same_outputs(two_ranks / "cli", tmp_path / "single", TOL32)


def test_gather_rows_gradient_gives_the_one_process_gradient_after_averaging(two_ranks):
    x = torch.arange(24, dtype=torch.float64).reshape(8, 3).div(7).sin().requires_grad_()
    (x.T @ x).pow(2).sum().backward()
    for r in range(WORLD):
        part = torch.load(two_ranks / f"gather-{r}.pt")
        assert torch.equal(part["gathered"], x.detach())  # every rank holds the global batch, in rank order
        # The summed backward gives WORLD x this rank's share; DDP's average over the ranks divides it back.
        torch.testing.assert_close(part["grad"], WORLD * x.grad[r * 4:(r + 1) * 4], rtol=1e-12, atol=0)


def test_sync_bn_on_cpu_ranks_is_refused_with_the_reason(two_ranks):
    for r in range(WORLD):
        assert "sync_bn needs GPUs" in (two_ranks / f"sync-bn-{r}.txt").read_text()


@pytest.mark.parametrize("policy", [None, "affine", "frozen"])
def test_sync_bn_round_trip_keeps_classes_state_and_outputs(policy):
    """On one process a SyncBatchNorm computes what the layer it replaces computes, in train mode
    (batch statistics); layers the frozen policy pins in eval mode (and folds into their convs) are
    left as they are; afterwards the classes are back."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=0)  # BatchNormAct2d layers (BN + activation)
    if policy:
        add_branches(model, bn=policy)
    model.train()
    twin = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    x = torch.rand(4, 3, 32, 32)
    with distributed.synced_batchnorm(model, None):
        synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert len(synced) == (0 if policy == "frozen" else len(norms)) and all(m.training for m in synced)
        out = model(x)
    torch.testing.assert_close(out, twin(x), rtol=0, atol=0)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    state = twin.state_dict()
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics included


def test_sync_bn_run_exports_what_plain_timm_loads(data, tmp_path):
    """A sync_bn run (one process, fine-tuning: BatchNorm in train mode) trains the same weights and
    exports the stock layout."""
    finetune = dict(strategy="finetune", pretrained=None, epochs=1)
    plain = ContinualRun(_config(data, tmp_path / "plain", **finetune), progress=False).run()
    synced = ContinualRun(_config(data, tmp_path / "synced", sync_bn=True, **finetune), progress=False).run()
    assert (synced / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    model = timm.create_model(f"local-dir:{synced}", pretrained=True)
    assert model.state_dict().keys() == timm.create_model("test_resnet", num_classes=0).state_dict().keys()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_one_process_is_left_as_it_is(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    module = torch.nn.Linear(2, 2)
    x = torch.rand(4, 2)
    with distributed.process_group(torch.device("cpu")):
        assert not torch.distributed.is_initialized()
        assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
        assert distributed.local_rows(32) == slice(0, 32)
        assert distributed.gather_rows(x) is x
        assert distributed.data_parallel(module, torch.device("cpu")) is module
        assert distributed.local_world_size() == 1


def test_the_ranks_of_a_machine_share_its_cores_for_decoding(monkeypatch):
    from timm_branch.data import default_workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's: two machines of four ranks
    assert distributed.local_world_size() == 4
    assert default_workers(4) == max(1, min(8, cores // 4)) and default_workers(10**6) == 1
    assert default_workers() == min(8, cores)


def test_batch_must_split_evenly_over_the_ranks(data, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch_size=32 is the global batch; it must be a multiple of the 3 processes"):
        ContinualRun(_config(data, tmp_path / "run"))


@pytest.mark.slow
def test_torchrun_command_matches_one_process(data, tmp_path):
    """The documented command: ``torchrun --nproc_per_node 2 -m timm_branch train ...`` as a subprocess."""
    out = tmp_path / "torchrun"
    config = _config(data, out, **CLI_CASE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "timm_branch", *_argv(config)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("final model:") == 1
    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 1 wrote no event file of its own
    single = ContinualRun(dataclasses.replace(config, output=str(tmp_path / "single")), progress=False).run()
    _assert_same_outputs(out, single.parent, TOL32)
