"""Every example runs (in its --smoke mode) as a user would run it: as a script, in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
from PIL import Image

import timm_branch
from timm_branch.train.config import TrainConfig
from hub_server import client_env, hub_server  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
# One OpenMP thread: on a busy 2-core machine two threads spin-wait for each other (see conftest's
# one_thread); offline, so that no example can quietly download anything.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_example(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    """Run ``examples/<script>`` with ``args`` (in ``cwd``); assert it succeeds and return its stdout lines."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                            capture_output=True, text=True, env=env or ENV, timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def write_images(folder: Path, classes: int = 4, train: int = 6, test: int = 3) -> Path:
    """Tiny PNGs: ``folder/train/<class>/`` and ``folder/test/<class>/``, classes of growing brightness;
    with ``test=0``, a flat unlabeled folder of ``classes * train`` images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            out = folder if test == 0 else folder / split / f"class{c}"
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (20, 24, 3), dtype=np.uint8) + np.uint8(30 * c)
                Image.fromarray(pixels).save(out / f"{split}-{c}-{i}.png")
    return folder


def test_quickstart_smoke(tmp_path):
    out = tmp_path / "quickstart"
    lines = run_example("quickstart.py", "--smoke", "--out", str(out))
    assert lines[-1] == f'timm.create_model("local-dir:{out}", pretrained=True)'
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("script", ["quickstart.py", "own_images.py", "hub_lineage.py", "cka_analysis.py"])
def test_smoke_needs_no_other_argument(tmp_path, script):
    """``python examples/X.py --smoke`` alone runs offline on data it makes itself; its temporary
    folders go to TMPDIR, and only quickstart's documented ``out/`` lands in the current folder."""
    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    lines = run_example(script, "--smoke", env={**ENV, "TMPDIR": str(scratch)}, cwd=cwd)
    assert lines[-1].startswith(('timm.create_model("local-dir:', "wrote "))
    assert [p.name for p in cwd.iterdir()] == (["out"] if script == "quickstart.py" else [])


@pytest.fixture(scope="module")
def own_images_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """examples/own_images.py on class folders, from a local checkpoint: (run folder, stdout lines)."""
    tmp = tmp_path_factory.mktemp("own-images")
    start = timm_branch.save_pretrained(timm.create_model("test_resnet", num_classes=0), tmp / "start")
    run_dir = tmp / "run"
    lines = run_example("own_images.py", "--images", str(write_images(tmp / "images")), "--pretrained",
                        f"local-dir:{start}", "--output", str(run_dir), "--smoke")
    return run_dir, lines


def test_own_images_trains_task_after_task_from_a_local_checkpoint(own_images_run):
    run_dir, lines = own_images_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["meta"]["scenario"] == "class" and [r["task"] for r in metrics["rows"]] == [0, 1]
    assert all(r["linear_top1"] is not None for r in metrics["rows"])
    assert (run_dir / "accuracy_curves.png").is_file() and (run_dir / "accuracy_matrix.png").is_file()
    assert any(line.startswith("| branch | 2/2 |") for line in lines)  # the printed report
    config = json.loads((run_dir / "task-1" / "config.json").read_text())
    assert len(config["timm_branch"]["history"]) == 2  # from pretrained weights, task 0 is branch-tuned too
    model = eval(lines[-1], {"timm": timm})  # the printed line, with plain timm
    assert lines[-1] == f'timm.create_model("local-dir:{run_dir / "task-1"}", pretrained=True)'
    weights = safetensors.torch.load_file(run_dir / "task-1" / "model.safetensors")
    assert all((model.state_dict()[k] == v).all() for k, v in weights.items())


@pytest.mark.slow  # a third path through the same example: ~20 s of imports and training
def test_own_images_on_a_flat_unlabeled_folder_from_scratch_streamed(tmp_path):
    images = write_images(tmp_path / "flat", train=4, test=0)
    lines = run_example("own_images.py", "--images", str(images), "--model", "test_resnet",
                        "--output", str(tmp_path / "run"), "--smoke", "--stream")
    assert "stream: true" in (tmp_path / "run" / "config.yaml").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["meta"]["scenario"] == "data" and len(metrics["rows"]) == 2
    assert lines[-2].startswith("no evaluation") and (tmp_path / "run" / "task-1" / "model.safetensors").is_file()


def test_cka_analysis_of_two_checkpoints(own_images_run, tmp_path):
    run_dir, _ = own_images_run
    lines = run_example("cka_analysis.py", str(run_dir), "--output", str(tmp_path / "cka"), "--smoke")
    saved = json.loads((tmp_path / "cka" / "cka.json").read_text())
    stability = saved["curves"]["stability"]
    assert {"conv", "bn"} <= set(stability["types"]) and len(stability["values"]) == 2  # 2 repeats
    assert (tmp_path / "cka" / "cka.png").is_file()
    assert lines[0].startswith("stability: mean CKA per layer type: conv")


