// attention.cu: CUDA implementation of weightedkv::decode_attention and
// weightedkv::block_attention (docs/design.md); decode_attention is the case Q = 1.
//
// One block per (b, KV head h), covering the G query heads of the group, so that the per-slot
// probability mass can be reduced over the group and added to the statistics in the same kernel.
// The block walks the Q queries in order; per query (named phases below):
//  1. load_queries: the G queries -> shared memory (float32);
//  2. query_logits: s[g][c] = softcap(scale * q_g . k_c) for the visible slots (held,
//     slot_pos <= query_pos, inside the window): two threads per slot, each on alternate 16-byte
//     chunks of the key row (VEC path) or on alternate elements (any strides), all G heads per
//     key load;
//  3. softmax_rows: per head (one warp each) max and sum of exp over the slots (and the head's
//     sink logit, if any), then p = exp(s - max) / sum in place;
//  4. slot_statistics: p_c = group reduction of p[.][c] (policy.h, increasing g) added to a
//     per-slot float32 sum (counted as seen by the causal rule), the last query's p_c kept; each
//     slot is owned by one thread for the whole kernel, so the sums follow query order;
//  5. weighted_values: out[g] = sum_c p[g][c] v_c: threads over (16-byte chunk of d, part of the
//     slots), partial sums combined over the parts in a fixed order.
// After the last query the sums are added to scores/counts and last is set exactly as accumulate
// does. The logits/probabilities and the per-slot sums live in shared memory when they fit (else
// in a global workspace, per (b, h) row); probabilities are never written to global memory in the
// first case. Reductions have a fixed order: results are deterministic for a given shape
// (float32, but not bit-identical to the CPU kernel, whose summation order differs; FMA is used).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../kernels/attention.h"
#include "../kernels/convert.h"
#include "../kernels/params.h"
#include "../kernels/policy.h"
#include "cuda_launch.h"
#include "cuda_utils.cuh"

namespace wkv::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kThreadsPerKey = 2;  // threads sharing one key row in the logits pass
constexpr int kGroupChunk = 8;     // query heads handled per pass over a row (register tile)

// Shared-memory layout, in this order:
//   small: q [G*D] | row max [G] | row sum [G] | partial out [parts*D]          (floats)
//   big:   logits [G*C] | slot sum [C] | last-query p [C] (floats) | seen count [C] (int) |
//          visible [C] (bytes)
// In workspace mode the big part is at workspace + row * big_bytes.
struct Layout {
  int nchunks;  // D / VEC
  int cpt;      // chunks handled per output pass: min(nchunks, threads)
  int parts;    // slot partitions of the output pass: threads / cpt
  size_t small_bytes, big_bytes;
};

inline Layout make_layout(int G, int C, int D, int vec) {
  Layout l;
  l.nchunks = D / vec;
  l.cpt = l.nchunks < kThreads ? (l.nchunks > 0 ? l.nchunks : 1) : kThreads;
  l.parts = kThreads / l.cpt;
  l.small_bytes = round_up(sizeof(float) * (size_t(G) * D + 2 * size_t(G) +
                                            (l.parts > 1 ? size_t(l.parts) * D : 0)),
                           16);
  l.big_bytes = round_up(sizeof(float) * (size_t(G) + 3) * C + size_t(C), 16);
  return l;
}

// Per-block views of the shared memory (or workspace).
struct Smem {
  float* q;         // [G][D]
  float* row_max;   // [G]
  float* row_sum;   // [G]
  float* partial;   // [parts][D]
  float* prob;      // [G][C]: logits, then probabilities
  float* slot_sum;  // [C]
  float* slot_last; // [C]
  int* slot_cnt;    // [C]
  unsigned char* visible;  // [C]
};

__device__ __forceinline__ Smem carve(unsigned char* dyn, unsigned char* big, int G, int C,
                                      int D) {
  Smem m;
  m.q = reinterpret_cast<float*>(dyn);
  m.row_max = m.q + size_t(G) * D;
  m.row_sum = m.row_max + G;
  m.partial = m.row_sum + G;
  m.prob = reinterpret_cast<float*>(big);
  m.slot_sum = m.prob + size_t(G) * C;
  m.slot_last = m.slot_sum + C;
  m.slot_cnt = reinterpret_cast<int*>(m.slot_last + C);
  m.visible = reinterpret_cast<unsigned char*>(m.slot_cnt + C);
  return m;
}

