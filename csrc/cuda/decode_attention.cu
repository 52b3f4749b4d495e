// decode_attention.cu: CUDA implementation of weightedkv::decode_attention (docs/design.md).
//
// One block per (b, KV head h), covering the G query heads of the group, so that the per-slot
// probability mass can be reduced over the group and added to the statistics in the same kernel:
//  1. the G queries -> shared memory (float32);
//  2. logits s[g][c] = (q_g . k_c) * scale for the visible slots (held, slot_pos <= query_pos):
//     two threads per slot, each on alternate 16-byte chunks of the key row (VEC path) or on
//     alternate elements (any strides), all G heads per key load;
//  3. per head (one warp each): max and sum of exp over the slots, then p = exp(s - max) / sum
//     in place (the logits buffer now holds the probabilities);
//  4. statistics per slot: p_c = group reduction of p[.][c] (policy.h, increasing g), scores +=
//     p_c, counts += 1, last = p_c; held but not visible: last = 0 (accumulate with Q = 1);
//  5. out[g] = sum_c p[g][c] v_c: threads over (16-byte chunk of d, part of the slots), partial
//     sums combined over the parts in a fixed order.
// The logits/probabilities live in shared memory when G*C floats fit (else in a global workspace
// of logits, [B*H, G, C]); probabilities are never written to global memory in the first case.
// Reductions have a fixed order: results are deterministic for a given shape (float32, but not
// bit-identical to the CPU kernel, whose summation order differs).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../dispatch.h"
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

// Shared-memory layout (floats unless noted), in this order:
//   q [G*D] | row max [G] | row sum [G] | partial out [parts*D] | (smem mode) logits [G*C],
//   visible bytes [C]. In workspace mode logits+visible are at workspace + row * big_bytes.
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
  l.big_bytes = round_up(sizeof(float) * size_t(G) * C + size_t(C), 16);
  return l;
}

template <class T, int VEC>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const DecodeParams p, const Layout lay, unsigned char* workspace) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ int red_i[kMaxWarps];

  const int row = blockIdx.x, b = row / p.H, h = row % p.H;
  const int G = p.G, C = p.C, D = p.D, tid = threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize, nwarps = kThreads / kWarpSize;
  T* out = static_cast<T*>(p.out);
  const T* keys = static_cast<const T*>(p.keys);
  const T* values = static_cast<const T*>(p.values);
  auto out_at = [&](int g, int d) -> T& { return out[off(p.out_st, b, h * G + g, d)]; };

  const int64_t qp = p.query_pos[off(p.query_pos_st, b)];
  if (qp < 0) {  // padding row: zero output, no statistics
    for (int i = tid; i < G * D; i += kThreads) out_at(i / D, i % D) = from_float<T>(0.0f);
    return;
  }

  float* q_s = reinterpret_cast<float*>(dyn_smem);
  float* row_max = q_s + size_t(G) * D;
  float* row_sum = row_max + G;
  float* partial = row_sum + G;
  unsigned char* big = workspace ? workspace + size_t(row) * lay.big_bytes
                                 : dyn_smem + lay.small_bytes;
  float* prob = reinterpret_cast<float*>(big);  // [G][C]: logits, then probabilities
  unsigned char* visible = big + sizeof(float) * size_t(G) * C;

  const T* query = static_cast<const T*>(p.query);
  for (int i = tid; i < G * D; i += kThreads)
    q_s[i] = to_float(query[off(p.query_st, b, h * G + i / D, i % D)]);
  __syncthreads();

  // 2. logits
  const int nchunks = lay.nchunks;
  const int sub = tid % kThreadsPerKey;
  constexpr int kSlotsPerIter = kThreads / kThreadsPerKey;
  int nvis = 0;
  for (int base = 0; base < C; base += kSlotsPerIter) {  // uniform trip count (shuffles below)
    const int s = base + tid / kThreadsPerKey;
    bool vis = false;
    if (s < C) {
      const int64_t sp = p.slot_pos[off(p.pos_st, b, h, s)];
      vis = sp >= 0 && sp <= qp;
    }
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
            const float* qg = q_s + size_t(g0 + gi) * D + size_t(ch) * VEC;
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[gi] = __fmaf_rn(qg[v], kv[v], acc[gi]);
          }
        }
      }
#pragma unroll
      for (int gi = 0; gi < kGroupChunk; ++gi)
#pragma unroll
        for (int m = 1; m < kThreadsPerKey; m <<= 1)
          acc[gi] += __shfl_xor_sync(kFullMask, acc[gi], m);
      if (vis && sub == 0)
