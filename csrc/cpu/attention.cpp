// attention.cpp: CPU implementation of weightedkv::decode_attention and
// weightedkv::block_attention (docs/design.md); decode_attention is the case Q = 1.
// Per (b, h), the queries are taken in tiles of up to kTileRows query rows (queries x the G
// query heads of KV head h); for each tile:
//   visible_slots (the union of the slots its queries see, slot order) -> query_logits (scale *
//   <q, k>: each key row loaded once per tile, dotted with 4 rows x 2 keys per pass) ->
//   softmax_rows (per row over the slots its query sees: soft-cap, max-subtracted exp, optional
//   sink logit in the normaliser) -> weighted_values (out = sum_c p_c v_c in float32, each value
//   row loaded once per tile, rounded once) -> the per-slot statistics of accumulate.
// Nothing of size [Q, C] is stored: a tile's rows x (union slots) probabilities live in a
// per-thread scratch block, the statistics in per-slot float32 sums added to scores once per (b, h)
// exactly as accumulate adds its sums (so the statistics equal accumulate's on these
// probabilities bit for bit). Every per-row result is computed by the same sequence of float
// operations whatever the tile (a row only ever uses the slots its query sees, in slot order), so
// block_attention with Q = 1 equals decode_attention bit for bit. Each (b, h) is one task in a
// fixed order: results do not depend on the thread count. The loops are also compiled for
// AVX2+FMA (picked at run time, isa.h): the same operations in the same order (explicit fused
// multiply-adds, fmaf per lane in the baseline build; exp by the polynomial exp8, not libm),
// hence the same results bit for bit.
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

