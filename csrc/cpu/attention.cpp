// attention.cpp: CPU implementation of weightedkv::decode_attention and
// weightedkv::block_attention (docs/design.md); decode_attention is the case Q = 1.
// Per (b, h), for each query q in increasing order, the G query heads of KV head h attend over the
// visible held slots (slot_pos <= query_pos, inside the window if any; slot order):
//   visible_slots -> query_logits (scale * <q, k>, G heads per key load) -> softmax_rows
//   (soft-cap, max-subtracted exp, optional sink logit in the normaliser) -> weighted_values
//   (out = sum_c p_c v_c in float32, rounded once) -> the per-slot statistics of accumulate.
// Nothing of size [Q, C] is stored: one query's G x (visible slots) probabilities live in a
// per-thread scratch row, the statistics in per-slot float32 sums added to scores once per (b, h)
// exactly as accumulate adds its sums (so the statistics equal accumulate's on these
// probabilities bit for bit). Each (b, h) is one task in a fixed order: results do not depend on
// the thread count. The row loop is also compiled for AVX2 (picked at run time, isa.h): same
// operations in the same order, no FMA contraction, hence the same results bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../kernels/attention.h"
#include "../kernels/convert.h"
#include "../kernels/policy.h"
#include "cpu_common.h"
#include "isa.h"

namespace wkv::cpu {
namespace {

// 8 float lanes as a GCC vector: element-wise IEEE operations (no contraction: -ffp-contract=off),
// lowered to two SSE registers by default and to one AVX2 register in the AVX2 build. Helpers take
// and give v8f by reference, never by value: a 32-byte vector passed or returned by value has a
// different ABI with and without AVX (-Wpsabi), although everything here is inlined.
typedef float v8f __attribute__((vector_size(32)));

WKV_CPU_INLINE void load8(v8f& v, const float* p) { __builtin_memcpy(&v, p, sizeof(v)); }
WKV_CPU_INLINE void store8(float* p, const v8f& v) { __builtin_memcpy(p, &v, sizeof(v)); }

WKV_CPU_INLINE float combine8(const v8f& s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Dot products of NG query rows (q, row stride D) with NK key rows, each the same sum as
//   s[l] += a[d + l] * b[d + l] over blocks of 8 (then the tail into s[0..]), combined pairwise:
// the NG x NK sums are independent chains computed side by side (latency hiding only).
template <int NG, int NK>
WKV_CPU_INLINE void dots(const float* q, const float* const* k, int64_t D, float scale,
                         float* out, int64_t out_g_stride) {
  v8f s[NG][NK];
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < NK; ++j) s[g][j] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f kv[NK];
    for (int j = 0; j < NK; ++j) load8(kv[j], k[j] + d);
    for (int g = 0; g < NG; ++g) {
      v8f qv;
      load8(qv, q + g * D + d);
      for (int j = 0; j < NK; ++j) s[g][j] += qv * kv[j];
    }
  }
  for (int l = 0; d < D; ++d, ++l)
    for (int g = 0; g < NG; ++g)
      for (int j = 0; j < NK; ++j) s[g][j][l] += q[g * D + d] * k[j][d];
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < NK; ++j) out[g * out_g_stride + j] = combine8(s[g][j]) * scale;
}

// Prefetches one row of `bytes` bytes (slots are scattered, so the hardware prefetcher cannot
// guess the next row).
WKV_CPU_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// logits[g * n + i] = scale * <q_g, k_i> for query heads g0 .. g0 + NG - 1.
template <int NG, class KeyRow, class Prefetch>
WKV_CPU_INLINE void qk_rows(const float* q, int64_t D, int64_t n, float scale, KeyRow key_row,
                            Prefetch prefetch, float* logits) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    if (i + 5 < n) {
      prefetch(i + 4);
      prefetch(i + 5);
    }
    const float* k[2] = {key_row(i, 0), key_row(i + 1, 1)};
    dots<NG, 2>(q, k, D, scale, logits + i, n);
  }
  for (; i < n; ++i) {
    const float* k[1] = {key_row(i, 0)};
    dots<NG, 1>(q, k, D, scale, logits + i, n);
  }
}

