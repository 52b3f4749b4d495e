#!/usr/bin/env bash
# GPU check in one go, written for a bare lent machine with one NVIDIA GPU (H100/H200): no .venv,
# no network, whatever Python is there (a CUDA torch of another version, maybe no transformers).
# Under 6 minutes in total: the step timeouts below add up to 320 s (+ ~15 s of Python starts).
#   1. build the extension with the CUDA kernels, in place, for the present GPU's architecture
#      only (setup.py build_ext --inplace, MAX_JOBS = all cores; incremental on a second run);
#                                                                               (timeout 200 s)
#   2. the CUDA tests: python_tests/test_cuda_{build,ops,shapes}.py, against the CPU kernels and
#      the reference (none imports transformers); pytest-xdist spreads them when installed;
#                                                                               (timeout  75 s)
#   3. benchmarks/gpu_kernels.py: decode-attention GB/s and fraction of the HBM peak, compress
#      time per removal (JSON + Markdown);                                      (timeout  45 s)
#   4. only with GPU_MULTI=1: scripts/gpu_multi.sh (device_map / tensor-parallel checks; they need
#      transformers and take minutes more).
# The last line printed is one summary: build, tests passed/failed, decode GB/s and fraction of
# peak, compress time per removal, seconds taken.
#
#   bash scripts/gpu_check.sh            # on the lent machine: `run` with this command
#   bash scripts/gpu_check.sh --dry-run  # no GPU needed: find Python, build (arch: $TORCH_CUDA_ARCH_LIST,
#                                        # default 9.0), run the tests (they skip), no benchmark
# Python: $PYTHON, else .venv/bin/python if it imports torch, else python3, else python.
# CUDA toolkit: $CUDA_HOME, else /usr/local/cuda, else the nvcc on PATH, else a pip nvidia/*/bin/nvcc.
# Logs and results go to $OUT when it is set (the device tool's output folder), else
# benchmarks/results. Exit status: 0 if the build, the tests and the benchmark all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
LOG_DIR=${OUT:-benchmarks/results}
mkdir -p "$LOG_DIR"
T0=$(date +%s)
# step timeouts (seconds); GPU_CHECK_BUILD_S etc. override them (e.g. a slow CPU-only dry run)
BUILD_S=${GPU_CHECK_BUILD_S:-200} TESTS_S=${GPU_CHECK_TESTS_S:-75} BENCH_S=${GPU_CHECK_BENCH_S:-45}

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
BUILD="not run" TESTS="not run" BENCH="not run"
summary() {
  echo "[gpu_check] SUMMARY: build $BUILD | tests $TESTS | benchmark $BENCH | $(($(date +%s) - T0)) s"
}
die() { echo "[gpu_check] ERROR: $*" >&2; summary; exit 1; }

# ---- Python and toolkit --------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=$(command -v python3 || command -v python || true)
fi
[[ -n "$PY" ]] || die "no python found (set PYTHON)"
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else  # a pip-installed toolkit (nvidia-cuda-nvcc) next to the Python's torch
    NVCC=$("$PY" -c "import glob, os, site; print(next(iter(sorted(p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, 'nvidia', '*', 'bin', 'nvcc')))), ''))" 2>/dev/null)
    CUDA_HOME=${NVCC:+$(dirname "$(dirname "$NVCC")")}
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  fi
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
# one Python start (importing torch takes seconds): describe the environment, print the arch last
PROBE=$("$PY" - <<'EOF'
import importlib.util as u, sys, torch
have = {m: u.find_spec(m) is not None for m in ("pytest", "xdist", "ninja", "transformers")}
print(f"[gpu_check] python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), " + ", ".join(f"{m} {'yes' if v else 'NO'}" for m, v in have.items()))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"[gpu_check] {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{torch.cuda.device_count()} device(s)")
    print("%d.%d" % (p.major, p.minor))
else:
    print("nogpu")
EOF
) || die "$PY cannot import torch (set PYTHON)"
echo "$PROBE" | sed '$d'
GPU_ARCH=$(echo "$PROBE" | tail -1)
if [[ $DRY == 0 ]]; then
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader
  [[ "$GPU_ARCH" != nogpu ]] || die "torch.cuda.is_available() is False for $PY: no usable GPU (--dry-run checks the rest)"
  ARCH=${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}
else
  ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
  log "dry run: no GPU needed; the tests skip and the benchmark is not run"
