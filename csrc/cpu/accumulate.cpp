// accumulate.cpp: CPU implementation of weightedkv::accumulate (docs/design.md).
// Per (b, h): for each valid query in increasing q, p[c] = reduce over g (increasing) of
// probs[b, h*G+g, q, c] in float32, added to a per-slot float32 sum when the query sees slot c;
// the sums are then added to scores once. Fixed order => identical results for any thread count.
// Also compiled for AVX2 (picked at run time, isa.h): same operations, same results.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../kernels/convert.h"
#include "../kernels/policy.h"
#include "cpu_common.h"
#include "isa.h"

namespace wkv::cpu {
namespace {

template <class T>
WKV_CPU_INLINE void accumulate_rows(const AccumulateParams& p, int64_t begin, int64_t end) {
  const T* probs = static_cast<const T*>(p.probs);
  const int64_t C = p.C;
  thread_local std::vector<float> red, sum, plast;  // per-thread scratch, reused across calls
  thread_local std::vector<int64_t> cnt;
  red.resize(C);
  sum.resize(C);
  plast.resize(C);
  cnt.resize(C);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    const int64_t* pos = p.slot_pos + off(p.pos_st, b, h, 0);
    const int64_t ps = p.pos_st.s2;
    int64_t q_star = -1;
    for (int64_t q = 0; q < p.Q; ++q)
      if (p.query_pos[off(p.query_pos_st, b, q)] >= 0) q_star = q;
    if (q_star < 0) continue;  // no valid query: nothing changes
    std::fill(sum.begin(), sum.end(), 0.0f);
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t q = 0; q <= q_star; ++q) {
      const int64_t qp = p.query_pos[off(p.query_pos_st, b, q)];
      if (qp < 0) continue;
      for (int64_t g = 0; g < p.G; ++g) {
        const T* row = probs + off(p.probs_st, b, h * p.G + g, q, 0);
        const int64_t s3 = p.probs_st.s3;
        if (s3 == 1) {  // contiguous: the same operations, vectorisable
          if (g == 0) {
            for (int64_t c = 0; c < C; ++c) red[c] = reduce_init(p.reduce, to_float(row[c]));
          } else if (p.reduce == GroupReduce::Max) {
            for (int64_t c = 0; c < C; ++c)
              red[c] = reduce_step(GroupReduce::Max, red[c], to_float(row[c]));
          } else {
            for (int64_t c = 0; c < C; ++c) red[c] = wkv_add(red[c], to_float(row[c]));
          }
        } else if (g == 0) {
          for (int64_t c = 0; c < C; ++c) red[c] = reduce_init(p.reduce, to_float(row[c * s3]));
        } else {
          for (int64_t c = 0; c < C; ++c)
            red[c] = reduce_step(p.reduce, red[c], to_float(row[c * s3]));
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t sp = pos[c * ps];
        if (sp < 0 || sp > qp) continue;
        const float v = reduce_finish(p.reduce, red[c], p.G);
        sum[c] += v;
        cnt[c] += 1;
        if (q == q_star) plast[c] = v;
      }
    }
    const int64_t qp_star = p.query_pos[off(p.query_pos_st, b, q_star)];
    float* scores = p.scores + off(p.scores_st, b, h, 0);
    float* counts = p.counts + off(p.counts_st, b, h, 0);
    float* last = p.last + off(p.last_st, b, h, 0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t sp = pos[c * ps];
      if (sp < 0) continue;
      scores[c * p.scores_st.s2] += sum[c];
      counts[c * p.counts_st.s2] += static_cast<float>(cnt[c]);
      last[c * p.last_st.s2] = sp <= qp_star ? plast[c] : 0.0f;
    }
  }
}

template <class T>
WKV_AVX2_TARGET void accumulate_rows_avx2(const AccumulateParams& p, int64_t begin, int64_t end) {
  accumulate_rows<T>(p, begin, end);
}

}  // namespace

void accumulate(const at::Tensor& probs, const at::Tensor& slot_pos,
                    const at::Tensor& query_pos, const at::Tensor& scores,
                    const at::Tensor& counts, const at::Tensor& last,
                    c10::string_view group_reduce) {
  const AccumulateParams p = host::prepare_accumulate(probs, slot_pos, query_pos, scores, counts,
                                                      last, group_reduce);
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0 || p.C == 0) return;
  WKV_DISPATCH_FLOAT_TYPES(probs.scalar_type(), "accumulate", [&] {
    at::parallel_for(0, rows, grain(int64_t(p.Q) * p.G * p.C), [&](int64_t begin, int64_t end) {
      if (cpu_has_avx2())
        accumulate_rows_avx2<host::elem_t<scalar_t>>(p, begin, end);
      else
        accumulate_rows<host::elem_t<scalar_t>>(p, begin, end);
    });
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) { m.impl("accumulate", &accumulate); }

}  // namespace wkv::cpu
