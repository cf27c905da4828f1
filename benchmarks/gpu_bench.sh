#!/bin/bash
# One command for a fresh GPU machine with torch installed (e.g. the 16-core H200 the device tool lends, which has no
# internet and no Ray):
#   bash benchmarks/gpu_bench.sh [gpu_bench.py flags]
# Installs nothing from the network. Wheels carried in .whl/ (made by benchmarks/gpu_bench_wheels.sh on a machine with
# internet: a pruned Ray 2.60.0 and the dependencies that image lacks) are installed into a private folder
# (/tmp/gpu_bench_site, on PYTHONPATH: the image's own packages stay untouched); torch is pointed at weights carried
# in .gpu_weights/ when present. Without Ray the Ray job rows are skipped (said in the output); without the NVML
# bindings (nvidia-ml-py) the manifests carry no GPU utilisation and say why. Dry run of the whole script here on CPU:
#   bash benchmarks/gpu_bench.sh --device cpu --n 16 --configs mobilenet_v2:320 --batch-size 8
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the device image's python3 holds torch (it may have no `python`)
[ -d .gpu_weights ] && export TORCH_HOME="$PWD/.gpu_weights"
# The checkout first (jobs/extract.py's Ray workers import pipeline from it: it need not be pip-installed), then the
# carried wheels, then whatever PYTHONPATH held.
EXTRA=""
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/gpu_bench_site
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    EXTRA=":$SITE"
  else
    echo "# the carried wheels in .whl/ could not be installed"
  fi
fi
export PYTHONPATH="$PWD$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import ray" 2>/dev/null || echo "# no Ray (carry .whl/ from benchmarks/gpu_bench_wheels.sh): Ray job rows skipped"
$PY -c "import pynvml" 2>/dev/null || echo "# no NVML bindings (nvidia-ml-py): no GPU utilisation in the manifests"
$PY -c "import pyarrow, fsspec, PIL, scipy, torchvision" || { echo "# the project's dependencies are missing"; exit 3; }
export PYTHONUNBUFFERED=1
exec $PY benchmarks/gpu_bench.py "$@"
