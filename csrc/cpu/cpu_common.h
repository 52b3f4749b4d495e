// cpu_common.h: small helpers of the CPU implementations.
// Provides: wkv::cpu::elem_t<scalar_t> (c10 dtype -> torch-free element type of csrc/kernels)
// and grain(work_per_row): the at::parallel_for grain size over (b, h) rows.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "../kernels/convert.h"

namespace wkv::cpu {

template <class T> struct ElemType { using type = T; };
template <> struct ElemType<c10::Half> { using type = wkv::half_t; };
template <> struct ElemType<c10::BFloat16> { using type = wkv::bf16_t; };
template <class T> using elem_t = typename ElemType<T>::type;

static_assert(sizeof(wkv::half_t) == sizeof(c10::Half), "half layout");
static_assert(sizeof(wkv::bf16_t) == sizeof(c10::BFloat16), "bf16 layout");

// Rows per task so that one task does at least ~256k element operations (~0.1 ms): a smaller op
// (e.g. one decode step of a small model: 3 KV heads x 1k slots) runs inline on the calling thread.
// Forking for less costs more than it saves, and much more on a loaded machine, where the wait
// for a descheduled worker thread at the join can take milliseconds.
inline int64_t grain(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, work_per_row));
}

}  // namespace wkv::cpu
