// append.cu: CUDA implementation of weightedkv::append (docs/design.md).
//
// One block per (b, h). The valid new tokens (new_pos >= 0, increasing t) and the free slots
// (slot_pos == -1, increasing index) are both compacted with block-wide prefix scans, one tile
// of blockDim tokens at a time; token i of the tile goes to the i-th buffered free slot.
//
// Free-slot check: by default a row without enough free slots is left untouched and raises a
// device-side assert (no host synchronisation in a decode step). With WKV_CUDA_SYNC_CHECKS=1 all
// rows are checked first and the op raises the CPU kernel's error with the cache untouched.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "../ops.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../dispatch.h"
#include "../kernels/params.h"
#include "cuda_launch.h"
#include "cuda_utils.cuh"

namespace wkv::gpu {
namespace {

constexpr int kThreads = 128;

// bad_row != nullptr: only record the first row lacking free slots (atomicMin, integer: order
// independent); otherwise append, asserting on such a row.
template <class T>
__global__ void __launch_bounds__(kThreads)
    append_kernel(const AppendParams p, int* bad_row) {
  __shared__ int scan_buf[kMaxWarps];
  __shared__ int s_tok[kThreads];
  __shared__ int s_free[2 * kThreads];
  const CacheParams& c = p.cache;
  const int row = blockIdx.x, b = row / c.H, h = row % c.H;
  const int tid = threadIdx.x;

  int nf = 0, nt = 0;
  for (int s = tid; s < c.C; s += kThreads) nf += c.slot_pos[off(c.pos_st, b, h, s)] == -1;
  for (int t = tid; t < p.T; t += kThreads) nt += p.new_pos[off(p.new_pos_st, b, t)] >= 0;
  nf = block_allreduce(nf, SumOp(), scan_buf);
  nt = block_allreduce(nt, SumOp(), scan_buf);
  if (nf < nt) {
    if (bad_row != nullptr) {
      if (tid == 0) atomicMin(bad_row, row);
    } else {
      CUDA_KERNEL_ASSERT_MSG(false, "append: not enough free slots (WKV_CUDA_SYNC_CHECKS=1 for details)");
    }
    return;
  }
  if (bad_row != nullptr || nt == 0) return;

  T* keys = static_cast<T*>(c.keys);
  T* values = static_cast<T*>(c.values);
  const T* nk = static_cast<const T*>(p.new_keys);
  const T* nv = static_cast<const T*>(p.new_values);
  int buffered = 0;  // free slots in s_free[0, buffered), not yet used
  int cursor = 0;    // next slot index to scan
  for (int t0 = 0; t0 < p.T; t0 += kThreads) {
    const int t = t0 + tid;
    const bool valid = t < p.T && p.new_pos[off(p.new_pos_st, b, t)] >= 0;
    int ntile = 0;
    const int rank = block_exclusive_scan(valid ? 1 : 0, &ntile, scan_buf);
    if (valid) s_tok[rank] = t;
    while (buffered < ntile && cursor < c.C) {  // uniform: buffered/cursor are block-wide
      const int s = cursor + tid;
      const bool is_free = s < c.C && c.slot_pos[off(c.pos_st, b, h, s)] == -1;
      int nfree = 0;
      const int r = block_exclusive_scan(is_free ? 1 : 0, &nfree, scan_buf);
      if (is_free) s_free[buffered + r] = s;
      buffered += nfree;
      cursor += kThreads;
    }
    __syncthreads();
    // token s_tok[i] -> slot s_free[i], i < ntile (buffered >= ntile: the row has enough slots)
    for (int e = tid; e < ntile * c.D; e += kThreads) {
      const int i = e / c.D, d = e % c.D;
      const int s = s_free[i], tok = s_tok[i];
      keys[off(c.keys_st, b, h, s, d)] = nk[off(p.new_keys_st, b, h, tok, d)];
      values[off(c.values_st, b, h, s, d)] = nv[off(p.new_values_st, b, h, tok, d)];
    }
    for (int i = tid; i < ntile; i += kThreads) {
      const int s = s_free[i];
      c.scores[off(c.scores_st, b, h, s)] = 0.0f;
      c.counts[off(c.counts_st, b, h, s)] = 0.0f;
      c.last[off(c.last_st, b, h, s)] = 0.0f;
      c.slot_pos[off(c.pos_st, b, h, s)] = p.new_pos[off(p.new_pos_st, b, s_tok[i])];
    }
    // keep the unused free slots: s_free[ntile, buffered) -> s_free[0, buffered - ntile)
    const int keep = buffered - ntile;  // < kThreads
    const int moved = tid < keep ? s_free[ntile + tid] : 0;
    __syncthreads();
    if (tid < keep) s_free[tid] = moved;
    __syncthreads();
    buffered = keep;
  }
}

}  // namespace

void append(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                 const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                 const at::Tensor& new_keys, const at::Tensor& new_values,
                 const at::Tensor& new_pos) {
  const AppendParams p = host::prepare_append(keys, values, scores, counts, last, slot_pos,
                                              new_keys, new_values, new_pos);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.T == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "append", [&] {
    using T = host::elem_t<scalar_t>;
    if (sync_checks()) {
      at::Tensor bad = at::full({1}, INT_MAX, slot_pos.options().dtype(at::kInt));
      append_kernel<T><<<rows, kThreads, 0, stream>>>(p, bad.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int r = bad.item<int>();
      if (r != INT_MAX) {
        const int64_t b = r / p.cache.H, h = r % p.cache.H;
        const int64_t free_slots = slot_pos[b][h].eq(-1).sum().item<int64_t>();
        const int64_t needed = new_pos[b].ge(0).sum().item<int64_t>();
        TORCH_CHECK(false, "append: not enough free slots in batch row ", b, ", head ", h, ": ",
                    needed, " new tokens but only ", free_slots, " free slots (capacity C=",
                    p.cache.C, ")");
      }
    }
    append_kernel<T><<<rows, kThreads, 0, stream>>>(p, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) { m.impl("append", &append); }

}  // namespace wkv::gpu