// acc = fma(a, b, acc) lane by lane (one rounding each). kFma: the AVX2+FMA build (one vfmadd);
// otherwise the baseline build calls fmaf per lane, which rounds the same way (slow, only for
// CPUs without AVX2/FMA). Every function below that multiplies and adds takes kFma.
template <bool kFma>
WKV_CPU_INLINE void fma8(v8f& acc, const v8f& a, const v8f& b) {
#if WKV_HAVE_AVX2_PATH
  if constexpr (kFma) {  // only ever inlined into the avx2,fma wrapper (target checks skip asm)
    asm("vfmadd231ps %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return;
  }
#endif
  for (int l = 0; l < 8; ++l) acc[l] = __builtin_fmaf(a[l], b[l], acc[l]);
}

typedef int32_t v8i __attribute__((vector_size(32)));  // lane masks of v8f comparisons (0 / -1)
typedef float v4f __attribute__((vector_size(16)));

WKV_CPU_INLINE float combine8(const v8f& s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// [a0 + a1, a2 + a3, b0 + b1, b2 + b3, a4 + a5, a6 + a7, b4 + b5, b6 + b7] (vhaddps).
WKV_CPU_INLINE void pair_sums(v8f& out, const v8f& a, const v8f& b) {
  const v8f even = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14);
  const v8f odd = __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  out = even + odd;
}

// out[j] = combine8(s_j) for four vectors, with the same additions (the same pairs, in the same
// tree), done across the four vectors at once instead of one horizontal sum each.
WKV_CPU_INLINE void combine8x4(float* out, const v8f& a, const v8f& b, const v8f& c,
                               const v8f& d) {
  v8f ab, cd, abcd;
  pair_sums(ab, a, b);        // pairs of a and b
  pair_sums(cd, c, d);        // pairs of c and d
  pair_sums(abcd, ab, cd);    // [a0123, b0123, c0123, d0123, a4567, b4567, c4567, d4567]
  const v4f lo = __builtin_shufflevector(abcd, abcd, 0, 1, 2, 3);
  const v4f hi = __builtin_shufflevector(abcd, abcd, 4, 5, 6, 7);
  const v4f sum = lo + hi;
  __builtin_memcpy(out, &sum, sizeof(sum));
}

// Dot products of NG query rows (q, row stride D) with NK key rows, each the same sum as
//   s[l] = fma(a[d + l], b[d + l], s[l]) over blocks of 8, combined pairwise, plus the D % 8 tail
//   summed in order:
// the NG x NK sums are independent chains computed side by side (latency hiding only).
template <bool kFma, int NG, int NK>
WKV_CPU_INLINE void dots(const float* q, const float* const* k, int64_t D, float scale,
                         float* out, int64_t out_g_stride) {
  v8f s[NG][NK];
  _Pragma("GCC unroll 8")
  for (int g = 0; g < NG; ++g)
    _Pragma("GCC unroll 8")
    for (int j = 0; j < NK; ++j) s[g][j] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  if constexpr (NG == 4 && NK == 2) {
    // The hot case, with named accumulators: GCC keeps an array of vectors in stack memory
    // (every FMA would load and store it), named locals stay in registers. Same operations.
    v8f s00 = s[0][0], s01 = s[0][1], s10 = s[1][0], s11 = s[1][1];
    v8f s20 = s[2][0], s21 = s[2][1], s30 = s[3][0], s31 = s[3][1];
    for (; d + 8 <= D; d += 8) {
      v8f k0, k1, q0, q1, q2, q3;
      load8(k0, k[0] + d);
      load8(k1, k[1] + d);
      load8(q0, q + d);
      fma8<kFma>(s00, q0, k0);
      fma8<kFma>(s01, q0, k1);
      load8(q1, q + D + d);
      fma8<kFma>(s10, q1, k0);
      fma8<kFma>(s11, q1, k1);
      load8(q2, q + 2 * D + d);
      fma8<kFma>(s20, q2, k0);
      fma8<kFma>(s21, q2, k1);
      load8(q3, q + 3 * D + d);
      fma8<kFma>(s30, q3, k0);
      fma8<kFma>(s31, q3, k1);
    }
    if (d == D) {  // no tail: the 8 horizontal sums across the vectors
      float c[8];
      combine8x4(c, s00, s01, s10, s11);
      combine8x4(c + 4, s20, s21, s30, s31);
      _Pragma("GCC unroll 8")
      for (int g = 0; g < 4; ++g)
        _Pragma("GCC unroll 8")
        for (int j = 0; j < 2; ++j) out[g * out_g_stride + j] = (c[g * 2 + j] + 0.0f) * scale;
      return;
    }
    s[0][0] = s00, s[0][1] = s01, s[1][0] = s10, s[1][1] = s11;
    s[2][0] = s20, s[2][1] = s21, s[3][0] = s30, s[3][1] = s31;
  } else {
    for (; d + 8 <= D; d += 8) {
      v8f kv[NK];
      _Pragma("GCC unroll 8")
      for (int j = 0; j < NK; ++j) load8(kv[j], k[j] + d);
      _Pragma("GCC unroll 8")
      for (int g = 0; g < NG; ++g) {
        v8f qv;
        load8(qv, q + g * D + d);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < NK; ++j) fma8<kFma>(s[g][j], qv, kv[j]);
      }
    }
  }
  // the D % 8 tail: scalar sums in order, added after the pairwise combination
  float tail[NG][NK] = {};
  for (; d < D; ++d)
    _Pragma("GCC unroll 8")
    for (int g = 0; g < NG; ++g)
      _Pragma("GCC unroll 8")
      for (int j = 0; j < NK; ++j) tail[g][j] = __builtin_fmaf(q[g * D + d], k[j][d], tail[g][j]);
  _Pragma("GCC unroll 8")
  for (int g = 0; g < NG; ++g)
    _Pragma("GCC unroll 8")
    for (int j = 0; j < NK; ++j) out[g * out_g_stride + j] = (combine8(s[g][j]) + tail[g][j]) * scale;
}

// Prefetches one row of `bytes` bytes (slots are scattered, so the hardware prefetcher cannot
// guess the next row).
WKV_CPU_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// acc[d] += w_i * v_i[d] for the rows i in increasing order (each element: the same sequence of
// roundings as one row at a time), NK rows per pass to keep acc in registers.
template <bool kFma, int NK>
WKV_CPU_INLINE void axpy_rows(float* acc, const float* const* v, const float* w, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f a, x;
    load8(a, acc + d);
    for (int j = 0; j < NK; ++j) {
      load8(x, v[j] + d);
      const v8f wj = v8f{} + w[j];
      fma8<kFma>(a, wj, x);
    }
    store8(acc + d, a);
  }
  for (; d < D; ++d) {
    float a = acc[d];
    for (int j = 0; j < NK; ++j) a = __builtin_fmaf(w[j], v[j][d], a);
    acc[d] = a;
  }
}

