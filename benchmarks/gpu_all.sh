#!/usr/bin/env bash
# Every GPU measurement of the GPU speed issue, in one run of under 8 minutes on one H100:
# step-time and memory ratios (step_time.py: resnet18 at 32 and 224 px, resnet50 at 224 px), the
# data-pipeline share and throughput (pipeline.py: SimCLR and BYOL), a streamed folder against
# the same folder in memory (stream.py), and add / merge time (merge_time.py); bf16 autocast and channels_last throughout, eager and compiled, with three
# diagnostics of the eager step (tap against full weight gradients conv by conv, profiled, and
# with cudnn.benchmark).
#
#   PYTHONPATH=. bash benchmarks/gpu_all.sh        # from the repository root
#
# First, in the same device call, scripts/gpu_smoke.sh (about 2 minutes) checks that the trainer
# runs end to end on the GPU.
#
# Uses the machine's own torch and timm (installs nothing, needs no internet). Environment:
#   OUT       output folder (default ./gpu-results): gpu_all.log (every command's output, the
#             elapsed times) and RESULTS-gpu.md (the Markdown sections for benchmarks/RESULTS.md)
#   PYTHON    interpreter (default python3)
#   BUDGET_S  wall-clock budget in seconds for all measurements (default 450): each command's
#             timeout is cut to what is left, and commands are skipped once under 20 s remain, so
#             the whole script ends within BUDGET_S + 10 s even if compilation is slower than
#             estimated. The most important measurements come first.
#   DRY_RUN=1 print each command instead of running it (tests/test_benchmarks.py checks them)
#
# Measured on one H200 (2026-11-28, torch 2.11; benchmarks/RESULTS.md): eager step_time 23 + 23 +
# 33 s, eager pipeline 28 s, merge_time 19 s; compiled step_time 103 s (resnet18, 32 px) and 135 s
# (resnet50, 224 px), compiled pipeline 139 s, with dynamo's graph breaks of that time (since
# fixed: fewer graphs should compile faster). Under the default budget the last commands may be
# skipped (the order puts the re-measurements last); the summary says so.
set -u -o pipefail

OUT="${OUT:-./gpu-results}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-450}"
DRY_RUN="${DRY_RUN:-0}"
LOG="$OUT/gpu_all.log"
MD="$OUT/RESULTS-gpu.md"
if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$OUT"
    : >"$LOG"
    : >"$MD"
fi
export PYTHONUNBUFFERED=1  # output of a command stopped by its timeout still reaches the log
START=$SECONDS
SUMMARY=()
FAILED=0

GPU=(--device cuda --precision bf16 --channels-last)

# run NAME TIMEOUT_S SCRIPT [ARGS...]: SCRIPT under the budget, its Markdown section appended to $MD.
run() {
    local name=$1 limit=$2
    shift 2
    local cmd=("$PYTHON" "$@" --markdown "$MD")
    if [ "$DRY_RUN" = 1 ]; then
        printf 'DRY-RUN'; printf ' %q' "${cmd[@]}"; printf '\n'
        return
    fi
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$name: skipped (${left} s of the budget left)")
        echo "== $name: skipped, ${left} s of the budget left" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit} s): ${cmd[*]}" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]} how="ok"
    [ "$rc" -ne 0 ] && how="FAILED (exit $rc)" && FAILED=$((FAILED + 1))
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMEOUT after ${limit} s"
    SUMMARY+=("$name: $how, $((SECONDS - t0)) s")
    echo "== $name: $how, $((SECONDS - t0)) s (total $((SECONDS - START)) s)" | tee -a "$LOG"
}

if [ "$DRY_RUN" != 1 ]; then
    {
        echo "== gpu_all.sh $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET_S} s"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
        "$PYTHON" -c 'import torch, timm; print("torch", torch.__version__, "CUDA", torch.version.cuda, "timm", timm.__version__, "GPU", torch.cuda.is_available())' 2>&1
    } | tee -a "$LOG"