// acc[d] += w_i * v_i[d] for the rows i in increasing order (each element: the same sequence of
// roundings as one row at a time), NK rows per pass to keep acc in registers.
template <int NK>
WKV_CPU_INLINE void axpy_rows(float* acc, const float* const* v, const float* w, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f a, x;
    load8(a, acc + d);
    for (int j = 0; j < NK; ++j) {
      load8(x, v[j] + d);
      a = a + w[j] * x;
    }
    store8(acc + d, a);
  }
  for (; d < D; ++d) {
    float a = acc[d];
    for (int j = 0; j < NK; ++j) a = a + w[j] * v[j][d];
    acc[d] = a;
  }
}

// A contiguous float view of one row: the row itself when it already is one, else a converted
// copy in dst.
template <class T>
WKV_CPU_INLINE const float* row_f32(const T* src, int64_t stride, int64_t D, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return src;
  }
  if (stride == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d * stride]);
  }
  return dst;
}

// Per-thread scratch, reused across calls (no allocation once warm). Sizes: O(G*D + C).
struct Scratch {
  std::vector<float> qf, acc, row, logits, sum, plast;
  std::vector<int64_t> seen, cnt;
};
constexpr int kRows = 4;  // key/value rows per pass of weighted_values

// Phase 1: the slots query position qp sees, in slot order, into seen[0..n); counts every causal
// held slot in cnt (accumulate's "sees": a causal slot outside the window is seen with p = 0).
WKV_CPU_INLINE int64_t visible_slots(const AttentionParams& p, const int64_t* pos, int64_t qp,
                                     Scratch& s) {
  int64_t n = 0;
  for (int64_t c = 0; c < p.C; ++c) {
    const int64_t sp = pos[c * p.pos_st.s2];
    if (!slot_causal(sp, qp)) continue;
    s.cnt[c] += 1;
    if (slot_visible(sp, qp, p.window)) s.seen[n++] = c;
  }
  return n;
}

// Phase 2: logits[g * n + i] = scale * <q_g, k_seen[i]> for the G query heads of (b, h, q).
template <class T>
WKV_CPU_INLINE void query_logits(const AttentionParams& p, int64_t b, int64_t h, int64_t q,
                                 int64_t n, Scratch& s) {
  const int64_t G = p.G, D = p.D;
  const T* query = static_cast<const T*>(p.query);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d)
      s.qf[g * D + d] = to_float(query[off(p.query_st, b, h * G + g, q, d)]);
  const T* kbase = static_cast<const T*>(p.keys) + off(p.keys_st, b, h, 0, 0);
  const int64_t* seen = s.seen.data();
  float* row = s.row.data();
  auto key_row = [&](int64_t i, int j) {
    return row_f32(kbase + seen[i] * p.keys_st.s2, p.keys_st.s3, D, row + j * D);
  };
  const int64_t kbytes = p.keys_st.s3 == 1 ? D * int64_t(sizeof(T)) : 64;
  auto key_prefetch = [&](int64_t i) { prefetch_row(kbase + seen[i] * p.keys_st.s2, kbytes); };
  for (int64_t g = 0; g < G;) {
    const int64_t ng = std::min<int64_t>(4, G - g);
    float* lg = &s.logits[g * n];
    const float* qg = &s.qf[g * D];
    if (ng == 4) qk_rows<4>(qg, D, n, p.scale, key_row, key_prefetch, lg);
    else if (ng == 3) qk_rows<3>(qg, D, n, p.scale, key_row, key_prefetch, lg);
    else if (ng == 2) qk_rows<2>(qg, D, n, p.scale, key_row, key_prefetch, lg);
    else qk_rows<1>(qg, D, n, p.scale, key_row, key_prefetch, lg);
    g += ng;
  }
}

