"""The benchmark scripts still run (their --smoke mode); the figures themselves live in RESULTS.md."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_smoke():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--smoke"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for variant in ("fine-tune", "branch-1x1", "branch-cross", "branch-full", "naive-cross"):
        assert variant in result.stdout
