// attention.cu: CUDA implementation of weightedkv::decode_attention and
// weightedkv::block_attention (docs/design.md). Two kernels:
//
// block_attention (any Q): one block per (b, KV head h), covering the G query heads of the group,
// so that the per-slot probability mass can be reduced over the group and added to the statistics
// in the same kernel. The block walks the Q queries in order; per query (named phases below):
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
// first case.
//
// decode_attention (Q = 1): split over the slots (flash-decoding). The C slots of a (b, h) row are
// cut into `nsplit` ranges of `len` slots (plan_splits: enough blocks to fill the device, at most
// kMaxSplitSlots per range); one block per (row, split) of kSplitThreads threads runs
//  1. split_visible: the visible slots of its range -> a list in shared memory (slot order);
//  2. split_logits: l[g][c] = softcap(scale * q_g . k_c), kKeyThreads threads per key row (each on
//     every kKeyThreads-th 16-byte chunk), all G heads per key load, into the float32 workspace
//     e [row][G][C] (global: no G x C array in shared memory);
//  3. split_softmax: per head (one warp each) the range's max m_s and e = exp(l - m_s) in place,
//     z_s = sum e;
//  4. split_values: acc_s[g] = sum_c e[g][c] v_c over the range (threads over (chunk of d, part of
//     the list), parts combined in a fixed order) -> workspace;
// then split_finalize, in a second kernel (decode_combine_kernel, one block per (row, split)) or in
// the same block when nsplit == 1: M = max_s m_s (and the sink logit), Z = sum_s z_s e^(m_s - M)
// (+ e^(sink - M)) in split order, out = (sum_s e^(m_s - M) acc_s) / Z (the block's share of the
// G x D outputs), and the statistics of the block's range: p_c = e[g][c] e^(m_s - M) / Z reduced
// over the group, added to scores / counts and written to last exactly as accumulate does.
//
// Reductions have a fixed order (no float atomics): results are deterministic for a given shape
// and device (the split count depends on C, B*H and the multiprocessor count), float32, but not
// bit-identical to the CPU kernel, whose summation order differs (FMA is used, expf, and the
// decode kernel normalises by split). docs/design.md states the tolerances.
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

// ---------------------------------------------------------------------------------------------
// decode_attention: split over the slots (flash-decoding), see the file comment.

constexpr int kSplitThreads = 128;
constexpr int kSplitMinBlocks = 6;     // launch bound: at most 80 registers per thread
constexpr int kKeyThreads = 8;         // threads sharing one key row in split_logits
constexpr int kLogitGroup = 4;         // query heads per pass of split_logits (register tile)
constexpr int kValueGroup = 4;         // query heads per pass of split_values (register tile)
constexpr int kMaxSplitSlots = 1024;   // slots of one split at most (its list is in shared memory)
constexpr int kMinSplitSlots = 64;     // no finer splits than this (their combine would dominate)
constexpr int kTargetBlocksPerSM = 8;  // partial blocks per multiprocessor plan_splits aims at

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct SplitPlan {
  int nsplit = 1;  // ranges per (b, h) row
  int len = 1;     // slots per range (the last one may be shorter)
};

// Enough (row, split) blocks to give every multiprocessor kTargetBlocksPerSM of them, ranges of
// kMinSplitSlots .. kMaxSplitSlots slots, no empty range. Depends only on (rows, C, sm_count).
inline SplitPlan plan_splits(int64_t rows, int64_t C, int sm_count) {
  const int64_t need = ceil_div(C, kMaxSplitSlots);
  const int64_t fill = ceil_div(int64_t(kTargetBlocksPerSM) * (sm_count > 0 ? sm_count : 1), rows);
  const int64_t finest = C / kMinSplitSlots > 1 ? C / kMinSplitSlots : 1;
  int64_t n = fill < finest ? fill : finest;
  if (n < need) n = need;
  if (n < 1) n = 1;
  int64_t len = ceil_div(C, n);
  if (len < 1) len = 1;
  n = ceil_div(C, len);
  SplitPlan s;
  s.nsplit = static_cast<int>(n < 1 ? 1 : n);
  s.len = static_cast<int>(len);
  return s;
}