template <class T>
__device__ __forceinline__ void zero_output(const AttentionParams& p, int b, int h, int q) {
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < p.G * p.D; i += kThreads)
    out[off(p.out_st, b, h * p.G + i / p.D, q, i % p.D)] = from_float<T>(0.0f);
}

// Phase 2: logits of the visible slots into m.prob, visibility into m.visible; returns the
// number of visible slots (on every thread; also publishes prob / visible).
template <class T, int VEC>
__device__ int query_logits(const AttentionParams& p, const Layout& lay, const Smem& m, int b,
                            int h, int64_t qp, int* red_i) {
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  const T* keys = static_cast<const T*>(p.keys);
  const int nchunks = lay.nchunks;
  const int sub = tid % kThreadsPerKey;
  constexpr int kSlotsPerIter = kThreads / kThreadsPerKey;
  int nvis = 0;
  for (int base = 0; base < C; base += kSlotsPerIter) {  // uniform trip count (shuffles below)
    const int s = base + tid / kThreadsPerKey;
    bool vis = false;
    if (s < C) vis = slot_visible(p.slot_pos[off(p.pos_st, b, h, s)], qp, p.window);
    const T* krow = keys + (s < C ? off(p.keys_st, b, h, s, 0) : 0);
    for (int g0 = 0; g0 < G; g0 += kGroupChunk) {
      const int gn = G - g0 < kGroupChunk ? G - g0 : kGroupChunk;
      float acc[kGroupChunk];
#pragma unroll
      for (int gi = 0; gi < kGroupChunk; ++gi) acc[gi] = 0.0f;
      if (vis) {
        for (int ch = sub; ch < nchunks; ch += kThreadsPerKey) {
          float kv[VEC];
          load_chunk<T, VEC>(krow, ch, p.keys_st.s3, kv);
#pragma unroll
          for (int gi = 0; gi < kGroupChunk; ++gi) {
            if (gi >= gn) break;
            const float* qg = m.q + size_t(g0 + gi) * D + size_t(ch) * VEC;
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[gi] = __fmaf_rn(qg[v], kv[v], acc[gi]);
          }
        }
      }
#pragma unroll
      for (int gi = 0; gi < kGroupChunk; ++gi)
#pragma unroll
        for (int k = 1; k < kThreadsPerKey; k <<= 1)
          acc[gi] += __shfl_xor_sync(kFullMask, acc[gi], k);
      if (vis && sub == 0)
#pragma unroll
        for (int gi = 0; gi < kGroupChunk; ++gi)
          if (gi < gn) m.prob[size_t(g0 + gi) * C + s] = soft_cap(acc[gi] * p.scale, p.softcap);
    }
    if (s < C && sub == 0) {
      m.visible[s] = vis;
      nvis += vis;
    }
  }
  return block_allreduce(nvis, SumOp(), red_i);
}

// Phase 3: softmax per query head (with the head's sink logit in the normaliser), in place.
__device__ void softmax_rows(const AttentionParams& p, const Smem& m, int h) {
  const int G = p.G, C = p.C, tid = threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize, nwarps = kThreads / kWarpSize;
  for (int g = warp; g < G; g += nwarps) {
    const float* lg = m.prob + size_t(g) * C;
    float mx = -INFINITY;
    for (int s = lane; s < C; s += kWarpSize)
      if (m.visible[s]) mx = fmaxf(mx, lg[s]);
    mx = warp_allreduce(mx, FMaxOp());
    const float sink = p.sinks ? p.sinks[off(p.sinks_st, h * G + g)] : 0.0f;
    if (p.sinks) mx = fmaxf(mx, sink);
    float sum = 0.0f;
    for (int s = lane; s < C; s += kWarpSize)
      if (m.visible[s]) sum += expf(lg[s] - mx);
    sum = warp_allreduce(sum, SumOp());
    if (p.sinks) sum += expf(sink - mx);
    if (lane == 0) {
      m.row_max[g] = mx;
      m.row_sum[g] = sum;
    }
  }
  __syncthreads();
  for (int i = tid; i < G * C; i += kThreads) {
    const int g = i / C, s = i % C;
    if (m.visible[s]) m.prob[i] = expf(m.prob[i] - m.row_max[g]) / m.row_sum[g];
  }
  __syncthreads();
}

