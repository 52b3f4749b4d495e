#!/usr/bin/env bash
# Build the extension in place (editable install) into the project's venv.
# Serialised with flock so that parallel shells never build at the same time.
# USE_CUDA defaults to 0 here (fast CPU-only development builds); scripts/setup.sh builds with CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export USE_CUDA=${USE_CUDA:-0}
export MAX_JOBS=${MAX_JOBS:-2}
exec flock /tmp/weightedkv_build.lock "$PY" -m pip install --no-build-isolation --no-deps -q -e .
