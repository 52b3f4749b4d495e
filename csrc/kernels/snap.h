// snap.h: the prompt-end step of the "snapkv" prompt mode (SnapKV, Li et al., arXiv 2404.14469),
// torch-free and shared by csrc/cpu/snap.cpp and csrc/cuda/snap.cu (docs/design.md,
// "snap_compress").
// Provides: SnapParams; the row phases, on one (b, h) row whose held tokens are given in position
// order (`order[r]` = slot of rank r, r < L):
//   snap_pooled(s, r, L, pool): the average of the window-score sums s[r - pool/2 .. r + pool/2]
//     (ranks outside [0, L) count as 0; sum in increasing rank, divided by pool);
//   snap_before(ka, ra, kb, rb): the keep order: higher pooled score first, then lower rank
//     (NaN sorts lowest);
//   snap_merge_run<T>(c, b, h, order, r0, r): the values of the dropped ranks [r0, r) merged into
//     kept rank r, weighted by their average window attention (scores / counts);
//   snap_drop(c, b, h, slot): a dropped token leaves its slot (slot_pos -1, statistics 0);
//   snap_write_kept(p, b, h, order, keep, L): the row's kept list (the output `kept`).
#pragma once

#include <cstdint>

#include "common.h"
#include "convert.h"
#include "merge.h"
#include "params.h"
#include "policy.h"

namespace wkv {

// snap_compress: cache tensors as compress; kept [B, H, C] int64 is written: kept[b, h, t] = slot
// of the t-th held token (position order) after the call, -1 beyond.
struct SnapParams {
  CacheParams cache{};
  int64_t budget = 0, sinks = 0, recent = 0, pool = 1;
  bool merge = false;
  int64_t* kept = nullptr; Stride3 kept_st{};
};

// NaN -> -inf, so that it sorts lowest (removed first), as compress's NaN keys.
WKV_HOST_DEVICE inline float snap_key(float x) { return x != x ? f32_from_bits(0xFF800000u) : x; }

WKV_HOST_DEVICE inline float snap_pooled(const float* s, int64_t r, int64_t L, int64_t pool) {
  const int64_t half = pool / 2;
  float acc = 0.0f;
  for (int64_t i = r - half; i <= r + half; ++i)
    if (i >= 0 && i < L) acc = wkv_add(acc, s[i]);
  return wkv_div(acc, static_cast<float>(pool));
}

// True if rank ra (pooled key ka) is kept before rank rb (key kb).
WKV_HOST_DEVICE inline bool snap_before(float ka, int64_t ra, float kb, int64_t rb) {
  ka = snap_key(ka);
  kb = snap_key(kb);
  return ka > kb || (ka == kb && ra < rb);
}

// The average window attention of rank k (the merge weight), from the row's statistics.
WKV_HOST_DEVICE inline float snap_avg(const CacheParams& c, int64_t b, int64_t h, int64_t slot) {
  return avg_score(c.scores[off(c.scores_st, b, h, slot)], c.counts[off(c.counts_st, b, h, slot)]);
}

// The kept rank r absorbs the dropped ranks r0 .. r-1 (order[k] = slot of rank k):
// v_r <- (sum_k w_k v_k) / (sum_k w_k) over k = r, r-1, .., r0 (float32, in that order, rounded
// once), w_k = avg_k = scores / counts, scaled as compress's pairwise merge (scale_weights in
// merge.h; equal weights 1 when their sum is not a positive finite number). Keys and statistics
// of r are left as they are.
template <class T>
WKV_HOST_DEVICE inline void snap_merge_run(const CacheParams& c, int64_t b, int64_t h,
                                           const int64_t* order, int64_t r0, int64_t r) {
  const WeightScale sc = scale_weights(
      r - r0 + 1, [&](int64_t i) { return snap_avg(c, b, h, order[r - i]); }, 1.0f);
  const float s = sc.s;
  T* values = static_cast<T*>(c.values);
  const int64_t vs = c.values_st.s3;
  T* out = values + off(c.values_st, b, h, order[r], 0);
  for (int64_t d = 0; d < c.D; ++d) {
    float acc = 0.0f;
    for (int64_t k = r; k >= r0; --k) {
      const float w = scaled_weight(sc, snap_avg(c, b, h, order[k]));
      acc = wkv_add(acc, wkv_mul(w, to_float(values[off(c.values_st, b, h, order[k], 0) + d * vs])));
    }
    out[d * vs] = from_float<T>(wkv_div(acc, s));
  }
}

WKV_HOST_DEVICE inline void snap_drop(const CacheParams& c, int64_t b, int64_t h, int64_t slot) {
  c.slot_pos[off(c.pos_st, b, h, slot)] = -1;
  c.scores[off(c.scores_st, b, h, slot)] = 0.0f;
  c.counts[off(c.counts_st, b, h, slot)] = 0.0f;
  c.last[off(c.last_st, b, h, slot)] = 0.0f;
}

// kept[b, h, t] = the slot of the t-th kept rank (keep[k] != 0, k < L), then -1 up to C.
template <class Flag>
WKV_HOST_DEVICE inline void snap_write_kept(const SnapParams& p, int64_t b, int64_t h,
                                            const int64_t* order, const Flag* keep, int64_t L) {
  int64_t t = 0;
  for (int64_t k = 0; k < L; ++k)
    if (keep[k]) p.kept[off(p.kept_st, b, h, t++)] = order[k];
  for (; t < p.cache.C; ++t) p.kept[off(p.kept_st, b, h, t)] = -1;
}

}  // namespace wkv