#pragma unroll
        for (int gi = 0; gi < kGroupChunk; ++gi)
          if (gi < gn) prob[size_t(g0 + gi) * C + s] = acc[gi] * p.scale;
    }
    if (s < C && sub == 0) {
      visible[s] = vis;
      nvis += vis;
    }
  }
  nvis = block_allreduce(nvis, SumOp(), red_i);  // also publishes prob / visible

  if (nvis == 0) {  // valid row that sees nothing: out = 0, all probabilities 0
    for (int i = tid; i < G * D; i += kThreads) out_at(i / D, i % D) = from_float<T>(0.0f);
    for (int s = tid; s < C; s += kThreads)
      if (p.slot_pos[off(p.pos_st, b, h, s)] >= 0) p.last[off(p.last_st, b, h, s)] = 0.0f;
    return;
  }

  // 3. softmax per head
  for (int g = warp; g < G; g += nwarps) {
    const float* lg = prob + size_t(g) * C;
    float mx = -INFINITY;
    for (int s = lane; s < C; s += kWarpSize)
      if (visible[s]) mx = fmaxf(mx, lg[s]);
    mx = warp_allreduce(mx, FMaxOp());
    float sum = 0.0f;
    for (int s = lane; s < C; s += kWarpSize)
      if (visible[s]) sum += expf(lg[s] - mx);
    sum = warp_allreduce(sum, SumOp());
    if (lane == 0) {
      row_max[g] = mx;
      row_sum[g] = sum;
    }
  }
  __syncthreads();
  for (int i = tid; i < G * C; i += kThreads) {
    const int g = i / C, s = i % C;
    if (visible[s]) prob[i] = expf(prob[i] - row_max[g]) / row_sum[g];
  }
  __syncthreads();

  // 4. statistics (accumulate with Q = 1)
  for (int s = tid; s < C; s += kThreads) {
    if (p.slot_pos[off(p.pos_st, b, h, s)] < 0) continue;  // empty slot: untouched
    float* last = p.last + off(p.last_st, b, h, s);
    if (!visible[s]) {
      *last = 0.0f;
      continue;
    }
    float acc = reduce_init(p.reduce, prob[s]);
    for (int g = 1; g < G; ++g) acc = reduce_step(p.reduce, acc, prob[size_t(g) * C + s]);
    const float v = reduce_finish(p.reduce, acc, G);
    float* score = p.scores + off(p.scores_st, b, h, s);
    float* count = p.counts + off(p.counts_st, b, h, s);
    *score = wkv_add(*score, wkv_add(0.0f, v));
    *count = wkv_add(*count, 1.0f);
    *last = v;
  }

  // 5. output
  const int cpt = lay.cpt, parts = lay.parts;
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
          if (!visible[s]) continue;
          float vv[VEC];
          load_chunk<T, VEC>(values + off(p.values_st, b, h, s, 0), ch, p.values_st.s3, vv);
#pragma unroll
          for (int gi = 0; gi < kGroupChunk; ++gi) {
            if (gi >= gn) break;
            const float pg = prob[size_t(g0 + gi) * C + s];
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
          for (int v = 0; v < VEC; ++v) partial[size_t(part) * D + ch * VEC + v] = acc[gi][v];
        __syncthreads();
        const int width = (nchunks - cbase < cpt ? nchunks - cbase : cpt) * VEC;
        for (int i = tid; i < width; i += kThreads) {
          const int d = cbase * VEC + i;
          float sum = 0.0f;
          for (int q = 0; q < parts; ++q) sum += partial[size_t(q) * D + d];
          out_at(g0 + gi, d) = from_float<T>(sum);
        }
        __syncthreads();
      }
    }
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
void launch(const DecodeParams& p, const at::Tensor& keys, cudaStream_t stream) {
  const auto kernel = decode_kernel<T, VEC>;
  const Layout lay = make_layout(p.G, p.C, p.D, VEC);
  const size_t limit = max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  const int64_t rows = int64_t(p.B) * p.H;
  TORCH_CHECK(lay.small_bytes <= limit, "decode_attention: the CUDA kernel needs ",
              lay.small_bytes, " bytes of shared memory for G*D = ", p.G, "*", p.D,
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

at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& slot_pos,
                                 const at::Tensor& query_pos, const at::Tensor& scores,
                                 const at::Tensor& counts, const at::Tensor& last, double scale,
                                 c10::string_view group_reduce) {
  at::Tensor out;
  const DecodeParams p = host::prepare_decode(query, keys, values, slot_pos, query_pos, scores,
                                              counts, last, scale, group_reduce, &out);
  const int64_t rows = int64_t(p.B) * p.H;
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT32_MAX, "decode_attention: too many (batch, head) rows: B*H=", rows);
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "decode_attention", [&] {
    using T = host::elem_t<scalar_t>;
    if (vector_ok<T>(keys, p.D) && vector_ok<T>(values, p.D))
      launch<T, 16 / sizeof(T)>(p, keys, stream);
    else
      launch<T, 1>(p, keys, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace wkv::gpu
