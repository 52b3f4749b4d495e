#!/usr/bin/env bash
# Multi-device GPU check (issue #12), after scripts/gpu_check.sh has built the CUDA kernels:
#   1. device_map: layer 0 and layer 1 of a tiny Llama on two devices (cuda:0 + cuda:1, or cpu +
#      cuda:0 with one GPU): generate() (greedy and beam search, every policy, with and without
#      padding) equals the one-device run, each layer's slots stay on its device;
#   2. with two GPUs or more: tensor parallelism over NCCL (torchrun --nproc-per-node 2):
#      tokens equal to the single-process run for every policy, half the KV bytes per rank.
# Skips (exit 0) without a GPU. Python: $PYTHON, else .venv/bin/python, else python3.
# Logs go to $OUT when it is set (the device tool's output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LOG_DIR=${OUT:-benchmarks/results}
mkdir -p "$LOG_DIR"

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=$(command -v python3)
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ "$NGPU" -eq 0 ]]; then
  echo "[gpu_multi] skipped: no CUDA device"
  exit 0
fi
if ! "$PY" -c "import sys, weightedkv_ext; sys.exit(0 if weightedkv_ext._loader.cuda_built() else 1)"; then
  echo "[gpu_multi] ERROR: weightedkv_ext has no CUDA kernels; run scripts/gpu_check.sh first" >&2
  exit 1
fi
echo "[gpu_multi] $NGPU GPU(s)"
status=0
timeout 240 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
  python_tests/test_distributed_devices.py 2>&1 | tee "$LOG_DIR/gpu_multi_device_map.log" | tail -20 \
  || status=1
if [[ "$NGPU" -ge 2 ]]; then
  WKV_TP_DEVICE=cuda timeout 300 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    python_tests/test_distributed_tp.py 2>&1 | tee "$LOG_DIR/gpu_multi_tp.log" | tail -20 \
    || status=1
else
  echo "[gpu_multi] tensor parallel over NCCL skipped: needs 2 GPUs, found $NGPU"
fi
echo "[gpu_multi] done (exit $status)"
exit $status
