// accumulate.cu: CUDA implementation of weightedkv::accumulate (docs/design.md).
//
// One thread per (b, h, c) (c fastest: the probs reads of a warp are contiguous). Each thread
// loops over the queries in increasing q and over the group in increasing g, exactly as the CPU
// kernel does per slot (same float32 operations in the same order, no FMA contraction), so the
// statistics are bit-identical to the CPU kernel's.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


#include "../ops.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../dispatch.h"
#include "../kernels/convert.h"
#include "../kernels/params.h"
#include "../kernels/policy.h"

namespace wkv::gpu {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(const AccumulateParams p) {
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= int64_t(p.B) * p.H * p.C) return;
  const int64_t row = idx / p.C;
  const int c = static_cast<int>(idx % p.C);
  const int b = static_cast<int>(row / p.H), h = static_cast<int>(row % p.H);
  const int64_t sp = p.slot_pos[off(p.pos_st, b, h, c)];
  if (sp < 0) return;  // empty slot: untouched
  const T* probs = static_cast<const T*>(p.probs);
  float sum = 0.0f, plast = 0.0f;
  int seen = 0;
  bool any_query = false;
  for (int q = 0; q < p.Q; ++q) {
    const int64_t qp = p.query_pos[off(p.query_pos_st, b, q)];
    if (qp < 0) continue;
    any_query = true;
    plast = 0.0f;  // last = p of the last valid query if it sees c, else 0
    if (sp > qp) continue;
    float acc = reduce_init(p.reduce, to_float(probs[off(p.probs_st, b, h * p.G, q, c)]));
    for (int g = 1; g < p.G; ++g)
      acc = reduce_step(p.reduce, acc, to_float(probs[off(p.probs_st, b, h * p.G + g, q, c)]));
    const float v = reduce_finish(p.reduce, acc, p.G);
    sum = wkv_add(sum, v);
    ++seen;
    plast = v;
  }
  if (!any_query) return;  // no valid query in row b: nothing changes
  float* score = p.scores + off(p.scores_st, b, h, c);
  float* count = p.counts + off(p.counts_st, b, h, c);
  *score = wkv_add(*score, sum);
  *count = wkv_add(*count, static_cast<float>(seen));
  p.last[off(p.last_st, b, h, c)] = plast;
}

}  // namespace

void accumulate(const at::Tensor& probs, const at::Tensor& slot_pos,
                     const at::Tensor& query_pos, const at::Tensor& scores,
                     const at::Tensor& counts, const at::Tensor& last,
                     c10::string_view group_reduce) {
  const AccumulateParams p = host::prepare_accumulate(probs, slot_pos, query_pos, scores, counts,
                                                      last, group_reduce);
  const int64_t n = int64_t(p.B) * p.H * p.C;
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "accumulate: too many slots for one launch: B*H*C=", n);
  WKV_DISPATCH_FLOAT_TYPES(probs.scalar_type(), "accumulate", [&] {
    accumulate_kernel<host::elem_t<scalar_t>><<<blocks, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) { m.impl("accumulate", &accumulate); }

}  // namespace wkv::gpu