// Phase 3: per query head, in place: soft-cap, then p = exp(l - m) / Z with m the max logit and
// Z = sum exp(l - m), both including the head's sink logit when there is one.
WKV_CPU_INLINE void softmax_rows(const AttentionParams& p, int64_t h, int64_t n, float* logits) {
  for (int64_t g = 0; g < p.G; ++g) {
    float* l = &logits[g * n];
    if (p.softcap > 0.0f)
      for (int64_t i = 0; i < n; ++i) l[i] = soft_cap(l[i], p.softcap);
    float mx = l[0];
    for (int64_t i = 1; i < n; ++i) mx = (l[i] > mx || mx != mx) ? l[i] : mx;  // fmax
    const float sink = p.sinks ? p.sinks[off(p.sinks_st, h * p.G + g)] : 0.0f;
    if (p.sinks) mx = (sink > mx || mx != mx) ? sink : mx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      l[i] = std::exp(l[i] - mx);
      sum += l[i];
    }
    if (p.sinks) sum += std::exp(sink - mx);
    for (int64_t i = 0; i < n; ++i) l[i] = l[i] / sum;
  }
}

// Phase 4: acc[g * D + d] = sum_i p[g][i] v_seen[i][d] in increasing i.
template <class T>
WKV_CPU_INLINE void weighted_values(const AttentionParams& p, int64_t b, int64_t h, int64_t n,
                                    Scratch& s) {
  const int64_t G = p.G, D = p.D;
  std::fill(s.acc.begin(), s.acc.end(), 0.0f);
  const T* vbase = static_cast<const T*>(p.values) + off(p.values_st, b, h, 0, 0);
  const int64_t* seen = s.seen.data();
  const float* logits = s.logits.data();
  float* row = s.row.data();
  const int64_t vbytes = p.values_st.s3 == 1 ? D * int64_t(sizeof(T)) : 64;
  int64_t i = 0;
  for (; i + kRows <= n; i += kRows) {
    if (i + 2 * kRows <= n)
      for (int j = 0; j < kRows; ++j)
        prefetch_row(vbase + seen[i + kRows + j] * p.values_st.s2, vbytes);
    const float* v[kRows];
    for (int j = 0; j < kRows; ++j)
      v[j] = row_f32(vbase + seen[i + j] * p.values_st.s2, p.values_st.s3, D, row + j * D);
    for (int64_t g = 0; g < G; ++g) {
      float w[kRows];
      for (int j = 0; j < kRows; ++j) w[j] = logits[g * n + i + j];
      axpy_rows<kRows>(&s.acc[g * D], v, w, D);
    }
  }
  for (; i < n; ++i) {
    const float* v[1] = {row_f32(vbase + seen[i] * p.values_st.s2, p.values_st.s3, D, row)};
    for (int64_t g = 0; g < G; ++g) axpy_rows<1>(&s.acc[g * D], v, &logits[g * n + i], D);
  }
}

// out[b, h*G + g, q, :] = acc[g] (zero: zeros), rounded once to T.
template <class T>
WKV_CPU_INLINE void write_out(const AttentionParams& p, int64_t b, int64_t h, int64_t q,
                              const float* acc, bool zero) {
  T* out = static_cast<T*>(p.out);
  for (int64_t g = 0; g < p.G; ++g) {
    T* o = out + off(p.out_st, b, h * p.G + g, q, 0);
    for (int64_t d = 0; d < p.D; ++d)
      o[d * p.out_st.s3] = from_float<T>(zero ? 0.0f : acc[g * p.D + d]);
  }
}