def test_hub_lineage_pushed_on_one_machine_continues_on_another(tmp_path, hub_server):  # noqa: F811
    images = str(write_images(tmp_path / "images"))
    common = ["--repo-id", "org/lineage", "--data", images, "--smoke"]
    token = {"HF_TOKEN": "hf_exampleLoopbackToken0123", "OMP_NUM_THREADS": "1"}
    # Two machines: separate Hugging Face caches, only the Hub in common.
    run_example("hub_lineage.py", *common, "--model", "test_resnet", "--output", str(tmp_path / "a"),
                env=client_env(hub_server.url, tmp_path / "hf-a", **token))
    first = hub_server.files("org/lineage")["model.safetensors"]
    assert first == (tmp_path / "a" / "task-1" / "model.safetensors").read_bytes()

    lines = run_example("hub_lineage.py", *common, "--continue", "--num-tasks", "1", "--output", str(tmp_path / "b"),
                        env=client_env(hub_server.url, tmp_path / "hf-b", **token))
    files = hub_server.files("org/lineage")
    assert files["model.safetensors"] == (tmp_path / "b" / "task-0" / "model.safetensors").read_bytes() != first
    assert "trainer_state.safetensors" not in files and b"## Task history" in files["README.md"]
    assert b"`org/lineage` on the Hugging Face Hub" in files["README.md"]  # machine B started from the Hub
    assert lines[-1] == 'timm.create_model("hf-hub:org/lineage", pretrained=True)'


CIFAR100 = ROOT.parent / "shared" / "data" / "cifar100.npz"


def test_cifar100_protocol_smoke_needs_no_data_and_summarises_seeds(tmp_path):
    """The prepared GPU command's script, as --smoke runs it with no other input: its own random
    CIFAR-shaped data, two seeds, and the paired-difference summary over them."""
    out = tmp_path / "protocol"
    stdout = "\n".join(run_example("cifar100_protocol.py", "--smoke", "--seeds", "0", "1", "--runs", "finetune", "branch",
                                    "--variant", "branch-full:strategy=branch,shape=full", "--output", str(out)))
    for seed in (0, 1):
        for name in ("finetune", "branch", "branch-full"):
            assert (out / f"seed-{seed}" / name / "task-1" / "model.safetensors").is_file(), (seed, name)
        assert TrainConfig.from_yaml(out / f"seed-{seed}" / "branch-full" / "config.yaml").shape == "full"
    summary = (out / "summary.md").read_text()
    assert "| branch (2) |" in summary and "| branch - finetune |" in summary and summary in stdout + "\n"
    assert "| branch-full - finetune |" in summary
    pair = json.loads((out / "summary.json").read_text())["pairs"]["branch - finetune"]["linear_final"]
    assert pair["n"] == 2 and pair["low"] <= pair["mean"] <= pair["high"]


@pytest.mark.skipif(not CIFAR100.is_file(), reason=f"CIFAR-100 not found at {CIFAR100} (../shared/data is not part of a clone)")
def test_cifar100_protocol_smoke_on_real_images(tmp_path):
    out = tmp_path / "protocol"
    stdout = "\n".join(run_example("cifar100_protocol.py", "--data", str(CIFAR100), "--smoke", "--output", str(out)))
    for strategy in ("finetune", "branch", "branch-paper", "cassle", "cassle-branch", "joint"):
        assert (out / "seed-0" / strategy / "task-1" / "model.safetensors").is_file(), strategy
    table = stdout[stdout.index("| run"):]
    assert all(name in table for name in ("finetune", "branch", "cassle", "cassle+branch", "joint", "cross-pair"))
    assert (out / "seed-0" / "report" / "accuracy_curves.png").is_file()
    subset = np.load(next((out / "data").glob("*.npz")))
    assert subset["x_train"].shape == (1000, 32, 32, 3) and subset["x_test"].shape == (400, 32, 32, 3)


@pytest.mark.slow
def test_gpu_protocol_script_smoke(tmp_path):
    """scripts/gpu_protocol.sh, the prepared GPU run: its own flags (bf16, channels_last, three
    seeds, four strategies) at --smoke scale on the CPU."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_protocol.sh"), "smoke"], capture_output=True, text=True,
                            env={**ENV, "OUT": str(tmp_path)}, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "cifar100-gpu-smoke" / "summary.md").read_text()
    assert "| branch - finetune |" in summary and "| cassle+branch - cassle |" in summary and "| finetune (3) |" in summary
    config = TrainConfig.from_yaml(tmp_path / "cifar100-gpu-smoke" / "seed-2" / "cassle-branch" / "config.yaml")
    assert (config.precision, config.channels_last) == ("bf16", True)
