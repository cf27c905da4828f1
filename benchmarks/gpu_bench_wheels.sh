#!/bin/bash
# Prepares, on a machine with internet, what benchmarks/gpu_bench.sh installs on a GPU machine without internet:
#   bash benchmarks/gpu_bench_wheels.sh [PYTHON_VERSION]     # default 3.12 (the device tool's H200 image)
# Writes .whl/ (git-ignored): Ray 2.60.0 with its Java jar and the RLlib/Serve/LLM libraries and dashboard web
# client removed (79 MB -> about 40 MiB, so that it fits the device tool's 64 MiB working-tree limit; extraction uses
# Ray core only), plus Ray's dependencies missing from that image (jsonschema and its own). Also copies the
# MobileNetV2 weights into .gpu_weights/ (the GPU machine cannot download them). Then, on the device tool:
#   carry [".whl", ".gpu_weights"], command "bash benchmarks/gpu_bench.sh --n 2000", timeout_s 540
set -eu
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
TAG=cp${PYV/./}
rm -rf .whl && mkdir -p .whl/dl
# --no-deps and named dependencies: the GPU image already holds Ray's other requirements (click, filelock, msgpack,
# packaging, protobuf, pyyaml, requests, aiohttp's); two versions of one package there would stop the install.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/dl \
  ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py
$PY - "$TAG" <<'EOF'
"""Rewrite Ray's wheel without the parts extraction never loads (RECORD rewritten to match)."""
import glob
import sys
import zipfile

DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
src = glob.glob(f".whl/dl/ray-2.60.0-{sys.argv[1]}-*.whl")[0]
dst = src.replace(".whl/dl/", ".whl/")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
    for info in zin.infolist():
        if info.filename.startswith(DROP):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not l.decode().startswith(DROP))
        zout.writestr(info, data)  # the original ZipInfo keeps the executables' permission bits (raylet, gcs_server)
EOF
rm .whl/dl/ray-2.60.0-*.whl  # the unpruned original
mv .whl/dl/*.whl .whl/ && rmdir .whl/dl
ls .whl/ray-2.60.0-*.whl >/dev/null  # the pruned wheel is there
mkdir -p .gpu_weights/hub/checkpoints
cp ~/.cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth .gpu_weights/hub/checkpoints/
du -sh .whl .gpu_weights