// axpy_rows for two accumulator rows at once (each element: the same sequence of roundings).
template <bool kFma, int NK>
WKV_CPU_INLINE void axpy_rows2(float* acc0, float* acc1, const float* const* v, const float* w0,
                               const float* w1, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f a0, a1, x;
    load8(a0, acc0 + d);
    load8(a1, acc1 + d);
    _Pragma("GCC unroll 8")
    for (int j = 0; j < NK; ++j) {
      load8(x, v[j] + d);
      const v8f wa = v8f{} + w0[j], wb = v8f{} + w1[j];
      fma8<kFma>(a0, wa, x);
      fma8<kFma>(a1, wb, x);
    }
    store8(acc0 + d, a0);
    store8(acc1 + d, a1);
  }
  for (; d < D; ++d) {
    float a = acc0[d], b = acc1[d];
    for (int j = 0; j < NK; ++j) {
      a = __builtin_fmaf(w0[j], v[j][d], a);
      b = __builtin_fmaf(w1[j], v[j][d], b);
    }
    acc0[d] = a;
    acc1[d] = b;
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

// Per-thread scratch, reused across calls (no allocation once warm). Sizes: O(R*D + R*C + C),
// R = rows of a query tile (at most kTileRows query heads x queries, at least G).
struct Scratch {
  std::vector<float> qf, acc, row, logits, sum, plast;
  std::vector<int64_t> seen, spos, cnt, qpos;
  std::vector<int32_t> vis;   // per union slot: whether the query being normalised sees it
  std::vector<uint8_t> live;  // per tile row: its query sees at least one slot
};
constexpr int kRows = 4;          // key/value rows per pass of weighted_values
constexpr int64_t kPrefetchFew = 16;  // slot rows prefetched ahead when a tile has <= 8 rows
constexpr int64_t kTileRows = 64;  // query rows (queries x G heads) sharing each key/value load

// A tile of queries q0 .. q0 + nq - 1 of one (b, h): row r = qi * G + g is query head g of
// query q0 + qi. The tile works on the union of the slots its queries see (seen[0..n), in slot
// order, with their positions spos); each row uses only the slots its own query sees, in that
// order, so every per-row result is the one a tile of one query (decode) gives, bit for bit.
struct Tile {
  int64_t q0, nq, n;
  bool all_visible;  // every row sees every union slot (a single query): no per-slot checks
};

WKV_CPU_INLINE bool row_sees(const AttentionParams& p, const Tile& t, const Scratch& s,
                             int64_t qi, int64_t i) {
  return t.all_visible || slot_visible(s.spos[i], s.qpos[qi], p.window);
}

// Phase 1: counts every causal held slot of each valid query in cnt (accumulate's "sees": a
// causal slot outside the window is seen with p = 0); the union of the visible slots into seen.
WKV_CPU_INLINE void visible_slots(const AttentionParams& p, const int64_t* pos, Tile& t,
                                  Scratch& s) {
  int64_t n = 0;
  for (int64_t c = 0; c < p.C; ++c) {
    const int64_t sp = pos[c * p.pos_st.s2];
    bool any = false;
    for (int64_t qi = 0; qi < t.nq; ++qi) {
      const int64_t qp = s.qpos[qi];
      if (qp < 0 || !slot_causal(sp, qp)) continue;
      s.cnt[c] += 1;
      any = any || slot_visible(sp, qp, p.window);
    }
    if (any) {
      s.spos[n] = sp;
      s.seen[n++] = c;
    }
  }
  t.n = n;
}

// logits[r * n] = scale * <q_r, k_j> (j < NK) for the R rows of q, 4 rows per pass. Not a lambda:
// a lambda is a function of its own, compiled for the baseline ISA even inside an AVX2 wrapper.
template <bool kFma, int NK>
WKV_CPU_INLINE void all_rows_dots(const float* q, int64_t R, const float* const* k, int64_t D,
                                  float scale, float* logits, int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) dots<kFma, 4, NK>(q + r * D, k, D, scale, logits + r * n, n);
  const int64_t rest = R - r;
  if (rest == 3) dots<kFma, 3, NK>(q + r * D, k, D, scale, logits + r * n, n);
  else if (rest == 2) dots<kFma, 2, NK>(q + r * D, k, D, scale, logits + r * n, n);
  else if (rest == 1) dots<kFma, 1, NK>(q + r * D, k, D, scale, logits + r * n, n);
}

