#!/usr/bin/env bash
# The trainer end to end on a CUDA GPU, to run before benchmarks/gpu_all.sh: each of the six SSL
# methods under Branch-tuning, and SimCLR under CaSSLe+Branch, in bf16 with channels_last, two
# tasks of one epoch on the bundled digits, evaluation included, and SimCLR on the digits written
# as a folder of PNGs and streamed (--stream); then each run's final model is
# loaded with plain timm in a fresh process, as its last printed line says. CPU tests cannot catch
# what this is for: a tensor left on the wrong device (the first GPU run found one in the branches).
#
#   PYTHONPATH=. bash scripts/gpu_smoke.sh        # from the repository root, about 2 minutes
#
# Environment: OUT (default ./gpu-smoke: per run its folder, .out (stdout) and .log), PYTHON (default
# python3), DRY_RUN=1 (print the commands instead; tests/test_scripts.py checks them).
set -u -o pipefail

OUT="${OUT:-./gpu-smoke}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
FAILED=()

# run NAME [TRAIN OPTIONS...]: one short training run, then its model loaded with plain timm.
run() {
    local name=$1
    shift
    local cmd=("$PYTHON" -m timm_branch train --no-progress --device cuda --precision bf16 --channels-last
               --num-tasks 2 --epochs 1 --batch-size 64 --output "$OUT/$name" "$@")
    if [ "$DRY_RUN" = 1 ]; then
        printf 'DRY-RUN'; printf ' %q' "${cmd[@]}"; printf '\n'
        return
    fi
    local out="$OUT/$name.out" log="$OUT/$name.log" t0=$SECONDS
    if ! timeout --kill-after=10 120 "${cmd[@]}" >"$out" 2>"$log"; then
        FAILED+=("$name (training; see $log)")
        echo "== $name: training FAILED after $((SECONDS - t0)) s"; tail -n 20 "$log"
        return
    fi
    local load_line
    load_line=$(tail -n 1 "$out")  # the job's last printed line loads its final model
    if ! "$PYTHON" -c "import timm; model = $load_line; print(type(model).__name__)" >>"$log" 2>&1; then
        FAILED+=("$name (plain timm could not load: $load_line)")
        echo "== $name: loading with plain timm FAILED"; tail -n 5 "$log"
        return
    fi
    echo "== $name: ok, $((SECONDS - t0)) s; last task: $(grep -o 'knn_top1.*' "$log" | tail -n 1)"
}

[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
for method in simclr byol barlow moco vicreg swav; do
    run "branch-$method" --method "$method" --strategy branch
done
run cassle-branch-simclr --method simclr --strategy cassle+branch
# A streamed folder: batches decoded by DataLoader workers, pinned, copied to the GPU without waiting.
FOLDER="$OUT/digits-folder"
if [ "$DRY_RUN" != 1 ]; then
    "$PYTHON" - "$FOLDER" <<'PY'
import sys
from pathlib import Path

from PIL import Image

from timm_branch.data import load_digits

source = load_digits(32)
for split in ("train", "test"):
    data = getattr(source, split)
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
        folder = Path(sys.argv[1]) / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
PY
fi
run stream-simclr --method simclr --strategy branch --data "$FOLDER" --stream --workers 4

if [ "$DRY_RUN" != 1 ]; then
    if [ ${#FAILED[@]} -gt 0 ]; then
        printf 'FAILED: %s\n' "${FAILED[@]}"
        exit 1
    fi
    echo "all runs trained on CUDA and loaded with plain timm"
fi
