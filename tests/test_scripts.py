"""scripts/gpu_smoke.sh: valid bash whose training commands the CLI accepts (it needs a GPU to run)."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from timm_branch import cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "gpu_smoke.sh"


def test_gpu_smoke_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_smoke_trains_every_method_on_cuda_with_options_the_cli_accepts(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "smoke")}
    result = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [shlex.split(line)[1:] for line in result.stdout.splitlines() if line.startswith("DRY-RUN ")]
    assert not (tmp_path / "smoke").exists(), "a dry run must not write outputs"
    parser = cli.build_parser()
    methods = set()
    for cmd in commands:
        assert cmd[1:3] == ["-m", "timm_branch"], cmd
        args = parser.parse_args(cmd[3:])  # argparse exits on an unknown option or a bad value
        assert args.device == "cuda" and args.precision == "bf16" and args.channels_last, cmd
        methods.add(args.method)
    assert methods == {"simclr", "byol", "barlow", "moco", "vicreg", "swav"}