// Phase 4: per slot (thread-owned), the group-reduced probability into the query-ordered sums;
// a causal slot outside the window is seen with p = 0 (accumulate's rule).
__device__ void slot_statistics(const AttentionParams& p, const Smem& m, int b, int h,
                                int64_t qp, bool is_last_query, bool any_visible) {
  const int G = p.G, C = p.C;
  for (int s = threadIdx.x; s < C; s += kThreads) {
    if (!slot_causal(p.slot_pos[off(p.pos_st, b, h, s)], qp)) continue;
    m.slot_cnt[s] += 1;
    if (!any_visible || !m.visible[s]) {
      if (is_last_query) m.slot_last[s] = 0.0f;
      continue;
    }
    float acc = reduce_init(p.reduce, m.prob[s]);
    for (int g = 1; g < G; ++g) acc = reduce_step(p.reduce, acc, m.prob[size_t(g) * C + s]);
    const float v = reduce_finish(p.reduce, acc, G);
    m.slot_sum[s] = wkv_add(m.slot_sum[s], v);
    if (is_last_query) m.slot_last[s] = v;
  }
}

// Phase 5: out[b, h*G + g, q, :] = sum_c p[g][c] v_c.
template <class T, int VEC>
__device__ void weighted_values(const AttentionParams& p, const Layout& lay, const Smem& m,
                                int b, int h, int q) {
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  const T* values = static_cast<const T*>(p.values);
  T* out = static_cast<T*>(p.out);
  auto out_at = [&](int g, int d) -> T& { return out[off(p.out_st, b, h * G + g, q, d)]; };
  const int nchunks = lay.nchunks, cpt = lay.cpt, parts = lay.parts;
  const int part = tid / cpt;
  for (int cbase = 0; cbase < nchunks; cbase += cpt) {
    const int ch = cbase + tid % cpt;
    const bool active = part < parts && ch < nchunks;
    for (int g0 = 0; g0 < G; g0 += kGroupChunk) {
      const int gn = G - g0 < kGroupChunk ? G - g0 : kGroupChunk;
      float acc[kGroupChunk][VEC];
#pragma unroll
      for (int gi = 0; gi < kGroupChunk; ++gi)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[gi][v] = 0.0f;
      if (active) {
        for (int s = part; s < C; s += parts) {
          if (!m.visible[s]) continue;
          float vv[VEC];
          load_chunk<T, VEC>(values + off(p.values_st, b, h, s, 0), ch, p.values_st.s3, vv);
#pragma unroll
          for (int gi = 0; gi < kGroupChunk; ++gi) {
            if (gi >= gn) break;
            const float pg = m.prob[size_t(g0 + gi) * C + s];
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[gi][v] = __fmaf_rn(pg, vv[v], acc[gi][v]);
          }
        }
      }
      if (parts == 1) {
        if (active)
#pragma unroll
          for (int gi = 0; gi < kGroupChunk; ++gi)
            if (gi < gn)
#pragma unroll
              for (int v = 0; v < VEC; ++v)
                out_at(g0 + gi, ch * VEC + v) = from_float<T>(acc[gi][v]);
        continue;
      }
#pragma unroll
      for (int gi = 0; gi < kGroupChunk; ++gi) {  // combine the parts in increasing order
        if (gi >= gn) break;  // uniform
        if (active)
#pragma unroll
          for (int v = 0; v < VEC; ++v) m.partial[size_t(part) * D + ch * VEC + v] = acc[gi][v];
        __syncthreads();
        const int width = (nchunks - cbase < cpt ? nchunks - cbase : cpt) * VEC;
        for (int i = tid; i < width; i += kThreads) {
          const int d = cbase * VEC + i;
          float sum = 0.0f;
          for (int k = 0; k < parts; ++k) sum += m.partial[size_t(k) * D + d];
          out_at(g0 + gi, d) = from_float<T>(sum);
        }
        __syncthreads();
      }
    }
  }
}

