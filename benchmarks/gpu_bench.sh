#!/bin/bash
# One command for a fresh GPU machine with torch installed (e.g. the 16-core H200 the device tool lends):
#   bash benchmarks/gpu_bench.sh [gpu_bench.py flags]
# Installs what the extraction needs if missing (Ray 2.60.0, NVML bindings for the GPU utilisation in the run
# manifest, the project's own dependencies), points torch at weights carried in .gpu_weights/ when present
# (copy ~/.cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth to .gpu_weights/hub/checkpoints/ first: the
# machine may have no internet), then runs benchmarks/gpu_bench.py. Without Ray the Ray job rows are skipped.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -d .gpu_weights ] && export TORCH_HOME="$PWD/.gpu_weights"
$PY -c "import ray" 2>/dev/null || $PY -m pip install -q "ray==2.60.0" || echo "# ray could not be installed"
$PY -c "import pynvml" 2>/dev/null || $PY -m pip install -q nvidia-ml-py || echo "# no NVML bindings: no GPU utilisation in manifests"
$PY -c "import pyarrow, fsspec, PIL, scipy, torchvision" 2>/dev/null || $PY -m pip install -q -e . \
  || echo "# project dependencies could not be installed"
exec $PY benchmarks/gpu_bench.py "$@"
