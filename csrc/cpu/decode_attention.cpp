// decode_attention.cpp: CPU implementation of weightedkv::decode_attention (docs/design.md).
// Per (b, h): the G query heads of KV head h attend over the held slots with
// slot_pos <= query_pos[b] (slot order); logits = scale * <q, k> and softmax in float32
// (max-subtracted), out = sum_c p_c v_c in float32 rounded once; the statistics are updated as
// accumulate does with Q = 1 (p reduced over the G heads in increasing g). Each (b, h) is done by
// one task in a fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "../dispatch.h"
#include "../kernels/convert.h"
#include "../kernels/policy.h"
#include "cpu_common.h"
#include "prepare.h"

namespace wkv::cpu {
namespace {

// Dot product of two contiguous float vectors, 8 partial sums in a fixed order.
inline float dot(const float* a, const float* b, int64_t D) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) s[l] += a[d + l] * b[d + l];
  for (int l = 0; d < D; ++d, ++l) s[l] += a[d] * b[d];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <class T>
inline void load_row(const T* src, int64_t stride, int64_t D, float* dst) {
  if (stride == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d * stride]);
  }
}

template <class T>
void decode_rows(const DecodeParams& p, int64_t begin, int64_t end) {
  const int64_t G = p.G, C = p.C, D = p.D;
  const T* query = static_cast<const T*>(p.query);
  const T* keys = static_cast<const T*>(p.keys);
  const T* values = static_cast<const T*>(p.values);
  T* out = static_cast<T*>(p.out);
  std::vector<float> qf(G * D), acc(G * D), row(D), logits(G * C);
  std::vector<int64_t> seen(C);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    const int64_t qp = p.query_pos[off(p.query_pos_st, b)];
    auto write_out = [&](bool zero) {
      for (int64_t g = 0; g < G; ++g) {
        T* o = out + off(p.out_st, b, h * G + g, 0);
        for (int64_t d = 0; d < D; ++d)
          o[d * p.out_st.s2] = from_float<T>(zero ? 0.0f : acc[g * D + d]);
      }
    };
    if (qp < 0) {  // padding row: zeros, no statistics
      write_out(true);
      continue;
    }
    const int64_t* pos = p.slot_pos + off(p.pos_st, b, h, 0);
    int64_t n = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t sp = pos[c * p.pos_st.s2];
      if (sp >= 0 && sp <= qp) seen[n++] = c;
    }
    float* scores = p.scores + off(p.scores_st, b, h, 0);
    float* counts = p.counts + off(p.counts_st, b, h, 0);
    float* last = p.last + off(p.last_st, b, h, 0);
    // held slots the query does not see get last = 0 (as accumulate with Q = 1)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t sp = pos[c * p.pos_st.s2];
      if (sp > qp) last[c * p.last_st.s2] = 0.0f;
    }
    if (n == 0) {
      write_out(true);
      continue;
    }
    for (int64_t g = 0; g < G; ++g)
      load_row(query + off(p.query_st, b, h * G + g, 0), p.query_st.s2, D, &qf[g * D]);
    // logits[g * n + i]
    for (int64_t i = 0; i < n; ++i) {
      load_row(keys + off(p.keys_st, b, h, seen[i], 0), p.keys_st.s3, D, row.data());
      for (int64_t g = 0; g < G; ++g) logits[g * n + i] = dot(&qf[g * D], row.data(), D) * p.scale;
    }
    // softmax per query head, in place
    for (int64_t g = 0; g < G; ++g) {
      float* l = &logits[g * n];
      float mx = l[0];
      for (int64_t i = 1; i < n; ++i) mx = std::fmax(mx, l[i]);
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        l[i] = std::exp(l[i] - mx);
        sum += l[i];
      }
      for (int64_t i = 0; i < n; ++i) l[i] = l[i] / sum;
    }
    // out = P V
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      load_row(values + off(p.values_st, b, h, seen[i], 0), p.values_st.s3, D, row.data());
      for (int64_t g = 0; g < G; ++g) {
        const float w = logits[g * n + i];
        float* a = &acc[g * D];
        for (int64_t d = 0; d < D; ++d) a[d] += w * row[d];
      }
    }
    write_out(false);
    // statistics
    for (int64_t i = 0; i < n; ++i) {
      float red = reduce_init(p.reduce, logits[i]);
      for (int64_t g = 1; g < G; ++g) red = reduce_step(p.reduce, red, logits[g * n + i]);
      red = reduce_finish(p.reduce, red, static_cast<int>(G));
      const int64_t c = seen[i];
      scores[c * p.scores_st.s2] += red;
      counts[c * p.counts_st.s2] += 1.0f;
      last[c * p.last_st.s2] = red;
    }
  }
}

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& slot_pos,
                                const at::Tensor& query_pos, const at::Tensor& scores,
                                const at::Tensor& counts, const at::Tensor& last, double scale,
                                c10::string_view group_reduce) {
  at::Tensor out;
  const DecodeParams p =
      host::prepare_decode(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                           std::string(group_reduce), &out);
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0) return out;
  WKV_DISPATCH_FLOAT_TYPES(query.scalar_type(), "decode_attention", [&] {
    at::parallel_for(0, rows, grain(int64_t(p.G) * p.C * p.D), [&](int64_t begin, int64_t end) {
      decode_rows<elem_t<scalar_t>>(p, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace wkv::cpu
