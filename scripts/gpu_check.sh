#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU (written for H100/H200), under 8 minutes:
#   1. build the extension with the CUDA kernels, in place, unless the importable build already
#      has them (arch = the GPU's compute capability);
#   2. the CUDA tests (python_tests/test_cuda_build.py, python_tests/test_cuda_ops.py);
#   3. benchmarks/gpu_kernels.py (decode-step compress + fused decode attention, JSON + Markdown).
# Python: $PYTHON, else .venv/bin/python if it imports torch, else python3.
# Logs and results are copied to $OUT when it is set (the device tool's output folder).
# Exit status: 0 if the build, the tests and the benchmark all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
LOG_DIR=${OUT:-benchmarks/results}
mkdir -p "$LOG_DIR"
T0=$(date +%s)

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
die() { echo "[gpu_check] ERROR: $*" >&2; exit 1; }

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=$(command -v python3 || true)
fi
[[ -n "$PY" ]] || die "no python found (set PYTHON)"
"$PY" -c "import torch" 2>/dev/null || die "$PY cannot import torch"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
fi
has_cuda_torch "$PY" || die "torch.cuda.is_available() is False for $PY: no usable GPU"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, capability {p.major}.{p.minor}')"

# 1. build
is_cuda_build() { "$PY" -c "import sys, weightedkv_ext; sys.exit(0 if weightedkv_ext._loader.cuda_built() else 1)" 2>/dev/null; }
if is_cuda_build; then
  log "weightedkv_ext is already built with the CUDA kernels"
else
  [[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
  ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  log "building with CUDA in place (TORCH_CUDA_ARCH_LIST=$ARCH, log: $LOG_DIR/gpu_build.log)"
  LOCK=(); command -v flock >/dev/null && LOCK=(flock /tmp/weightedkv_build.lock)
  if ! USE_CUDA=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      timeout 270 ${LOCK[@]+"${LOCK[@]}"} "$PY" setup.py build_ext --inplace >"$LOG_DIR/gpu_build.log" 2>&1; then
    tail -40 "$LOG_DIR/gpu_build.log" >&2
    die "the CUDA build failed or took over 270 s (see $LOG_DIR/gpu_build.log)"
  fi
  is_cuda_build || die "built, but weightedkv_ext still has no CUDA kernels (see $LOG_DIR/gpu_build.log)"
  log "build done"
fi

# 2. tests (a failure does not stop the benchmark; it sets the exit status)
status=0
log "CUDA tests (log: $LOG_DIR/gpu_tests.log)"
set +e
timeout 150 "$PY" -m pytest -q -rfEs --maxfail=25 -p no:cacheprovider \
  python_tests/test_cuda_build.py python_tests/test_cuda_ops.py 2>&1 | tee "$LOG_DIR/gpu_tests.log" | tail -40
test_rc=${PIPESTATUS[0]}
set -e
if [[ $test_rc -ne 0 ]]; then
  log "CUDA tests FAILED (exit $test_rc; 124 = timeout)"
  status=1
fi

# 3. benchmark
log "benchmark (benchmarks/gpu_kernels.py)"
set +e
timeout 120 "$PY" benchmarks/gpu_kernels.py 2>&1 | tee "$LOG_DIR/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
set -e
if [[ $bench_rc -ne 0 ]]; then
  log "benchmark FAILED (exit $bench_rc; 124 = timeout)"
  status=1
fi
if [[ "$LOG_DIR" != benchmarks/results ]]; then
  cp benchmarks/results/gpu_kernels.json benchmarks/results/gpu_kernels.md "$LOG_DIR"/ 2>/dev/null || true
fi
log "two-device checks (scripts/gpu_multi.sh; skipped without two GPUs)"
PYTHON="$PY" bash scripts/gpu_multi.sh || status=1
log "done: tests exit $test_rc, benchmark exit $bench_rc"
exit $status
