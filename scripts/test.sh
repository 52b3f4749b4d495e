#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: the C++ tests through CMake/ctest (built with
# AddressSanitizer + UndefinedBehaviorSanitizer) and the Python tests through pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k compress`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning workers
# slow every parallel op by an order of magnitude.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

echo "[test] C++ tests (CMake + ctest, ASan/UBSan)"
flock /tmp/weightedkv_build.lock cmake -S . -B build-cmake-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DWKV_SANITIZE=ON -DWKV_PYTHON="$PWD/$PY" > /dev/null
flock /tmp/weightedkv_build.lock cmake --build build-cmake-asan -j "${MAX_JOBS:-2}"
ctest --test-dir build-cmake-asan --output-on-failure

echo "[test] Python tests (pytest)"
set +e
"$PY" -m pytest python_tests -q -ra -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[test] pytest collected no tests"; exit 1; fi
exit "$rc"