template <class T>
WKV_CPU_INLINE void attention_rows(const AttentionParams& p, int64_t begin, int64_t end) {
  const int64_t G = p.G, C = p.C, D = p.D;
  thread_local Scratch s;
  s.qf.resize(G * D);
  s.acc.resize(G * D);
  s.row.resize(kRows * D);
  s.logits.resize(G * C);
  s.seen.resize(C);
  s.sum.resize(C);
  s.plast.resize(C);
  s.cnt.resize(C);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    const int64_t* pos = p.slot_pos + off(p.pos_st, b, h, 0);
    int64_t q_star = -1;  // the last valid query (sets `last`)
    for (int64_t q = 0; q < p.Q; ++q)
      if (p.query_pos[off(p.query_pos_st, b, q)] >= 0) q_star = q;
    std::fill(s.sum.begin(), s.sum.end(), 0.0f);
    std::fill(s.plast.begin(), s.plast.end(), 0.0f);
    std::fill(s.cnt.begin(), s.cnt.end(), 0);
    for (int64_t q = 0; q < p.Q; ++q) {
      const int64_t qp = p.query_pos[off(p.query_pos_st, b, q)];
      if (qp < 0) {  // padding query: zeros, no statistics
        write_out<T>(p, b, h, q, nullptr, true);
        continue;
      }
      const int64_t n = visible_slots(p, pos, qp, s);
      if (n == 0) {  // sees nothing: zeros (its probabilities are all 0)
        write_out<T>(p, b, h, q, nullptr, true);
        continue;
      }
      query_logits<T>(p, b, h, q, n, s);
      softmax_rows(p, h, n, s.logits.data());
      weighted_values<T>(p, b, h, n, s);
      write_out<T>(p, b, h, q, s.acc.data(), false);
      // statistics: the group reduction of the probabilities, summed in query order
      for (int64_t i = 0; i < n; ++i) {
        float red = reduce_init(p.reduce, s.logits[i]);
        for (int64_t g = 1; g < G; ++g) red = reduce_step(p.reduce, red, s.logits[g * n + i]);
        red = reduce_finish(p.reduce, red, static_cast<int>(G));
        s.sum[s.seen[i]] += red;
        if (q == q_star) s.plast[s.seen[i]] = red;
      }
    }
    if (q_star < 0) continue;  // no valid query: the statistics are unchanged
    const int64_t qp_star = p.query_pos[off(p.query_pos_st, b, q_star)];
    float* scores = p.scores + off(p.scores_st, b, h, 0);
    float* counts = p.counts + off(p.counts_st, b, h, 0);
    float* last = p.last + off(p.last_st, b, h, 0);
    for (int64_t c = 0; c < C; ++c) {  // as accumulate: held slots only
      const int64_t sp = pos[c * p.pos_st.s2];
      if (sp < 0) continue;
      scores[c * p.scores_st.s2] += s.sum[c];
      counts[c * p.counts_st.s2] += static_cast<float>(s.cnt[c]);
      last[c * p.last_st.s2] = sp <= qp_star ? s.plast[c] : 0.0f;
    }
  }
}

template <class T>
WKV_AVX2_TARGET void attention_rows_avx2(const AttentionParams& p, int64_t begin, int64_t end) {
  attention_rows<T>(p, begin, end);
}

void run(const AttentionParams& p, at::ScalarType dtype) {
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0) return;
  // the dtype was validated by prepare_*: the dispatch name never shows
  WKV_DISPATCH_FLOAT_TYPES(dtype, "attention", [&] {
    using T = host::elem_t<scalar_t>;
    const int64_t work = int64_t(p.Q) * p.G * p.C * p.D;
    at::parallel_for(0, rows, grain(work), [&](int64_t begin, int64_t end) {
      if (cpu_has_avx2())
        attention_rows_avx2<T>(p, begin, end);
      else
        attention_rows<T>(p, begin, end);
    });
  });
}

}  // namespace

void decode_attention(const at::Tensor& query, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& slot_pos,
                          const at::Tensor& query_pos, const at::Tensor& scores,
                          const at::Tensor& counts, const at::Tensor& last, double scale,
                          c10::string_view group_reduce, int64_t window, double softcap,
                          const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  run(host::prepare_decode(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                           group_reduce, window, softcap, sinks, out),
      query.scalar_type());
}

void block_attention(const at::Tensor& query, const at::Tensor& keys,
                         const at::Tensor& values, const at::Tensor& slot_pos,
                         const at::Tensor& query_pos, const at::Tensor& scores,
                         const at::Tensor& counts, const at::Tensor& last, double scale,
                         c10::string_view group_reduce, int64_t window, double softcap,
                         const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  run(host::prepare_block(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                          group_reduce, window, softcap, sinks, out),
      query.scalar_type());
}

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("block_attention", &block_attention);
}

}  // namespace wkv::cpu