// Phase 2: logits[r * n + i] = scale * <q_r, k_seen[i]> for the rows of the tile (every union
// slot, visible to the row or not: the masked ones are never read). Each key row is loaded once
// per tile and dotted with groups of 4 rows.
template <bool kFma, class T>
WKV_CPU_INLINE void query_logits(const AttentionParams& p, int64_t b, int64_t h, const Tile& t,
                                 Scratch& s) {
  const int64_t G = p.G, D = p.D, R = t.nq * G, n = t.n;
  const T* query = static_cast<const T*>(p.query);
  for (int64_t qi = 0; qi < t.nq; ++qi)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        s.qf[(qi * G + g) * D + d] = to_float(query[off(p.query_st, b, h * G + g, t.q0 + qi, d)]);
  const T* kbase = static_cast<const T*>(p.keys) + off(p.keys_st, b, h, 0, 0);
  const int64_t* seen = s.seen.data();
  float* row = s.row.data();
  float* logits = s.logits.data();
  const float* qf = s.qf.data();
  auto key_row = [&](int64_t i, int j) {
    return row_f32(kbase + seen[i] * p.keys_st.s2, p.keys_st.s3, D, row + j * D);
  };
  const int64_t kbytes = p.keys_st.s3 == 1 ? D * int64_t(sizeof(T)) : 64;
  auto key_prefetch = [&](int64_t i) { prefetch_row(kbase + seen[i] * p.keys_st.s2, kbytes); };
  // rows ahead: a pass over a few rows (decode: G) is short, so look further ahead to cover a
  // memory latency; a query tile's long passes need only the next pairs
  const int64_t ahead = R <= 8 ? kPrefetchFew : 4;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    if (i + ahead + 1 < n) {
      key_prefetch(i + ahead);
      key_prefetch(i + ahead + 1);
    }
    const float* k[2] = {key_row(i, 0), key_row(i + 1, 1)};
    all_rows_dots<kFma, 2>(qf, R, k, D, p.scale, logits + i, n);
  }
  for (; i < n; ++i) {
    const float* k[1] = {key_row(i, 0)};
    all_rows_dots<kFma, 1>(qf, R, k, D, p.scale, logits + i, n);
  }
}

// y = exp(x) lane by lane for x <= 0 (the softmax's l - m; NaN gives NaN, x below
// ln 2^-126 = -87.34 gives 0): x = n ln2 + r with n = nearest integer of x log2(e) (Cody-Waite,
// ln2 in two parts), exp(r) by Cephes' degree-7 polynomial, times 2^n made in the exponent bits.
// Within 1 ulp of exp on [-87.3, 0] (glibc's expf is a function call per element and not vectorisable). Plain
// float operations and fma8 only: the baseline and AVX2 builds give the same bits.
template <bool kFma>
WKV_CPU_INLINE void exp8(v8f& y, const v8f& x) {
  const float lo = -87.3365447f;             // ln(2^-126)
  const v8f magic = v8f{} + 12582912.0f;     // 1.5 * 2^23: adding it rounds to an integer
  const v8f xc = x < lo ? v8f{} + lo : x;    // NaN stays NaN
  v8f t = magic, r = xc, n;
  fma8<kFma>(t, xc, v8f{} + 1.44269504088896341f);  // x log2(e) + magic
  n = t - magic;
  fma8<kFma>(r, n, v8f{} - 0.693359375f);          // r = x - n ln2_hi
  fma8<kFma>(r, n, v8f{} + 2.12194440e-4f);        // r -= n ln2_lo (ln2_lo < 0)
  v8f q = v8f{} + 1.9875691500e-4f;
  const float c[5] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                      5.0000001201e-1f};
  _Pragma("GCC unroll 8")
  for (int k = 0; k < 5; ++k) {
    v8f a = v8f{} + c[k];
    fma8<kFma>(a, q, r);
    q = a;
  }
  v8f e = r;
  fma8<kFma>(e, q, r * r);  // r + q r^2
  e = e + 1.0f;
  // 2^n: n (|n| <= 126 here) is the low mantissa bits of t minus those of magic
  const v8i bits = ((v8i)t - 0x4B400000 + 127) << 23;  // vector casts reinterpret the bits
  e = e * (v8f)bits;
  y = x < lo ? v8f{} : e;
}

