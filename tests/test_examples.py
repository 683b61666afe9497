"""Every example runs (in its --smoke mode) as a user would run it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_smoke(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f'timm.create_model("local-dir:{out}", pretrained=True)'
    assert (out / "model.safetensors").is_file()


CIFAR100 = ROOT.parent / "shared" / "data" / "cifar100.npz"


@pytest.mark.skipif(not CIFAR100.is_file(), reason=f"CIFAR-100 not found at {CIFAR100} (../shared/data is not part of a clone)")
def test_cifar100_protocol_smoke_on_real_images(tmp_path):
    out = tmp_path / "protocol"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cifar100_protocol.py"), "--data", str(CIFAR100), "--smoke", "--output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for strategy in ("finetune", "branch", "cassle", "cassle-branch", "joint"):
        assert (out / strategy / "task-1" / "model.safetensors").is_file(), strategy
    table = result.stdout[result.stdout.index("| run"):]
    assert all(name in table for name in ("finetune", "branch", "cassle", "cassle+branch", "joint"))
    assert (out / "report" / "accuracy_curves.png").is_file()
    subset = np.load(next((out / "data").glob("*.npz")))
    assert subset["x_train"].shape == (1000, 32, 32, 3) and subset["x_test"].shape == (400, 32, 32, 3)
