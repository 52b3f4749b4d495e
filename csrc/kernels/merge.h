// merge.h: value merges of compress (all arithmetic in float32, rounded once to the K/V dtype).
// Provides:
//   scale_weights(n, weight, equal) / scaled_weight(sc, w): the one scaling of n merge weights
//     (compress's pairwise merge: n = 2; snap_compress's run merge: n = run + 1). Their sum s
//     (float32, in increasing k) not a positive finite number: every weight is `equal`, the
//     denominator n * equal. Else non-negative weights are scaled by a power of two 2^k so that
//     their sum lies in [1/2, 1): then |sum_k w_k v_k| <= max_k |v_k| never overflows, and tiny
//     weights (underflowing attention) do not underflow the products (0.3 merged with 0.3 at
//     weights 1e-45 gives 0.3, not 0). Scaling by 2^k is exact and the formula rounds
//     identically whenever no intermediate under/overflows, so only such broken cases change;
//   merge_weights(avg_j, avg_r): the pairwise convex weights (w_j, w_r, denominator) of
//     scale_weights, equal weights (1/2, 1/2, 1);
//   merge_value(vj, vr, w): (w_j v_j + w_r v_r) / (w_j + w_r) for one element;
//   weighted_merge_row<T>(vj, vr, D, stride): v_r <- merge over the D elements of one row;
//   cam_probability(avg_j, mean_R): CaM's merge probability p in [0, 1];
//   cam_add_row<T>(vj, vi, D, stride, m): v_i <- v_i + v_j / m;
//   the merge-rule options (MergeTarget, MergeWeighting, key_cosine, similar_better,
//     prefer_left, gate_passes, slot_weight): see the block at the end.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"
#include "convert.h"

namespace wkv {

struct MergeWeights { float wj, wr, denom; };

constexpr float kFloatMax = 3.402823466e+38f;
constexpr float kMinNormal = 1.17549435e-38f;  // 2^-126

// 2^(126 - e) for a positive normal float x with biased exponent e <= 252: x * it is in [1/2, 1).
WKV_HOST_DEVICE inline float unit_scale(float x) {
  return f32_from_bits((253u - ((f32_bits(x) >> 23) & 0xFFu)) << 23);
}

// How n merge weights are scaled (scale_weights); s = the sum of the scaled weights.
struct WeightScale {
  bool equal = false;  // the sum is not a positive finite number (0, < 0, inf, NaN)
  bool big = false;    // scaled by g first (the sum outside [2^-126, 2^64): g = 2^(+-64))
  bool unit = false;   // scaled by f = unit_scale(sum): the sum in [1/2, 1)
  float g = 1.0f, f = 1.0f, equal_w = 0.0f, s = 0.0f;
};

WKV_HOST_DEVICE inline float scaled_weight(const WeightScale& sc, float w) {
  if (sc.equal) return sc.equal_w;
  if (sc.big) w = wkv_mul(w, sc.g);
  if (sc.unit) w = wkv_mul(w, sc.f);
  return w;
}

// weight(k), k = 0 .. n-1: the unscaled weights (read again per pass, so a run of any length
// needs no storage); equal: the weight of each when their sum is not a positive finite number.
template <class Weight>
WKV_HOST_DEVICE inline WeightScale scale_weights(int64_t n, const Weight& weight, float equal) {
  WeightScale sc;
  auto sum = [&]() {
    float s = 0.0f;
    for (int64_t k = 0; k < n; ++k) s = wkv_add(s, scaled_weight(sc, weight(k)));
    return s;
  };
  bool nonneg = true;
  for (int64_t k = 0; k < n; ++k) nonneg = nonneg && weight(k) >= 0.0f;
  float s = sum();
  if (!(s > 0.0f && s <= kFloatMax)) {
    sc.equal = true;
    sc.equal_w = equal;
    sc.s = wkv_mul(equal, static_cast<float>(n));
    return sc;
  }
  if (nonneg && !(s >= 0.5f && s < 1.0f)) {
    if (s < kMinNormal || s >= 18446744073709551616.0f) {
      sc.big = true;
      sc.g = s < kMinNormal ? 18446744073709551616.0f : 5.42101086242752217e-20f;
      s = sum();
    }
    sc.unit = true;
    sc.f = unit_scale(s);
    s = sum();
  }
  sc.s = s;
  return sc;
}

WKV_HOST_DEVICE inline MergeWeights merge_weights(float avg_j, float avg_r) {
  const WeightScale sc =
      scale_weights(2, [&](int64_t k) { return k == 0 ? avg_j : avg_r; }, 0.5f);
  return MergeWeights{scaled_weight(sc, avg_j), scaled_weight(sc, avg_r), sc.s};
}

WKV_HOST_DEVICE inline float merge_value(float vj, float vr, MergeWeights w) {
  return wkv_div(wkv_add(wkv_mul(w.wj, vj), wkv_mul(w.wr, vr)), w.denom);
}

template <class T>
WKV_HOST_DEVICE inline void weighted_merge_row(const T* vj, T* vr, int64_t D, int64_t stride_j,
                                               int64_t stride_r, MergeWeights w) {
  for (int64_t d = 0; d < D; ++d) {
    const float a = to_float(vj[d * stride_j]);
    const float b = to_float(vr[d * stride_r]);
    vr[d * stride_r] = from_float<T>(merge_value(a, b, w));
  }
}

// p = clamp(avg_j / mean_R, 0, 1); 1 if mean_R == 0 < avg_j; 0 if avg_j == 0 or any NaN.
WKV_HOST_DEVICE inline float cam_probability(float avg_j, float mean_r) {
  if (wkv_isnan(avg_j) || wkv_isnan(mean_r) || avg_j == 0.0f) return 0.0f;
  if (mean_r == 0.0f) return avg_j > 0.0f ? 1.0f : 0.0f;
  const float p = wkv_div(avg_j, mean_r);
  if (wkv_isnan(p) || p <= 0.0f) return 0.0f;
  return p >= 1.0f ? 1.0f : p;
}

template <class T>
WKV_HOST_DEVICE inline void cam_add_row(const T* vj, T* vi, int64_t D, int64_t stride_j,
                                        int64_t stride_i, int64_t m) {
  const float fm = static_cast<float>(m);
  for (int64_t d = 0; d < D; ++d) {
    const float add = wkv_div(to_float(vj[d * stride_j]), fm);
    vi[d * stride_i] = from_float<T>(wkv_add(to_float(vi[d * stride_i]), add));
  }
}


// ---- merge-rule options of weightedkv (docs/design.md, compress; issue #14) ------------------
// merge_target: which held token receives v_j.
//   right   (paper): the next held token in (position, slot) order;
//   similar: of the two held neighbours (previous / next in that order) the one whose key has
//            the larger cosine with k_j (ties and NaN go to the right one; a lone neighbour wins);
//   nearest: the held token (any, sinks and recent included) whose key has the largest cosine
//            with k_j (MergingPress-style; ties to the smaller (position, slot), NaN lowest).
// merge_gate g in [0, 1]: 0 = off; g > 0: the merge happens only if cos(k_j, k_target) >= g,
//   else j is simply dropped (CaM's gate; D2O's threshold without the EMA).
// merge_weights: the two convex weights fed to merge_weights():
//   average (paper): avg_j, avg_t;
//   mass   (KeepKV-style): avg_i * (1 + merged_i), merged_i = the evicted tokens slot i already
//          absorbed (transitively), so a slot that carries ten tokens weighs like eleven.
// Every merge adds 1 + merged_j to merged_t (the instrumentation of cache.merge_stats()).
enum class MergeTarget : int { Right = 0, Similar = 1, Nearest = 2 };
enum class MergeWeighting : int { Average = 0, Mass = 1 };
constexpr const char* kMergeTargetNames[] = {"right", "similar", "nearest"};
constexpr int kNumMergeTargets = 3;
constexpr const char* kMergeWeightingNames[] = {"average", "mass"};
constexpr int kNumMergeWeightings = 2;

WKV_HOST_DEVICE inline float wkv_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);  // IEEE correctly rounded, like torch.sqrt on float32
#endif
}