// The NaN-ignoring max of the probabilities' loop before vectorisation: x replaces m when it is
// larger or m is NaN. Over a set of values its result is the largest non-NaN value (NaN if there
// is none) whatever the order; of +0 and -0 it keeps either, which changes no exp(l - m) below.
WKV_CPU_INLINE float fmax_step(float m, float x) { return (x > m || m != m) ? x : m; }

// max over the entries i < n of l with vis[i] != 0 (vis: 0 / -1 per entry; nullptr = all), by the
// rule of fmax_step, 8 lanes at a time; NaN when no entry is a number.
WKV_CPU_INLINE float masked_max(const float* l, const int32_t* vis, int64_t n) {
  const float nan = __builtin_nanf("");
  v8f m = v8f{} + nan;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f x;
    load8(x, l + i);
    if (vis != nullptr) {
      v8i v;
      __builtin_memcpy(&v, vis + i, sizeof(v));
      x = v != 0 ? x : m;  // an entry the row does not see leaves its lane as it is
    }
    m = (x > m) | (m != m) ? x : m;
  }
  float mx = nan;
  _Pragma("GCC unroll 8")
  for (int k = 0; k < 8; ++k) mx = fmax_step(mx, m[k]);
  for (; i < n; ++i)
    if (vis == nullptr || vis[i]) mx = fmax_step(mx, l[i]);
  return mx;
}

// Phase 3: per row, in place over the slots it sees: soft-cap, then p = exp(l - m) / Z with m
// the max logit and Z = sum exp(l - m) (in slot order), both including the head's sink logit
// when there is one. live[r] = whether the row sees any slot. Entries of slots the row does not
// see are left (or made) meaningless and never read.
template <bool kFma>
WKV_CPU_INLINE void softmax_rows(const AttentionParams& p, int64_t h, const Tile& t, Scratch& s) {
  const int64_t n = t.n;
  int32_t* vis = s.vis.data();
  for (int64_t qi = 0; qi < t.nq; ++qi) {
    for (int64_t g = 0; g < p.G; ++g) s.live[qi * p.G + g] = 0;
    if (s.qpos[qi] < 0) continue;
    // which union slots query qi sees (shared by its G rows); a single query sees all of them
    int64_t seen = n;
    if (!t.all_visible) {
      seen = 0;
      for (int64_t i = 0; i < n; ++i) {
        vis[i] = slot_visible(s.spos[i], s.qpos[qi], p.window) ? -1 : 0;
        seen += vis[i] != 0;
      }
    }
    if (seen == 0) continue;  // sees nothing
    const int32_t* v = t.all_visible ? nullptr : vis;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t r = qi * p.G + g;
      float* l = &s.logits[r * n];
      if (p.softcap > 0.0f)
        for (int64_t i = 0; i < n; ++i)
          if (v == nullptr || v[i]) l[i] = soft_cap(l[i], p.softcap);
      float mx = masked_max(l, v, n);
      s.live[r] = 1;
      const float sink = p.sinks ? p.sinks[off(p.sinks_st, h * p.G + g)] : 0.0f;
      if (p.sinks) mx = fmax_step(mx, sink);
      const v8f mx8 = v8f{} + mx;
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {  // every entry: the unseen ones are never read
        v8f x;
        load8(x, l + i);
        x = x - mx8;
        exp8<kFma>(x, x);
        store8(l + i, x);
      }
      if (i < n) {  // the last n % 8 entries through a padded vector
        float tail[8] = {};
        for (int64_t k = i; k < n; ++k) tail[k - i] = l[k] - mx;
        v8f x;
        load8(x, tail);
        exp8<kFma>(x, x);
        for (int64_t k = i; k < n; ++k) l[k] = x[k - i];
      }
      float sum = 0.0f;  // adding +0 for an unseen slot leaves the (non-negative) sum unchanged
      if (v == nullptr) {
        for (int64_t i = 0; i < n; ++i) sum += l[i];
      } else {
        for (int64_t i = 0; i < n; ++i) sum += v[i] ? l[i] : 0.0f;
      }
      if (p.sinks) {
        v8f x = v8f{} + (sink - mx);
        exp8<kFma>(x, x);
        sum += x[0];
      }
      i = 0;
      const v8f sum8 = v8f{} + sum;
      for (; i + 8 <= n; i += 8) {  // every entry: the unseen ones are never read
        v8f x;
        load8(x, l + i);
        x = x / sum8;
        store8(l + i, x);
      }
      for (; i < n; ++i) l[i] = l[i] / sum;
    }
  }
}