// Device pointers and sizes of one decode_attention launch (zero-initialised; host-filled).
struct SplitWork {
  float* e = nullptr;    // [rows][G][C]: logits, then e^(l - m_s) (visible slots only)
  float* m = nullptr;    // [rows][nsplit][G]: max logit of the range
  float* z = nullptr;    // [rows][nsplit][G]: sum of e over the range
  float* acc = nullptr;  // [rows][nsplit][G][D]: sum of e v over the range
  int* n = nullptr;      // [rows][nsplit]: visible slots of the range
  int nsplit = 1, len = 1;
  int nchunks = 0, cpt = 0, parts = 0;  // split_values: chunks of D, chunks per pass, slot parts
  // dynamic shared memory, byte offsets: q [G*D] f32 | partial [parts*D] f32 |
  // M, Z, F [3*G] f32 | list [len] int
  unsigned q_off = 0, partial_off = 0, mzf_off = 0, list_off = 0, smem_bytes = 0;
};

// VEC consecutive floats of shared memory (16-byte loads when VEC is a multiple of 4: the caller
// guarantees the alignment).
template <int VEC>
__device__ __forceinline__ void load_q(const float* q, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      const float4 x = *reinterpret_cast<const float4*>(q + k);
      out[k] = x.x; out[k + 1] = x.y; out[k + 2] = x.z; out[k + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = q[k];
  }
}

// Phase 1: the visible slots of [c0, c1) in slot order -> list; returns their number (on every
// thread).
__device__ int split_visible(const AttentionParams& p, int b, int h, int64_t qp, int c0, int c1,
                             int* list, int* red_i) {
  int n = 0;
  for (int base = c0; base < c1; base += kSplitThreads) {  // uniform trip count (block scan)
    const int c = base + threadIdx.x;
    const int vis = c < c1 && slot_visible(p.slot_pos[off(p.pos_st, b, h, c)], qp, p.window);
    int total = 0;
    const int before = block_exclusive_scan(vis, &total, red_i);
    if (vis) list[n + before] = c;
    n += total;
  }
  __syncthreads();  // the list is complete
  return n;
}

