// cpu_common.h: small helpers of the CPU implementations.
// Provides: grain(work_per_row): the at::parallel_for grain size over (b, h) rows.
#pragma once

#include <algorithm>
#include <cstdint>

namespace wkv::cpu {

// Rows per task so that one task does at least ~256k element operations (~0.1 ms): a smaller op
// (e.g. one decode step of a small model: 3 KV heads x 1k slots) runs inline on the calling thread.
// Forking for less costs more than it saves, and much more on a loaded machine, where the wait
// for a descheduled worker thread at the join can take milliseconds.
inline int64_t grain(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_row));
}

}  // namespace wkv::cpu