// acc[r] += sum_j p[r][i + j] v[j] for the live rows r of tile query qi.
template <bool kFma, int NK>
WKV_CPU_INLINE void query_axpy(const AttentionParams& p, Scratch& s, int64_t qi,
                               const float* const* v, int64_t i, int64_t n) {
  // the G rows of a query are live together (live = the query sees a slot)
  if (!s.live[qi * p.G]) return;
  int64_t g = 0;
  for (; g + 2 <= p.G; g += 2) {  // two rows per pass share each value load
    const int64_t r = qi * p.G + g;
    float w0[NK], w1[NK];
    for (int j = 0; j < NK; ++j) {
      w0[j] = s.logits[r * n + i + j];
      w1[j] = s.logits[(r + 1) * n + i + j];
    }
    axpy_rows2<kFma, NK>(&s.acc[r * p.D], &s.acc[(r + 1) * p.D], v, w0, w1, p.D);
  }
  if (g < p.G) {
    const int64_t r = qi * p.G + g;
    float w[NK];
    for (int j = 0; j < NK; ++j) w[j] = s.logits[r * n + i + j];
    axpy_rows<kFma, NK>(&s.acc[r * p.D], v, w, p.D);
  }
}

// Phase 4: acc[r * D + d] = sum_i p[r][i] v_seen[i][d] over the slots row r sees, in increasing
// i (the same sequence of roundings per element whatever the grouping: kRows value rows per pass
// when the row sees all of them, else one at a time).
template <bool kFma, class T>
WKV_CPU_INLINE void weighted_values(const AttentionParams& p, int64_t b, int64_t h,
                                    const Tile& t, Scratch& s) {
  const int64_t G = p.G, D = p.D, n = t.n;
  std::fill(s.acc.begin(), s.acc.begin() + t.nq * G * D, 0.0f);
  const T* vbase = static_cast<const T*>(p.values) + off(p.values_st, b, h, 0, 0);
  const int64_t* seen = s.seen.data();
  float* row = s.row.data();
  const int64_t vbytes = p.values_st.s3 == 1 ? D * int64_t(sizeof(T)) : 64;
  const int64_t ahead = t.nq * G <= 8 ? kPrefetchFew : kRows;  // as in query_logits
  int64_t i = 0;
  for (; i + kRows <= n; i += kRows) {
    if (i + ahead + kRows <= n)
      for (int j = 0; j < kRows; ++j)
        prefetch_row(vbase + seen[i + ahead + j] * p.values_st.s2, vbytes);
    const float* v[kRows];
    for (int j = 0; j < kRows; ++j)
      v[j] = row_f32(vbase + seen[i + j] * p.values_st.s2, p.values_st.s3, D, row + j * D);
    int64_t lo = s.spos[i], hi = s.spos[i];
    for (int j = 1; j < kRows; ++j) {
      lo = std::min(lo, s.spos[i + j]);
      hi = std::max(hi, s.spos[i + j]);
    }
    for (int64_t qi = 0; qi < t.nq; ++qi) {
      const int64_t qp = s.qpos[qi];
      if (qp < 0) continue;
      if (t.all_visible || (hi <= qp && (p.window <= 0 || qp - lo < p.window))) {
        query_axpy<kFma, kRows>(p, s, qi, v, i, n);
      } else {
        for (int j = 0; j < kRows; ++j) {
          if (!row_sees(p, t, s, qi, i + j)) continue;
          const float* v1[1] = {v[j]};
          query_axpy<kFma, 1>(p, s, qi, v1, i + j, n);
        }
      }
    }
  }
  for (; i < n; ++i) {
    const float* v[1] = {row_f32(vbase + seen[i] * p.values_st.s2, p.values_st.s3, D, row)};
    for (int64_t qi = 0; qi < t.nq; ++qi)
      if (s.qpos[qi] >= 0 && row_sees(p, t, s, qi, i))
        query_axpy<kFma, 1>(p, s, qi, v, i, n);
  }
}