// Phase 2: e[g][c] = softcap(scale * q_g . k_c) for the n listed slots (raw logits).
template <class T, int VEC>
__device__ void split_logits(const AttentionParams& p, const SplitWork& w, int b, int h,
                             float* e_row, const float* qs, const int* list, int n) {
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  const T* keys = static_cast<const T*>(p.keys);
  const int nchunks = w.nchunks;
  const int sub = tid % kKeyThreads;
  constexpr int kKeysPerIter = kSplitThreads / kKeyThreads;
  for (int base = 0; base < n; base += kKeysPerIter) {  // uniform trip count (shuffles below)
    const int i = base + tid / kKeyThreads;
    const bool act = i < n;
    const int c = act ? list[i] : 0;
    const T* krow = keys + off(p.keys_st, b, h, c, 0);
    for (int g0 = 0; g0 < G; g0 += kLogitGroup) {
      const int gn = G - g0 < kLogitGroup ? G - g0 : kLogitGroup;
      float acc[kLogitGroup];
#pragma unroll
      for (int gi = 0; gi < kLogitGroup; ++gi) acc[gi] = 0.0f;
      // acc[g] += q_g . chunk ch of the key row
      auto dot = [&](const RowChunk<T, VEC>& x, int ch) {
        float kv[VEC];
        x.get(kv);
#pragma unroll
        for (int gi = 0; gi < kLogitGroup; ++gi) {
          if (gi >= gn) break;
          float qv[VEC];
          load_q<VEC>(qs + size_t(g0 + gi) * D + size_t(ch) * VEC, qv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[gi] = __fmaf_rn(qv[v], kv[v], acc[gi]);
        }
      };
      if (act) {
        int ch = sub;
        for (; ch + kKeyThreads < nchunks; ch += 2 * kKeyThreads) {  // two loads in flight
          RowChunk<T, VEC> xa, xb;
          xa.load(krow, ch, p.keys_st.s3);
          xb.load(krow, ch + kKeyThreads, p.keys_st.s3);
          dot(xa, ch);
          dot(xb, ch + kKeyThreads);
        }
        if (ch < nchunks) {
          RowChunk<T, VEC> xa;
          xa.load(krow, ch, p.keys_st.s3);
          dot(xa, ch);
        }
      }
#pragma unroll
      for (int gi = 0; gi < kLogitGroup; ++gi) {
        if (gi >= gn) break;  // uniform
#pragma unroll
        for (int k = 1; k < kKeyThreads; k <<= 1) acc[gi] += __shfl_xor_sync(kFullMask, acc[gi], k);
      }
      if (act && sub == 0)
#pragma unroll
        for (int gi = 0; gi < kLogitGroup; ++gi)
          if (gi < gn) e_row[size_t(g0 + gi) * C + c] = soft_cap(acc[gi] * p.scale, p.softcap);
    }
  }
  __syncthreads();  // every logit is written (global memory: visible to the block after this)
}

// Phase 3: per head g (one warp each): m = max of the range's logits, e = exp(l - m) in place,
// z = sum e (lane-strided, then the butterfly: a fixed order).
__device__ void split_softmax(const AttentionParams& p, const SplitWork& w, float* e_row,
                              const int* list, int n, size_t part_idx) {
  const int G = p.G, C = p.C;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  constexpr int nwarps = kSplitThreads / kWarpSize;
  for (int g = warp; g < G; g += nwarps) {
    float* lg = e_row + size_t(g) * C;
    float mx = -INFINITY;
    for (int i = lane; i < n; i += kWarpSize) mx = fmaxf(mx, lg[list[i]]);
    mx = warp_allreduce(mx, FMaxOp());
    float sum = 0.0f;
    for (int i = lane; i < n; i += kWarpSize) {
      const int c = list[i];
      const float x = expf(lg[c] - mx);
      lg[c] = x;
      sum += x;
    }
    sum = warp_allreduce(sum, SumOp());
    if (lane == 0) {
      w.m[part_idx * G + g] = mx;
      w.z[part_idx * G + g] = sum;
    }
  }
  __syncthreads();  // e is complete
}

// Phase 4: acc[g][d] = sum_i e[g][list[i]] v_list[i][d] -> w.acc of this (row, split).
template <class T, int VEC>
__device__ void split_values(const AttentionParams& p, const SplitWork& w, int b, int h,
                             const float* e_row, const int* list, int n, float* partial,
                             float* acc_out) {
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  const T* values = static_cast<const T*>(p.values);
  const int nchunks = w.nchunks, cpt = w.cpt, parts = w.parts;
  const int part = tid / cpt;
  for (int cbase = 0; cbase < nchunks; cbase += cpt) {
    const int ch = cbase + tid % cpt;
    const bool active = part < parts && ch < nchunks;
    for (int g0 = 0; g0 < G; g0 += kValueGroup) {
      const int gn = G - g0 < kValueGroup ? G - g0 : kValueGroup;
      float acc[kValueGroup][VEC];
#pragma unroll
      for (int gi = 0; gi < kValueGroup; ++gi)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[gi][v] = 0.0f;
      // acc += e[g][c] v_c for one loaded chunk
      auto add = [&](const RowChunk<T, VEC>& x, int c) {
        float vv[VEC];
        x.get(vv);
#pragma unroll
        for (int gi = 0; gi < kValueGroup; ++gi) {
          if (gi >= gn) break;
          const float pg = e_row[size_t(g0 + gi) * C + c];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[gi][v] = __fmaf_rn(pg, vv[v], acc[gi][v]);
        }
      };
      if (active) {
        int i = part;
        for (; i + parts < n; i += 2 * parts) {  // two rows in flight, added in list order
          const int ca = list[i], cb = list[i + parts];
          RowChunk<T, VEC> xa, xb;
          xa.load(values + off(p.values_st, b, h, ca, 0), ch, p.values_st.s3);
          xb.load(values + off(p.values_st, b, h, cb, 0), ch, p.values_st.s3);
          add(xa, ca);
          add(xb, cb);
        }
        if (i < n) {
          RowChunk<T, VEC> xa;
          xa.load(values + off(p.values_st, b, h, list[i], 0), ch, p.values_st.s3);
          add(xa, list[i]);
        }
      }
#pragma unroll
      for (int gi = 0; gi < kValueGroup; ++gi) {  // combine the parts in increasing order
        if (gi >= gn) break;  // uniform
        if (active)
#pragma unroll
          for (int v = 0; v < VEC; ++v) partial[size_t(part) * D + ch * VEC + v] = acc[gi][v];
        __syncthreads();
        const int width = (nchunks - cbase < cpt ? nchunks - cbase : cpt) * VEC;
        for (int j = tid; j < width; j += kSplitThreads) {
          const int d = cbase * VEC + j;
          float sum = 0.0f;
          for (int k = 0; k < parts; ++k) sum += partial[size_t(k) * D + d];
          acc_out[size_t(g0 + gi) * D + d] = sum;
        }
        __syncthreads();
      }
    }
  }
}

// Combine of the splits of `row`, done by the block of split j: its share of the outputs and the
// statistics of its slot range. Needs the partials of every split of the row (a second kernel, or
// the same block when nsplit == 1). mzf: 3 * G floats of shared memory.
template <class T>
__device__ void split_finalize(const AttentionParams& p, const SplitWork& w, int64_t row, int j,
                               float* mzf, int* red_i) {
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  const int b = static_cast<int>(row / p.H), h = static_cast<int>(row % p.H);
  const int nsplit = w.nsplit;
  T* out = static_cast<T*>(p.out);
  const int64_t GD = int64_t(G) * D;
  const int64_t per = (GD + nsplit - 1) / nsplit;
  const int64_t e0 = j * per < GD ? j * per : GD, e1 = e0 + per < GD ? e0 + per : GD;
  const int64_t qp = p.query_pos[off(p.query_pos_st, b, 0)];
  auto out_at = [&](int64_t i) -> T& { return out[off(p.out_st, b, h * G + i / D, 0, i % D)]; };
  if (qp < 0) {  // padding query: zero output, no statistics
    for (int64_t i = e0 + tid; i < e1; i += kSplitThreads) out_at(i) = from_float<T>(0.0f);
    return;
  }
  const int* nrow = w.n + row * nsplit;
  const float* mrow = w.m + size_t(row) * nsplit * G;
  const float* zrow = w.z + size_t(row) * nsplit * G;
  const float* arow = w.acc + size_t(row) * nsplit * GD;
  int nt = 0;
  for (int s = tid; s < nsplit; s += kSplitThreads) nt += nrow[s];
  nt = block_allreduce(nt, SumOp(), red_i);
  float *M = mzf, *Z = mzf + G, *F = mzf + 2 * G;
  if (nt > 0) {  // uniform
    const int warp = tid / kWarpSize, lane = tid % kWarpSize;
    constexpr int nwarps = kSplitThreads / kWarpSize;
    for (int g = warp; g < G; g += nwarps) {
      float mx = -INFINITY;
      for (int s = lane; s < nsplit; s += kWarpSize)
        if (nrow[s] > 0) mx = fmaxf(mx, mrow[size_t(s) * G + g]);
      mx = warp_allreduce(mx, FMaxOp());
      const float sink = p.sinks ? p.sinks[off(p.sinks_st, h * G + g)] : 0.0f;
      if (p.sinks) mx = fmaxf(mx, sink);
      float sum = 0.0f;
      for (int s = lane; s < nsplit; s += kWarpSize)
        if (nrow[s] > 0) sum += zrow[size_t(s) * G + g] * expf(mrow[size_t(s) * G + g] - mx);
      sum = warp_allreduce(sum, SumOp());
      if (p.sinks) sum += expf(sink - mx);
      if (lane == 0) {
        M[g] = mx;
        Z[g] = sum;
        F[g] = nrow[j] > 0 ? expf(mrow[size_t(j) * G + g] - mx) : 0.0f;
      }
    }
    __syncthreads();
  }
  // outputs: out = (sum_s e^(m_s - M) acc_s) / Z, splits in increasing order
  for (int64_t i = e0 + tid; i < e1; i += kSplitThreads) {
    float o = 0.0f;
    if (nt > 0) {
      const int g = static_cast<int>(i / D);
      for (int s = 0; s < nsplit; ++s)
        if (nrow[s] > 0)
          o += expf(mrow[size_t(s) * G + g] - M[g]) * arow[size_t(s) * GD + i];
      o = o / Z[g];
    }
    out_at(i) = from_float<T>(o);
  }
  // statistics of the range of split j (held slots only, as accumulate)
  const int c0 = j * w.len < C ? j * w.len : C;
  const int c1 = c0 + w.len < C ? c0 + w.len : C;
  const float* e_row = w.e + size_t(row) * G * C;
  for (int c = c0 + tid; c < c1; c += kSplitThreads) {
    const int64_t sp = p.slot_pos[off(p.pos_st, b, h, c)];
    if (sp < 0) continue;
    const bool causal = slot_causal(sp, qp);
    float pr = 0.0f;
    if (nt > 0 && slot_visible(sp, qp, p.window)) {
      auto prob = [&](int g) { return wkv_div(wkv_mul(e_row[size_t(g) * C + c], F[g]), Z[g]); };
      float r = reduce_init(p.reduce, prob(0));
      for (int g = 1; g < G; ++g) r = reduce_step(p.reduce, r, prob(g));
      pr = reduce_finish(p.reduce, r, G);
    }
    float* score = p.scores + off(p.scores_st, b, h, c);
    float* count = p.counts + off(p.counts_st, b, h, c);
    *score = wkv_add(*score, pr);
    *count = wkv_add(*count, causal ? 1.0f : 0.0f);
    p.last[off(p.last_st, b, h, c)] = causal ? pr : 0.0f;
  }
}

template <class T, int VEC>
__global__ void __launch_bounds__(kSplitThreads, kSplitMinBlocks)
    decode_partial_kernel(const AttentionParams p, const SplitWork w) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ int red_i[kMaxWarps];
  const int64_t row = blockIdx.x / w.nsplit;
  const int split = static_cast<int>(blockIdx.x % w.nsplit);
  const int b = static_cast<int>(row / p.H), h = static_cast<int>(row % p.H);
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  float* qs = reinterpret_cast<float*>(dyn_smem + w.q_off);
  float* partial = reinterpret_cast<float*>(dyn_smem + w.partial_off);
  int* list = reinterpret_cast<int*>(dyn_smem + w.list_off);
  const size_t part_idx = size_t(row) * w.nsplit + split;
  const int c0 = split * w.len < C ? split * w.len : C;
  const int c1 = c0 + w.len < C ? c0 + w.len : C;
  const int64_t qp = p.query_pos[off(p.query_pos_st, b, 0)];
  const int n = qp >= 0 ? split_visible(p, b, h, qp, c0, c1, list, red_i) : 0;  // uniform
  if (tid == 0) w.n[part_idx] = n;
  if (n > 0) {  // uniform
    const T* query = static_cast<const T*>(p.query);
    for (int i = tid; i < G * D; i += kSplitThreads)
      qs[i] = to_float(query[off(p.query_st, b, h * G + i / D, 0, i % D)]);
    __syncthreads();
    float* e_row = w.e + size_t(row) * G * C;
    split_logits<T, VEC>(p, w, b, h, e_row, qs, list, n);
    split_softmax(p, w, e_row, list, n, part_idx);
    split_values<T, VEC>(p, w, b, h, e_row, list, n, partial,
                         w.acc + part_idx * size_t(G) * D);
  }
  if (w.nsplit == 1) {  // uniform: combine in place
    __syncthreads();  // the partials of this row (global memory) are visible to the block
    split_finalize<T>(p, w, row, 0, reinterpret_cast<float*>(dyn_smem + w.mzf_off), red_i);
  }
}