template <class T, int VEC>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const AttentionParams p, const Layout lay, unsigned char* workspace) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ int red_i[kMaxWarps];

  const int row = blockIdx.x, b = row / p.H, h = row % p.H;
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  unsigned char* big = workspace ? workspace + size_t(row) * lay.big_bytes
                                 : dyn_smem + lay.small_bytes;
  const Smem m = carve(dyn_smem, big, G, C, D);
  const T* query = static_cast<const T*>(p.query);

  int q_star = -1;  // the last valid query (sets `last`)
  for (int q = 0; q < p.Q; ++q)
    if (p.query_pos[off(p.query_pos_st, b, q)] >= 0) q_star = q;
  for (int s = tid; s < C; s += kThreads) {  // the thread owning slot s in slot_statistics
    m.slot_sum[s] = 0.0f;
    m.slot_last[s] = 0.0f;
    m.slot_cnt[s] = 0;
  }

  for (int q = 0; q < p.Q; ++q) {
    const int64_t qp = p.query_pos[off(p.query_pos_st, b, q)];
    if (qp < 0) {  // padding query: zero output, no statistics
      zero_output<T>(p, b, h, q);
      continue;
    }
    // 1. queries
    for (int i = tid; i < G * D; i += kThreads)
      m.q[i] = to_float(query[off(p.query_st, b, h * G + i / D, q, i % D)]);
    __syncthreads();
    const int nvis = query_logits<T, VEC>(p, lay, m, b, h, qp, red_i);
    if (nvis > 0) softmax_rows(p, m, h);  // uniform branch
    slot_statistics(p, m, b, h, qp, q == q_star, nvis > 0);
    if (nvis > 0)
      weighted_values<T, VEC>(p, lay, m, b, h, q);
    else  // sees nothing: zeros (its probabilities are all 0)
      zero_output<T>(p, b, h, q);
    __syncthreads();  // q, prob and visible are rewritten by the next query
  }

  if (q_star < 0) return;  // no valid query: the statistics are unchanged
  const int64_t qp_star = p.query_pos[off(p.query_pos_st, b, q_star)];
  for (int s = tid; s < C; s += kThreads) {  // as accumulate: held slots only
    const int64_t sp = p.slot_pos[off(p.pos_st, b, h, s)];
    if (sp < 0) continue;
    float* score = p.scores + off(p.scores_st, b, h, s);
    float* count = p.counts + off(p.counts_st, b, h, s);
    *score = wkv_add(*score, m.slot_sum[s]);
    *count = wkv_add(*count, static_cast<float>(m.slot_cnt[s]));
    p.last[off(p.last_st, b, h, s)] = sp <= qp_star ? m.slot_last[s] : 0.0f;
  }
}

// 16-byte loads need unit stride over d, D a multiple of the vector width and 16-byte aligned
// rows.
template <class T>
bool vector_ok(const at::Tensor& t, int D) {
  constexpr int vec = 16 / sizeof(T);
  if (D % vec != 0 || t.stride(3) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if ((t.stride(i) * int64_t(sizeof(T))) % 16 != 0) return false;
  return true;
}

template <class T, int VEC>
void launch(const AttentionParams& p, const at::Tensor& keys, const char* op,
            cudaStream_t stream) {
  const auto kernel = attention_kernel<T, VEC>;
  const Layout lay = make_layout(p.G, p.C, p.D, VEC);
  const size_t limit = max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  const int64_t rows = int64_t(p.B) * p.H;
  TORCH_CHECK(lay.small_bytes <= limit, op, ": the CUDA kernel needs ", lay.small_bytes,
              " bytes of shared memory for G*D = ", p.G, "*", p.D,
              " query values, more than this device allows (", limit, ")");
  at::Tensor workspace;
  unsigned char* ws = nullptr;
  size_t smem = lay.small_bytes + lay.big_bytes;
  if (smem > limit) {
    workspace = at::empty({static_cast<int64_t>(lay.big_bytes) * rows},
                          keys.options().dtype(at::kByte));
    ws = workspace.data_ptr<uint8_t>();
    smem = lay.small_bytes;
  }
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<rows, kThreads, smem, stream>>>(p, lay, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run(const AttentionParams& p, const at::Tensor& keys, const at::Tensor& values,
         const char* op) {
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, op, ": too many (batch, head) rows: B*H=", rows);
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // the dtype was validated by prepare_*: the dispatch name never shows
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "attention", [&] {
    using T = host::elem_t<scalar_t>;
    if (vector_ok<T>(keys, p.D) && vector_ok<T>(values, p.D))
      launch<T, 16 / sizeof(T)>(p, keys, op, stream);
    else
      launch<T, 1>(p, keys, op, stream);
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
      keys, values, "decode_attention");
}

void block_attention(const at::Tensor& query, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& slot_pos,
                          const at::Tensor& query_pos, const at::Tensor& scores,
                          const at::Tensor& counts, const at::Tensor& last, double scale,
                          c10::string_view group_reduce, int64_t window, double softcap,
                          const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  run(host::prepare_block(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                          group_reduce, window, softcap, sinks, out),
      keys, values, "block_attention");
}

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("block_attention", &block_attention);
}

}  // namespace wkv::gpu