fi

# Most important first (commands that no longer fit the budget are skipped). The eager resnet18
# 32 px step waits for the host (see RESULTS.md), so right after it comes the same step compiled,
# every branch shape, which removes the branched convs' Python work; then the compute-bound
# resnet50 224 px step, the pipeline eager, a streamed folder, the pipeline compiled (the
# trainer's --compile inductor), and the diagnostics and the re-measurements.
run step-resnet18-32-eager 120 benchmarks/step_time.py "${GPU[@]}" --model resnet18 --img-size 32 --batch-size 256 --warmup 5 --steps 30
run step-resnet18-32-compiled 240 benchmarks/step_time.py "${GPU[@]}" --compile --variants fine-tune,branch-1x1,branch-cross,branch-full --model resnet18 --img-size 32 --batch-size 256 --warmup 5 --steps 30
# Are the branch taps' weight gradients cheaper than the full kernel's with cuDNN at these shapes?
run tap-grad-resnet18-224 60 benchmarks/tap_grad.py "${GPU[@]}" --model resnet18 --img-size 224 --batch-size 128 --warmup 5 --rounds 20
run step-resnet50-224-eager 150 benchmarks/step_time.py "${GPU[@]}" --model resnet50 --img-size 224 --batch-size 128 --warmup 5 --steps 30
run pipeline-eager 120 benchmarks/pipeline.py "${GPU[@]}" --methods simclr,byol --batch-size 256 --warmup 5 --steps 30
# A folder streamed by DataLoader workers (--stream) against the same folder in memory, 224 px.
run stream-resnet18-224 120 benchmarks/stream.py "${GPU[@]}" --model resnet18 --img-size 224 --file-size 256 --batch-size 128 --workers 12 --steps 8 --epochs 3
run pipeline-compiled 240 benchmarks/pipeline.py "${GPU[@]}" --compile --methods simclr,byol --batch-size 256 --warmup 5 --steps 30
# Where a branch step's extra time goes (GPU kernels and host, torch.profiler), into the log.
run profile-resnet18-224-eager 90 benchmarks/step_time.py "${GPU[@]}" --profile --no-memory --variants fine-tune,frozen-bn,branch-1x1,branch-cross,naive-1x1 --model resnet18 --img-size 224 --batch-size 128 --warmup 3 --steps 10
run step-resnet18-224-eager 120 benchmarks/step_time.py "${GPU[@]}" --model resnet18 --img-size 224 --batch-size 128 --warmup 5 --steps 30
run step-resnet50-224-compiled 240 benchmarks/step_time.py "${GPU[@]}" --compile --variants fine-tune,branch-cross --model resnet50 --img-size 224 --batch-size 128 --warmup 5 --steps 30
# Does letting cuDNN time its algorithms per shape change the ratios (the trainer leaves it off)?
run step-resnet18-224-eager-cudnn-benchmark 90 benchmarks/step_time.py "${GPU[@]}" --cudnn-benchmark --no-memory --variants fine-tune,frozen-bn,branch-1x1,branch-cross,naive-1x1 --model resnet18 --img-size 224 --batch-size 128 --warmup 5 --steps 20
run merge-time 120 benchmarks/merge_time.py "${GPU[@]}" --models resnet18,resnet50 --img-size 224 --batch-size 128 --warmup 2 --rounds 10
run step-resnet18-224-compiled 180 benchmarks/step_time.py "${GPU[@]}" --compile --variants fine-tune,branch-cross --model resnet18 --img-size 224 --batch-size 128 --warmup 5 --steps 30

if [ "$DRY_RUN" != 1 ]; then
    {
        echo
        echo "== summary: $((SECONDS - START)) s in all; outputs in $OUT (gpu_all.log, RESULTS-gpu.md)"
        printf '  %s\n' "${SUMMARY[@]}"
    } | tee -a "$LOG"
fi
[ "$FAILED" -eq 0 ]