template <class T>
__global__ void __launch_bounds__(kSplitThreads)
    decode_combine_kernel(const AttentionParams p, const SplitWork w) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ int red_i[kMaxWarps];
  const int64_t row = blockIdx.x / w.nsplit;
  const int split = static_cast<int>(blockIdx.x % w.nsplit);
  split_finalize<T>(p, w, row, split, reinterpret_cast<float*>(dyn_smem), red_i);
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
void launch_block(const AttentionParams& p, const at::Tensor& keys, const char* op,
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

// decode_attention: the partial kernel over (row, split), then the combine kernel when the rows
// are split. The workspace (e, the per-split partials) comes from the caching allocator, on the
// current stream.
template <class T, int VEC>
void launch_split(const AttentionParams& p, const at::Tensor& keys, const char* op,
                  cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.H;
  const int G = p.G, C = p.C, D = p.D;
  const SplitPlan plan = plan_splits(rows, C, device_info().sm_count);
  const int64_t blocks = rows * plan.nsplit;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many (batch, head, split) blocks: B*H=", rows,
              " rows of ", plan.nsplit, " splits; use a smaller batch per call");
  SplitWork w;
  w.nsplit = plan.nsplit;
  w.len = plan.len;
  w.nchunks = D / VEC;
  w.cpt = w.nchunks < kSplitThreads ? (w.nchunks > 0 ? w.nchunks : 1) : kSplitThreads;
  w.parts = kSplitThreads / w.cpt;
  const size_t q_bytes = round_up(sizeof(float) * size_t(G) * D, 16);
  const size_t partial_bytes = round_up(sizeof(float) * size_t(w.parts) * D, 16);
  const size_t mzf_bytes = round_up(sizeof(float) * 3 * size_t(G), 16);
  const size_t list_bytes = round_up(sizeof(int) * size_t(w.len), 16);
  w.q_off = 0;
  w.partial_off = static_cast<unsigned>(q_bytes);
  w.mzf_off = static_cast<unsigned>(q_bytes + partial_bytes);
  w.list_off = static_cast<unsigned>(q_bytes + partial_bytes + mzf_bytes);
  const size_t smem = q_bytes + partial_bytes + mzf_bytes + list_bytes;
  w.smem_bytes = static_cast<unsigned>(smem);

  const auto partial = decode_partial_kernel<T, VEC>;
  const size_t limit = max_dynamic_smem(reinterpret_cast<const void*>(partial));
  TORCH_CHECK(smem <= limit, op, ": the CUDA kernel needs ", smem,
              " bytes of shared memory for G*D = ", G, "*", D,
              " query values, more than this device allows (", limit,
              "); use fewer query heads per KV head or a smaller head_dim");

  // workspace: e [rows][G][C] | m, z [rows][nsplit][G] | acc [rows][nsplit][G][D] |
  // n [rows][nsplit]
  const size_t parts = size_t(rows) * plan.nsplit;
  const size_t e_bytes = round_up(sizeof(float) * size_t(rows) * G * C, 16);
  const size_t mz_bytes = round_up(sizeof(float) * parts * G, 16);
  const size_t acc_bytes = round_up(sizeof(float) * parts * G * D, 16);
  const size_t n_bytes = round_up(sizeof(int) * parts, 16);
  at::Tensor workspace = at::empty({static_cast<int64_t>(e_bytes + 2 * mz_bytes + acc_bytes +
                                                         n_bytes)},
                                   keys.options().dtype(at::kByte));
  unsigned char* ws = workspace.data_ptr<uint8_t>();
  w.e = reinterpret_cast<float*>(ws);
  w.m = reinterpret_cast<float*>(ws + e_bytes);
  w.z = reinterpret_cast<float*>(ws + e_bytes + mz_bytes);
  w.acc = reinterpret_cast<float*>(ws + e_bytes + 2 * mz_bytes);
  w.n = reinterpret_cast<int*>(ws + e_bytes + 2 * mz_bytes + acc_bytes);

  allow_dynamic_smem(reinterpret_cast<const void*>(partial), smem);
  partial<<<static_cast<unsigned>(blocks), kSplitThreads, smem, stream>>>(p, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.nsplit > 1) {
    const auto combine = decode_combine_kernel<T>;
    TORCH_CHECK(mzf_bytes <= max_dynamic_smem(reinterpret_cast<const void*>(combine)), op,
                ": too many query heads per KV head for the CUDA kernel (G=", G, ")");
    allow_dynamic_smem(reinterpret_cast<const void*>(combine), mzf_bytes);
    combine<<<static_cast<unsigned>(blocks), kSplitThreads, mzf_bytes, stream>>>(p, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// decode: the split kernel (Q = 1); else the block kernel.
void run(const AttentionParams& p, const at::Tensor& keys, const at::Tensor& values,
         const char* op, bool decode) {
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, op, ": too many (batch, head) rows: B*H=", rows);
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // the dtype was validated by prepare_*: the dispatch name never shows
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "attention", [&] {
    using T = host::elem_t<scalar_t>;
    const bool vec = vector_ok<T>(keys, p.D) && vector_ok<T>(values, p.D);
    if (decode && vec)
      launch_split<T, 16 / sizeof(T)>(p, keys, op, stream);
    else if (decode)
      launch_split<T, 1>(p, keys, op, stream);
    else if (vec)
      launch_block<T, 16 / sizeof(T)>(p, keys, op, stream);
    else
      launch_block<T, 1>(p, keys, op, stream);
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
      keys, values, "decode_attention", /*decode=*/true);
}

void block_attention(const at::Tensor& query, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& slot_pos,
                          const at::Tensor& query_pos, const at::Tensor& scores,
                          const at::Tensor& counts, const at::Tensor& last, double scale,
                          c10::string_view group_reduce, int64_t window, double softcap,
                          const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  run(host::prepare_block(query, keys, values, slot_pos, query_pos, scores, counts, last, scale,
                          group_reduce, window, softcap, sinks, out),
      keys, values, "block_attention", /*decode=*/false);
}

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("block_attention", &block_attention);
}

}  // namespace wkv::gpu
