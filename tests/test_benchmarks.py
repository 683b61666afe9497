"""The benchmark scripts still run (their --smoke mode, on the CPU) and print their ratio lines, and
benchmarks/gpu_all.sh only calls scripts and options that exist; the figures live in RESULTS.md."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RATIO = r"\d+\.\d{2,3}x"


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_step_time_smoke(tmp_path):
    md = tmp_path / "results.md"
    out = run_script("step_time.py", "--smoke", "--markdown", str(md))
    for variant in ("fine-tune", "frozen-bn", "branch-1x1", "branch-cross", "branch-full", "naive-1x1", "naive-cross", "naive-full"):
        # name, trainable parameters, median, IQR, time ratio, peak MiB, memory ratio
        assert re.search(rf"^{variant}\s+[\d,]+\s+[\d.]+\s+[\d.]+-[\d.]+\s+{RATIO}\s+[\d.-]+\s+{RATIO}", out, re.M), out
    assert re.search(r"^fine-tune\s.*\s1\.000x\s", out, re.M), out
    assert re.search(r"^(targets met for|NOT met for): branch-", out, re.M), out
    section = md.read_text()
    assert section.lstrip().startswith("## CPU step time: resnet18, 32 px, fp32, eager"), section
    assert "| branch-cross | 6,277,568 |" in section and "- Command: `python benchmarks/step_time.py --smoke" in section


def test_step_time_device_options_on_cpu():
    out = run_script("step_time.py", "--smoke", "--variants", "fine-tune", "--channels-last", "--compile",
                     "--compile-backend", "eager", "--no-memory", "--profile", "--cudnn-benchmark", "--markdown")
    assert "channels_last, torch.compile (backend eager) of forward_features" in out, out
    assert "## CPU step time: resnet18, 32 px, fp32, channels_last, cudnn.benchmark, compiled" in out, out
    assert re.search(r"=== profile: fine-tune \(3 steps\) ===\n.*Self CPU", out, re.S), out
    # variant ... time ratio ... first step seconds, graphs (at least one), graph breaks
    assert re.search(r"^fine-tune\s.*\s1\.000x\s.*\s[\d.]+\s+[1-9]\d*\s+\d+$", out, re.M), out


def test_pipeline_smoke(tmp_path):
    md = tmp_path / "results.md"
    out = run_script("pipeline.py", "--smoke", "--markdown", str(md))
    for method in ("simclr", "byol"):
        assert re.search(
            rf"^{method}: pipeline share -?\d+\.\d% of the full step, target (ok|OVER) \(<= 10%\); "
            rf"[\d,]+ images/s = {RATIO} the 1.4k anchor, target -; back to back [\d,]+ images/s; "
            r"host syncs per step: not counted \(CUDA only\)$", out, re.M), out
    section = md.read_text()
    assert "## CPU data-pipeline share and throughput: resnet18, 32 px" in section and "| byol |" in section, section


def test_stream_smoke(tmp_path):
    md = tmp_path / "results.md"
    out = run_script("stream.py", "--smoke", "--workers", "1", "--markdown", str(md))
    for variant in ("in memory \\(baseline\\)", "streamed", "decode only \\(no step\\)"):
        assert re.search(rf"^{variant}\s+[\d.]+\s+[\d.]+-[\d.]+\s+[\d,]+\s+{RATIO}$", out, re.M), out
    assert re.search(r"^in memory \(baseline\)\s.*\s1\.00x$", out, re.M), out
    assert re.search(rf"^streaming costs {RATIO} the in-memory epoch; the workers decode [\d,]+ images/s", out, re.M), out
    section = md.read_text()
    assert "## CPU streamed folder vs in memory: resnet18, 32 px, fp32" in section and "streamed by 1 worker;" in section


def test_merge_time_smoke(tmp_path):
    md = tmp_path / "results.md"
    out = run_script("merge_time.py", "--smoke", "--markdown", str(md))
    assert re.search(r"^resnet18: add_branches = \d+\.\d\d training steps, merge_branches = \d+\.\d\d training steps$", out, re.M), out
    assert re.search(rf"^\| resnet18 \| 20 \| [\d.]+ \| [\d.]+ \| [\d.-]+ \| {RATIO} \| [\d.]+ \| [\d.-]+ \| {RATIO} \|$", md.read_text(), re.M)


def test_tap_grad_smoke(tmp_path):
    md = tmp_path / "results.md"
    out = run_script("tap_grad.py", "--smoke", "--precision", "bf16", "--channels-last", "--markdown", str(md))
    for shape in ("1x1", "cross"):
        assert re.search(rf"^{shape}: tap gradient {RATIO} the full weight gradient \(work \d/9 for a 3x3 kernel\); "
                         rf"backward \(input \+ weight gradient\) {RATIO} fine-tuning's$", out, re.M), out
    # resnet18's stem and its sixteen 3x3 convs, in eight shapes; its 1x1 downsampling convs are left out.
    rows = re.findall(r"^\| (\d+x\d+x\dx\d) \| 2x\d+x\d+x\d+ \| [12] \| (\d+) \|", md.read_text(), re.M)
    assert len(rows) == 8 and sum(int(n) for _, n in rows) == 17 and ("64x3x7x7", "1") in rows, md.read_text()
    assert "## CPU tap gradient vs full weight gradient: resnet18, 32 px, bf16, channels_last" in md.read_text()


@pytest.mark.slow
def test_step_time_compiled_branch_smoke():
    """dynamo and AOTAutograd through the branched conv (what the GPU script's compiled runs need)."""
    out = run_script("step_time.py", "--smoke", "--variants", "fine-tune,branch-cross", "--precision", "bf16",
                     "--channels-last", "--compile", "--compile-backend", "aot_eager", "--no-memory")
    assert re.search(rf"^branch-cross\s.*\s{RATIO}\s.*\s[\d.]+\s+[1-9]\d*\s+\d+$", out, re.M), out


def test_gpu_all_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_all.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def gpu_all_commands(out_dir: Path) -> list[list[str]]:
    """The commands gpu_all.sh would run, as its DRY_RUN mode prints them (interpreter first)."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out_dir)}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_all.sh")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("DRY-RUN ")]
    assert not out_dir.exists(), "a dry run must not write outputs"
    return [shlex.split(ln)[1:] for ln in lines]


def test_gpu_all_calls_existing_scripts_and_options(tmp_path, monkeypatch):
    commands = gpu_all_commands(tmp_path / "gpu-results")
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    called = {Path(cmd[1]).name for cmd in commands}
    assert called == scripts, f"gpu_all.sh calls {sorted(called)}; the benchmark scripts are {sorted(scripts)}"
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for cmd in commands:
        assert (ROOT / cmd[1]).is_file(), cmd
        assert "--device" in cmd and cmd[cmd.index("--device") + 1] == "cuda", cmd
        module = importlib.import_module(Path(cmd[1]).stem)
        try:
            module.parse_args(cmd[2:])
        except SystemExit as err:  # argparse rejects an unknown option or a bad value
            pytest.fail(f"{shlex.join(cmd)}: the script's options reject it (exit {err.code})")


def test_cpu_peak_memory_counts_the_tensors_alive_at_once(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch

    common = importlib.import_module("_common")
    held = []

    def step() -> None:
        first = torch.empty(2**20, dtype=torch.uint8)
        second = torch.empty(3 * 2**20, dtype=torch.uint8)  # 4 MiB alive here
        del first, second
        held.append(torch.empty(2**19, dtype=torch.uint8))  # kept: the second step peaks at 4.5 MiB

    assert common.cpu_peak_increase(step, 2) == pytest.approx(4.5, abs=0.01)
