// attention.h: torch-free per-slot rules of the attention ops, shared by the CPU and CUDA kernels
// (docs/design.md, decode_attention / block_attention).
// Provides: slot_causal(sp, qp) (held and at or before the query: the slots accumulate counts
// as seen), slot_visible(sp, qp, window) (causal and inside the sliding window: the slots the
// softmax runs over) and soft_cap(logit, cap) (cap * tanh(logit / cap); cap = 0: unchanged).
#pragma once

#include <cstdint>

#if !defined(__CUDACC__)
#include <cmath>
#endif

#include "common.h"

namespace wkv {

WKV_HOST_DEVICE inline bool slot_causal(int64_t sp, int64_t qp) { return sp >= 0 && sp <= qp; }

// transformers' sliding window: kv_idx > q_idx - sliding_window, i.e. qp - sp < window.
WKV_HOST_DEVICE inline bool slot_visible(int64_t sp, int64_t qp, int64_t window) {
  return slot_causal(sp, qp) && (window <= 0 || qp - sp < window);
}

WKV_HOST_DEVICE inline float soft_cap(float logit, float cap) {
  if (!(cap > 0.0f)) return logit;
#if defined(__CUDA_ARCH__)
  return wkv_mul(cap, tanhf(wkv_div(logit, cap)));
#else
  return cap * std::tanh(logit / cap);
#endif
}

}  // namespace wkv