// cos(a, b) in float32: dot, |a|^2, |b|^2 summed in increasing d (no FMA), then
// dot / (sqrt(|a|^2) * sqrt(|b|^2)); 0 when that denominator is not > 0.
template <class T>
WKV_HOST_DEVICE inline float key_cosine(const T* a, const T* b, int64_t D, int64_t stride_a,
                                        int64_t stride_b) {
  float dot = 0.0f, na = 0.0f, nb = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float x = to_float(a[d * stride_a]), y = to_float(b[d * stride_b]);
    dot = wkv_add(dot, wkv_mul(x, y));
    na = wkv_add(na, wkv_mul(x, x));
    nb = wkv_add(nb, wkv_mul(y, y));
  }
  const float den = wkv_mul(wkv_sqrt(na), wkv_sqrt(nb));
  return den > 0.0f ? wkv_div(dot, den) : 0.0f;
}

// "a is a better nearest target than b": larger cosine (NaN below every number), then the
// smaller (position, slot). A strict total order over distinct slots.
WKV_HOST_DEVICE inline bool similar_better(float ca, int64_t pa, int64_t sa, float cb, int64_t pb,
                                           int64_t sb) {
  const bool na = wkv_isnan(ca), nb = wkv_isnan(cb);
  if (na != nb) return nb;
  if (!na) {
    if (ca > cb) return true;
    if (cb > ca) return false;
  }
  return pa != pb ? pa < pb : sa < sb;
}

// "similar": take the previous neighbour only when its cosine is strictly larger.
WKV_HOST_DEVICE inline bool prefer_left(float cos_left, float cos_right) {
  return wkv_isnan(cos_right) ? !wkv_isnan(cos_left) : cos_left > cos_right;
}

// The gate: true when the merge goes ahead (gate 0 = off; NaN cosines never pass a gate).
WKV_HOST_DEVICE inline bool gate_passes(float gate, float cos) {
  return !(gate > 0.0f) || cos >= gate;
}

// The weight of slot i in merge_weights(): avg_i (paper) or avg_i * (1 + merged_i).
WKV_HOST_DEVICE inline float slot_weight(MergeWeighting w, float avg, float merged) {
  return w == MergeWeighting::Mass ? wkv_mul(avg, wkv_add(1.0f, merged)) : avg;
}

}  // namespace wkv
