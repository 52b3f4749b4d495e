// append.cpp: CPU implementation of weightedkv::append (docs/design.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../kernels/append.h"
#include "cpu_common.h"

namespace wkv::cpu {
namespace {

}  // namespace

void append(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                const at::Tensor& new_keys, const at::Tensor& new_values,
                const at::Tensor& new_pos) {
  const AppendParams p = host::prepare_append(keys, values, scores, counts, last, slot_pos,
                                              new_keys, new_values, new_pos);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0) return;
  // Check every row first so that an error leaves the cache untouched.
  std::vector<int64_t> free_slots(rows), needed(rows);
  at::parallel_for(0, rows, grain(p.cache.C + p.T), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      count_append(p, r / p.cache.H, r % p.cache.H, &free_slots[r], &needed[r]);
  });
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(free_slots[r] >= needed[r], "append: not enough free slots in batch row ",
                r / p.cache.H, ", head ", r % p.cache.H, ": ", needed[r],
                " new tokens but only ", free_slots[r], " free slots (capacity C=", p.cache.C,
                ")");
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "append", [&] {
    using T = host::elem_t<scalar_t>;
    at::parallel_for(0, rows, grain(p.cache.C + int64_t(p.T) * p.cache.D),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r)
                         append_row<T>(p, r / p.cache.H, r % p.cache.H);
                     });
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) { m.impl("append", &append); }

}  // namespace wkv::cpu