// out[b, h*G + g, q, :] = acc[row] (zero: zeros), rounded once to T.
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

template <bool kFma, class T>
WKV_CPU_INLINE void attention_rows(const AttentionParams& p, int64_t begin, int64_t end) {
  const int64_t G = p.G, C = p.C, D = p.D;
  const int64_t tq = std::max<int64_t>(1, kTileRows / G);  // queries per tile
  const int64_t R = std::min<int64_t>(tq, p.Q) * G;
  thread_local Scratch s;
  s.qf.resize(R * D);
  s.acc.resize(R * D);
  s.row.resize(kRows * D);
  s.logits.resize(R * C);
  s.live.resize(R);
  s.qpos.resize(tq);
  s.seen.resize(C);
  s.spos.resize(C);
  s.vis.resize(C);
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
    for (int64_t q0 = 0; q0 < p.Q; q0 += tq) {
      Tile t{q0, std::min(tq, p.Q - q0), 0, false};
      bool any_valid = false;
      for (int64_t qi = 0; qi < t.nq; ++qi) {
        s.qpos[qi] = p.query_pos[off(p.query_pos_st, b, q0 + qi)];
        any_valid = any_valid || s.qpos[qi] >= 0;
      }
      t.all_visible = t.nq == 1;
      if (any_valid) visible_slots(p, pos, t, s);
      if (t.n > 0) {
        query_logits<kFma, T>(p, b, h, t, s);
        softmax_rows<kFma>(p, h, t, s);
        weighted_values<kFma, T>(p, b, h, t, s);
      } else {
        std::fill(s.live.begin(), s.live.end(), 0);
      }
      for (int64_t qi = 0; qi < t.nq; ++qi) {
        // a padding query or one that sees nothing: zeros (its probabilities are all 0)
        const bool live = s.live[qi * G] != 0;
        write_out<T>(p, b, h, q0 + qi, live ? &s.acc[qi * G * D] : nullptr, !live);
        if (!live) continue;
        // statistics: the group reduction of the probabilities, summed in query order
        const float* l = &s.logits[qi * G * t.n];
        for (int64_t i = 0; i < t.n; ++i) {
          if (!row_sees(p, t, s, qi, i)) continue;
          float red = reduce_init(p.reduce, l[i]);
          for (int64_t g = 1; g < G; ++g) red = reduce_step(p.reduce, red, l[g * t.n + i]);
          red = reduce_finish(p.reduce, red, static_cast<int>(G));
          s.sum[s.seen[i]] += red;
          if (q0 + qi == q_star) s.plast[s.seen[i]] = red;
        }
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

#if WKV_HAVE_AVX2_PATH
#define WKV_AVX2_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define WKV_AVX2_FMA_TARGET
#endif

// The AVX2 + FMA build of the row loop: the same fused multiply-adds, in vector registers.
bool cpu_has_avx2_fma() {
#if WKV_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <class T>
WKV_AVX2_FMA_TARGET void attention_rows_avx2(const AttentionParams& p, int64_t begin, int64_t end) {
  attention_rows<true, T>(p, begin, end);
}

void run(const AttentionParams& p, at::ScalarType dtype) {
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0) return;
  // the dtype was validated by prepare_*: the dispatch name never shows
  WKV_DISPATCH_FLOAT_TYPES(dtype, "attention", [&] {
    using T = host::elem_t<scalar_t>;
    const int64_t work = int64_t(p.Q) * p.G * p.C * p.D;
    at::parallel_for(0, rows, grain(work), [&](int64_t begin, int64_t end) {
      if (cpu_has_avx2_fma())
        attention_rows_avx2<T>(p, begin, end);
      else
        attention_rows<false, T>(p, begin, end);
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
