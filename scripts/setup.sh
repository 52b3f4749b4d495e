#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv, the dependencies, the
# embedded default model and text, and the extension (with CUDA kernels when nvcc is found).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.wkv-deps-$(cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies (torch is a large download the first time)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  touch "$stamp"
fi
# CUDA: use the toolkit when there is one (CUDA_HOME, else /usr/local/cuda), unless USE_CUDA=0.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && [ "${USE_CUDA:-1}" != "0" ]; then
  export FORCE_CUDA=${FORCE_CUDA:-1}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
  export USE_CUDA=1
  echo "[setup] building the extension with CUDA ($CUDA_HOME, archs $TORCH_CUDA_ARCH_LIST)"
else
  export USE_CUDA=0
  echo "[setup] building the extension CPU-only (no nvcc found or USE_CUDA=0)"
fi
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
flock /tmp/weightedkv_build.lock "$PY" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps -e .
echo "[setup] extension built in $(( $(date +%s) - start ))s"
"$PY" -c "import weightedkv_ext, weightedkv_ext._loader as l; print('[setup] weightedkv_ext', weightedkv_ext.__version__, '| CUDA kernels:', l.cuda_built())"
