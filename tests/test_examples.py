"""Every example runs (in its --smoke mode) as a user would run it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
