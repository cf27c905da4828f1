#!/usr/bin/env bash
# Sweep of the fusion settings on one Caltech-101 extraction (features with 12 regions per image).
# Usage: benchmarks/caltech_sweep.sh FEATURES_URL OUT_DIR
set -euo pipefail
FEAT=$1; OUT=$2; DS=${DATASETS:-../shared/datasets}/caltech101
for K in 1 3 6 12; do
  for W in 0.5 1 2; do
    .venv/bin/python jobs/benchmark.py --dataset "$DS" --protocol category --queries "$DS/queries_5pct_seed0.txt" \
      --features "$FEAT" --report "$OUT/K${K}_w${W}" --regions "$K" --local-weight "$W" \
      --methods global,ours --figure-queries 0 2>/dev/null | grep -E "^\| (global|ours) " | sed "s/^/K=$K w=$W /"
  done
done
