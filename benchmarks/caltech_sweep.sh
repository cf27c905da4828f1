#!/usr/bin/env bash
# Sweep of the region count K and the local-feature weight on one Caltech-101 extraction (12 regions stored per image:
# the benchmark recomputes the local feature from each image's top-K regions, so one extraction measures every K <= 12).
# Usage: benchmarks/caltech_sweep.sh FEATURES_URL OUT_DIR
set -euo pipefail
FEAT=$1; OUT=$2; DS=${DATASETS:-../shared/datasets}/caltech101
for KW in "1 1" "3 1" "6 1" "12 1" "6 0.5" "6 2"; do
  set -- $KW
  .venv/bin/python jobs/benchmark.py --dataset "$DS" --protocol category --queries "$DS/queries_5pct_seed0.txt" \
    --features "$FEAT" --report "$OUT/K$1_w$2" --regions "$1" --local-weight "$2" \
    --methods global,ours,ours+qe --figure-queries 0 2>/dev/null | grep -E "^\| (global|ours|ours\+qe) " | sed "s/^/K=$1 w=$2 /"
done
