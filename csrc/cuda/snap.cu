// snap.cu: CUDA implementation of weightedkv::snap_compress (docs/design.md, "snap_compress").
//
// One block per (b, h) row; the row phases of csrc/kernels/snap.h, separated by __syncthreads:
//   rank:   each held slot's rank in (position, slot) order by counting (O(C^2 / threads): the
//           step runs once per prompt, not per token), written to a global workspace;
//   pool:   pooled window scores per rank (snap_pooled);
//   select: an eligible rank is kept iff fewer than budget - sinks - recent eligible ranks come
//           before it in (pooled desc, rank asc) order (O(L^2 / threads));
//   merge:  each kept rank merges its dropped run (snap_merge_run; runs are disjoint);
//   drop + kept list.
// The float formulas are those of the CPU kernel (built with --fmad=false), so both devices
// select and merge identically given the same statistics.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare_snap.h"
#include "../kernels/snap.h"
#include "../ops.h"
#include "cuda_utils.cuh"

namespace wkv::gpu {
namespace {

constexpr int kThreads = 256;

// Workspace per row (C entries each): order (int64), window scores and pooled scores (float),
// keep flags (int32).
struct SnapWork {
  int64_t* order = nullptr;
  float* window = nullptr;
  float* pooled = nullptr;
  int* keep = nullptr;
};

template <class T>
__global__ void __launch_bounds__(kThreads) snap_kernel(const SnapParams p, const SnapWork w) {
  __shared__ int red_buf[kMaxWarps];
  const CacheParams& c = p.cache;
  const int row = blockIdx.x, b = row / c.H, h = row % c.H;
  const int tid = threadIdx.x;
  const int64_t base = int64_t(row) * c.C;
  int64_t* order = w.order + base;
  float* window = w.window + base;
  float* pooled = w.pooled + base;
  int* keep = w.keep + base;

  // rank phase
  int held = 0;
  for (int s = tid; s < c.C; s += kThreads) {
    const int64_t pos = c.slot_pos[off(c.pos_st, b, h, s)];
    if (pos < 0) continue;
    ++held;
    int64_t rank = 0;
    for (int s2 = 0; s2 < c.C; ++s2) {
      const int64_t p2 = c.slot_pos[off(c.pos_st, b, h, s2)];
      rank += p2 >= 0 && (p2 < pos || (p2 == pos && s2 < s));
    }
    order[rank] = s;
    window[rank] = c.scores[off(c.scores_st, b, h, s)];
  }
  const int64_t L = block_allreduce(held, SumOp(), red_buf);  // synchronises
  __syncthreads();
  for (int64_t k = tid; k < L; k += kThreads) keep[k] = 1;
  if (L > p.budget) {
    for (int64_t k = tid; k < L; k += kThreads) pooled[k] = snap_pooled(window, k, L, p.pool);
    __syncthreads();
    const int64_t lo = p.sinks, hi = L - p.recent, n_keep = p.budget - p.sinks - p.recent;
    for (int64_t k = lo + tid; k < hi; k += kThreads) {
      int64_t ahead = 0;
      for (int64_t k2 = lo; k2 < hi && ahead < n_keep; ++k2)
        ahead += snap_before(pooled[k2], k2, pooled[k], k);
      keep[k] = ahead < n_keep;
    }
    __syncthreads();
    if (p.merge) {
      for (int64_t k = tid; k < L; k += kThreads) {
        if (!keep[k] || k == 0 || keep[k - 1]) continue;
        int64_t r0 = k - 1;
        while (r0 > 0 && !keep[r0 - 1]) --r0;
        snap_merge_run<T>(c, b, h, order, r0, k);
      }
      __syncthreads();  // merges read the dropped tokens' statistics
    }
    for (int64_t k = tid; k < L; k += kThreads)
      if (!keep[k]) snap_drop(c, b, h, order[k]);
  }
  __syncthreads();
  if (tid == 0) snap_write_kept(p, b, h, order, keep, L);
}

}  // namespace

void snap_compress(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                   const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                   int64_t budget, int64_t sinks, int64_t recent, int64_t pool, bool merge,
                   const at::Tensor& kept) {
  const SnapParams p = host::prepare_snap(keys, values, scores, counts, last, slot_pos, budget,
                                          sinks, recent, pool, merge, kept);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.cache.C == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = rows * p.cache.C;
  at::Tensor order = at::empty({n}, slot_pos.options());
  at::Tensor floats = at::empty({2 * n}, scores.options());
  at::Tensor flags = at::empty({n}, slot_pos.options().dtype(at::kInt));
  SnapWork w;
  w.order = order.data_ptr<int64_t>();
  w.window = floats.data_ptr<float>();
  w.pooled = w.window + n;
  w.keep = flags.data_ptr<int>();
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "snap_compress", [&] {
    using T = host::elem_t<scalar_t>;
    snap_kernel<T><<<rows, kThreads, 0, stream>>>(p, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) { m.impl("snap_compress", &snap_compress); }

}  // namespace wkv::gpu