fi

# ---- 1. build --------------------------------------------------------------------------------
is_cuda_build() { "$PY" -c "import sys, weightedkv_ext; sys.exit(0 if weightedkv_ext._loader.cuda_built() else 1)" 2>/dev/null; }
# always run the build: ninja recompiles only what changed since a previous run on this machine
# (its build/ folder stays between calls of the device tool), so a stale library is never tested
{
  [[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
  JOBS=${MAX_JOBS:-$(nproc)}
  log "building with CUDA in place: $("$CUDA_HOME/bin/nvcc" --version | tail -1), TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$JOBS (log: $LOG_DIR/gpu_build.log)"
  LOCK=(); command -v flock >/dev/null && LOCK=(flock /tmp/weightedkv_build.lock)
  USE_CUDA=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$JOBS \
    timeout -k 5 $BUILD_S ${LOCK[@]+"${LOCK[@]}"} "$PY" setup.py build_ext --inplace >"$LOG_DIR/gpu_build.log" 2>&1
  rc=$?
  if [[ $rc -ne 0 ]]; then
    tail -30 "$LOG_DIR/gpu_build.log" >&2
    BUILD="FAILED (exit $rc; 124 = over ${BUILD_S} s)"
    die "the CUDA build failed (see $LOG_DIR/gpu_build.log)"
  fi
  is_cuda_build || { BUILD="FAILED (no CUDA kernels)"; die "built, but weightedkv_ext has no CUDA kernels (see $LOG_DIR/gpu_build.log)"; }
  BUILD="ok ($(($(date +%s) - T0)) s, arch $ARCH)"
  log "build done"
}

# ---- 2. tests --------------------------------------------------------------------------------
status=0
TEST_FILES=(python_tests/test_cuda_build.py python_tests/test_cuda_ops.py python_tests/test_cuda_shapes.py)
if "$PY" -c "import pytest" 2>/dev/null; then
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && [[ $(nproc) -ge 8 ]] && XDIST=(-n 8)
  log "CUDA tests ${XDIST[*]:-} (log: $LOG_DIR/gpu_tests.log)"
  OMP_NUM_THREADS=2 timeout -k 5 $TESTS_S "$PY" -m pytest -q -rfEs --maxfail=25 -p no:cacheprovider \
    ${XDIST[@]+"${XDIST[@]}"} "${TEST_FILES[@]}" >"$LOG_DIR/gpu_tests.log" 2>&1
  test_rc=$?
  tail -25 "$LOG_DIR/gpu_tests.log"
  counts=$(grep -E "[0-9]+ (passed|failed|error)" "$LOG_DIR/gpu_tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  TESTS="${counts:-no result line} (exit $test_rc$([[ $test_rc -eq 124 ]] && echo ": over ${TESTS_S} s"))"
  [[ $test_rc -ne 0 ]] && status=1
else
  TESTS="NOT RUN: pytest is not installed for $PY (carry it as a wheel)"
  status=1
fi

# ---- 3. benchmark ----------------------------------------------------------------------------
if [[ $DRY == 0 ]]; then
  log "benchmark (benchmarks/gpu_kernels.py, log: $LOG_DIR/gpu_bench.log)"
  timeout -k 5 $BENCH_S "$PY" benchmarks/gpu_kernels.py >"$LOG_DIR/gpu_bench.log" 2>&1
  bench_rc=$?
  grep -v "^SUMMARY" "$LOG_DIR/gpu_bench.log" | tail -40
  if [[ $bench_rc -eq 0 ]]; then
    BENCH=$(grep "^SUMMARY " "$LOG_DIR/gpu_bench.log" | tail -1 | cut -d' ' -f2-)
  else
    BENCH="FAILED (exit $bench_rc$([[ $bench_rc -eq 124 ]] && echo ": over ${BENCH_S} s"))"
    status=1
  fi
  if [[ "$LOG_DIR" != benchmarks/results ]]; then
    cp benchmarks/results/gpu_kernels.json benchmarks/results/gpu_kernels.md "$LOG_DIR"/ 2>/dev/null || true
  fi
  if [[ "${GPU_MULTI:-0}" == 1 ]]; then
    log "two-device checks (scripts/gpu_multi.sh)"
    PYTHON="$PY" bash scripts/gpu_multi.sh || status=1
  fi
else
  BENCH="not run (dry run)"
fi
summary
exit $status
