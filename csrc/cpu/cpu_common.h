// cpu_common.h: small helpers of the CPU implementations.
// Provides: grain(work_per_row): the at::parallel_for grain size over (b, h) rows;
// min_task_work() (test override WKV_TEST_TASK_WORK).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace wkv::cpu {

// The minimum work (element operations) of one task: 2^18 (~0.1 ms), or the value of the
// environment variable WKV_TEST_TASK_WORK (read once; tests set it to 1 so that every (b, h) row
// is a task of its own and a run with 2 threads really splits every op's work).
inline int64_t min_task_work() {
  static const int64_t work = [] {
    const char* v = std::getenv("WKV_TEST_TASK_WORK");
    const long long n = v != nullptr ? std::atoll(v) : 0;
    return n > 0 ? static_cast<int64_t>(n) : int64_t(1) << 18;
  }();
  return work;
}

// Rows per task so that one task does at least min_task_work() element operations: a smaller op
// (e.g. one decode step of a small model: 3 KV heads x 1k slots) runs inline on the calling
// thread. Forking for less costs more than it saves, and much more on a loaded machine, where the
// wait for a descheduled worker thread at the join can take milliseconds.
inline int64_t grain(int64_t work_per_row) {
  return std::max<int64_t>(1, min_task_work() / std::max<int64_t>(1, work_per_row));
}

}  // namespace wkv::cpu
