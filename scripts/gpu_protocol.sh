#!/usr/bin/env bash
# The class-incremental CIFAR-100 protocol on one GPU in about 8 minutes (H100/H200): finetune,
# branch, cassle and cassle+branch, SimCLR, timm's stock resnet18 at 32 px, bf16, three seeds,
# with the paired differences over seeds (docs/REPRODUCTION.md, "The GPU run").
#
#   bash scripts/gpu_protocol.sh prepare   # here: the seeded 150+50 per class subset -> .data/ (git-ignored, ~58 MiB)
#   bash scripts/gpu_protocol.sh run       # on the GPU machine (carry .data): results under $OUT/cifar100-gpu
#   bash scripts/gpu_protocol.sh smoke     # anywhere: the same command at --smoke scale, on its own random data
#
# The budget: 5 tasks of 20 classes, 150 training images per class (3,000 per task), 6 epochs per
# task, batch 256: about 18 k images per task and run, 19 task trainings per seed (task 0 is
# shared, CaSSLe's teacher adds about a third), so about 1 M images for the three seeds at the
# 3-4 k images/s that an H200 trained resnet18 at 32 px (benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
subset=.data/cifar100-150-50-seed0.npz
common=(--runs finetune branch cassle cassle+branch --seeds 0 1 2 --model resnet18 --image-size 32
        --epochs 6 --warmup-epochs 1 --batch-size 256 --precision bf16 --channels-last)
case "${1:-}" in
  prepare)
    python - "$subset" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "examples")
from cifar100_protocol import write_subset

print(write_subset(Path("../shared/data/cifar100.npz"), Path(sys.argv[1]), 150, 50, seed=0))
PY
    ;;
  run)
    [ -f "$subset" ] || { echo "gpu_protocol.sh: $subset is missing: run 'bash scripts/gpu_protocol.sh prepare' here and carry .data" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    git rev-parse --short HEAD 2>/dev/null || true
    PYTHONPATH=. python examples/cifar100_protocol.py --data "$subset" --output "${OUT:-runs}/cifar100-gpu" "${common[@]}"
    ;;
  smoke)
    # The run's own flags; --smoke then swaps in its data, model, image size, epochs and batch.
    python examples/cifar100_protocol.py "${common[@]}" --smoke --output "${OUT:-runs}/cifar100-gpu-smoke"
    ;;
  *)
    echo "usage: bash scripts/gpu_protocol.sh prepare | run | smoke" >&2
    exit 2
    ;;
esac
