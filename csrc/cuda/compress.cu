// compress.cu: CUDA implementation of weightedkv::compress (docs/design.md).
//
// One block per (b, h); the whole call (all removals) runs inside the kernel, no host sync.
//  1. Working copy of slot_pos (int64), the eviction key and an eligibility byte per slot, in
//     dynamic shared memory (or, when C is too large for it, in a global workspace).
//  2. Eligibility thresholds once per call (removals never touch the sinks / recent groups): the
//     held tokens of rank sinks-1 and L-recent in (position, slot) order, found by a block-wide
//     radix select (8-bit digits of position - min position, integer histograms; a second radix
//     select over the slot index only when positions are duplicated).
//  3. Keys (slot_key of policy.h) computed once: a merge keeps r's statistics, CaM touches none.
//  4. Per removal: block-wide arg-min of (key, position, slot) over the eligible slots (a strict
//     total order, so the result does not depend on the reduction tree and equals the CPU's);
//     WeightedKV: right neighbour = block-wide min of the held (position, slot) > (pos_j, j), then
//     the D-dimensional merge of merge.h in parallel over d; CaM: the window by cam_window
//     successive "next held" reductions, the mean summed in position order as on the CPU; then j
//     is dropped. All float arithmetic goes through merge.h/policy.h (no FMA contraction), so the
//     result is bit-identical to the CPU kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "../ops.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../dispatch.h"
#include "../kernels/merge.h"
#include "../kernels/params.h"
#include "../kernels/policy.h"
#include "cuda_launch.h"
#include "cuda_utils.cuh"

namespace wkv::gpu {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kNone = -1;  // "no slot": compares above every real element in the reductions

// Bytes of working storage per (b, h): int64 position, float key, uint8 eligibility per slot.
inline size_t row_bytes(int C) { return round_up(size_t(C) * 13, 16); }

struct PosSlot {
  int64_t pos;
  int slot;
};

// (position, slot) order of two real elements (thresholds may use slot -1 / INT_MAX sentinels).
__device__ __forceinline__ bool pair_less(int64_t pa, int sa, int64_t pb, int sb) {
  return pa != pb ? pa < pb : sa < sb;
}

struct PosSlotMin {
  __device__ __forceinline__ PosSlot operator()(PosSlot a, PosSlot b) const {
    if (b.slot == kNone) return a;
    if (a.slot == kNone) return b;
    return pair_less(b.pos, b.slot, a.pos, a.slot) ? b : a;
  }
};

__device__ __forceinline__ PosSlot shfl_xor(PosSlot v, int m) {
  return {static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(v.pos), m)),
          __shfl_xor_sync(kFullMask, v.slot, m)};
}

struct Cand {
  float key;
  int slot;
  int64_t pos;
};

// The CPU's cand_less: key_less on (key, position), then the slot (duplicate positions only).
struct CandMin {
  __device__ __forceinline__ Cand operator()(Cand a, Cand b) const {
    if (b.slot == kNone) return a;
    if (a.slot == kNone) return b;
    if (key_less(b.key, b.pos, a.key, a.pos)) return b;
    if (key_less(a.key, a.pos, b.key, b.pos)) return a;
    return b.slot < a.slot ? b : a;
  }
};

__device__ __forceinline__ Cand shfl_xor(Cand v, int m) {
  return {__shfl_xor_sync(kFullMask, v.key, m), __shfl_xor_sync(kFullMask, v.slot, m),
          static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(v.pos), m))};
}

// One order-statistic query of radix_select2: in: active, rank (0-based); out: value, rank
// within the group of elements equal to value, size of that group.
struct Selection {
  bool active;
  int64_t rank;
  uint64_t value;
  int64_t eq;
};

struct SelectShared {
  int hist[2 * 256];
  unsigned long long result[2][3];
};

// Block-wide radix select of up to two order statistics over n elements at once: value_of(s, i,
// &v) says whether element i takes part in selection s and gives its value v < 2^nbits.
// 8-bit digits from the top; integer histograms (atomics on ints: order independent).
template <class ValueFn>
__device__ void radix_select2(int n, int nbits, ValueFn value_of, Selection (&sel)[2],
                              SelectShared& sh) {
  uint64_t prefix[2] = {0, 0};
  const int top = nbits <= 8 ? 0 : ((nbits + 7) / 8 - 1) * 8;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int shift = top; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 2 * 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    const uint64_t high = shift + 8 >= 64 ? 0ull : (~0ull << (shift + 8));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint64_t v;
        if (sel[s].active && value_of(s, i, &v) && ((v ^ prefix[s]) & high) == 0)
          atomicAdd(&sh.hist[s * 256 + int((v >> shift) & 255u)], 1);
      }
    }
    __syncthreads();
    if (warp < 2 && sel[warp].active) {  // warp s finds the digit of selection s
      const int* hs = sh.hist + warp * 256;
      int local = 0;
      for (int i = 0; i < 8; ++i) local += hs[lane * 8 + i];
      int incl = local;
      for (int d = 1; d < kWarpSize; d <<= 1) {
        const int o = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += o;
      }
      const int64_t before = incl - local, r = sel[warp].rank;
      if (before <= r && r < incl) {
        int64_t rem = r - before;
        int d = lane * 8;
        while (rem >= hs[d]) rem -= hs[d++];
        sh.result[warp][0] = prefix[warp] | (uint64_t(d) << shift);
        sh.result[warp][1] = static_cast<unsigned long long>(rem);
        sh.result[warp][2] = static_cast<unsigned long long>(hs[d]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (!sel[s].active) continue;
      prefix[s] = sh.result[s][0];
      sel[s].rank = static_cast<int64_t>(sh.result[s][1]);
      sel[s].eq = static_cast<int64_t>(sh.result[s][2]);
    }
  }
  for (int s = 0; s < 2; ++s) sel[s].value = prefix[s];
  __syncthreads();  // sh is reused by the caller
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads)
    compress_kernel(const CompressParams p, unsigned char* workspace, size_t ws_row_bytes) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ SelectShared select_sh;
  __shared__ int red_i[kMaxWarps];
  __shared__ long long red_ll[kMaxWarps];
  __shared__ Cand red_cand[kMaxWarps];
  __shared__ PosSlot red_ps[kMaxWarps];

  const CacheParams& c = p.cache;
  const int row = blockIdx.x, b = row / c.H, h = row % c.H;
  const int C = c.C, tid = threadIdx.x, nthreads = blockDim.x;
  unsigned char* base = workspace ? workspace + size_t(row) * ws_row_bytes : dyn_smem;
  int64_t* wpos = reinterpret_cast<int64_t*>(base);
  float* wkey = reinterpret_cast<float*>(base + size_t(C) * 8);
  unsigned char* welig = base + size_t(C) * 12;

  // 1. working copy of the positions; L, min and max held position
  int held = 0;
  long long mn = LLONG_MAX, mx = -1;
  for (int s = tid; s < C; s += nthreads) {
    const int64_t pos = c.slot_pos[off(c.pos_st, b, h, s)];
    wpos[s] = pos;
    if (pos >= 0) {
      ++held;
      mn = pos < mn ? pos : mn;
      mx = pos > mx ? pos : mx;
    }
  }
  const int L = block_allreduce(held, SumOp(), red_i);
  if (L <= p.budget) return;  // uniform
  mn = block_allreduce(mn, MinOp(), red_ll);
  mx = block_allreduce(mx, MaxOp(), red_ll);
  const int64_t removals = L - p.budget;

  // 2. thresholds: eligible iff lo < (pos, slot) < hi
  int64_t lo_pos = LLONG_MIN, hi_pos = LLONG_MAX;
  int lo_slot = -1, hi_slot = INT_MAX;
  if (p.sinks > 0 || p.recent > 0) {
    Selection sel[2] = {{p.sinks > 0, p.sinks - 1, 0, 0}, {p.recent > 0, L - p.recent, 0, 0}};
    const uint64_t range = static_cast<uint64_t>(mx - mn);
    const int nbits = range == 0 ? 0 : 64 - __clzll(static_cast<long long>(range));
    radix_select2(
        C, nbits,
        [&](int, int i, uint64_t* v) {
          const int64_t q = wpos[i];
          if (q < 0) return false;
          *v = static_cast<uint64_t>(q - mn);
          return true;
        },
        sel, select_sh);
    const int64_t P[2] = {mn + static_cast<int64_t>(sel[0].value),
                          mn + static_cast<int64_t>(sel[1].value)};
    // Unique position: the threshold token is the only one with that position, so the slot
    // sentinel excludes exactly it. Duplicates: select the slot among the equal positions.
    Selection ss[2] = {{sel[0].active && sel[0].eq > 1, sel[0].rank, 0, 0},
                       {sel[1].active && sel[1].eq > 1, sel[1].rank, 0, 0}};
    if (ss[0].active || ss[1].active) {
      const int nb = C <= 1 ? 0 : 32 - __clz(C - 1);
      radix_select2(
          C, nb,
          [&](int s, int i, uint64_t* v) {
            if (wpos[i] != P[s]) return false;
            *v = static_cast<uint64_t>(i);
            return true;
          },
          ss, select_sh);
    }
    if (sel[0].active) {
      lo_pos = P[0];
      lo_slot = ss[0].active ? static_cast<int>(ss[0].value) : INT_MAX;
    }
    if (sel[1].active) {
      hi_pos = P[1];
      hi_slot = ss[1].active ? static_cast<int>(ss[1].value) : -1;
    }
  }

  // 3. keys of the eligible slots
  for (int s = tid; s < C; s += nthreads) {
    const int64_t pos = wpos[s];
    const bool e = pos >= 0 && pair_less(lo_pos, lo_slot, pos, s) &&
                   pair_less(pos, s, hi_pos, hi_slot);
    welig[s] = e;
    if (e)
      wkey[s] = slot_key(p.policy, c.scores[off(c.scores_st, b, h, s)],
                         c.counts[off(c.counts_st, b, h, s)], c.last[off(c.last_st, b, h, s)]);
  }
  __syncthreads();

  T* values = static_cast<T*>(c.values);
  const int64_t vs = c.values_st.s3;
  auto avg = [&](int s) {
    return avg_score(c.scores[off(c.scores_st, b, h, s)], c.counts[off(c.counts_st, b, h, s)]);
  };
  // the held token following (pos, slot) in (position, slot) order, kNone if there is none
  auto next_held = [&](int64_t pos, int slot) {
    PosSlot best{0, kNone};
    for (int s = tid; s < C; s += nthreads) {
      const int64_t q = wpos[s];
      if (q >= 0 && pair_less(pos, slot, q, s)) best = PosSlotMin()(best, PosSlot{q, s});
    }
    return block_allreduce(best, PosSlotMin(), red_ps);
  };

  // 4. removals
  for (int64_t it = 0; it < removals; ++it) {
    Cand best{0.0f, kNone, 0};
    for (int s = tid; s < C; s += nthreads)
      if (welig[s]) best = CandMin()(best, Cand{wkey[s], s, wpos[s]});
    best = block_allreduce(best, CandMin(), red_cand);
    const int j = best.slot;  // never kNone: more than `removals` tokens are eligible
    const int64_t pj = best.pos;
    const T* vj = values + off(c.values_st, b, h, j, 0);

    if (p.policy == Policy::WeightedKV) {
      const PosSlot r = next_held(pj, j);
      if (r.slot != kNone) {
        const MergeWeights w = merge_weights(avg(j), avg(r.slot));
        T* vr = values + off(c.values_st, b, h, r.slot, 0);
        for (int d = tid; d < c.D; d += nthreads)
          vr[d * vs] = from_float<T>(merge_value(to_float(vj[d * vs]), to_float(vr[d * vs]), w));
      }
    } else if (p.policy == Policy::CaM) {
      PosSlot last_in{pj, j};  // the window is (pos_j, j) < (pos, slot) <= last_in
      float sum = 0.0f;
      int m = 0;
      for (int64_t i = 0; i < p.cam_window; ++i) {
        const PosSlot nx = next_held(last_in.pos, last_in.slot);
        if (nx.slot == kNone) break;
        sum = wkv_add(sum, avg(nx.slot));  // position order, as on the CPU
        ++m;
        last_in = nx;
      }
      if (m > 0) {
        const float prob = cam_probability(avg(j), wkv_div(sum, static_cast<float>(m)));
        if (cam_uniform(p.seed, b, p.head_offset + h, pj) < prob) {
          for (int s = tid; s < C; s += nthreads) {
            const int64_t q = wpos[s];
            if (q < 0 || !pair_less(pj, j, q, s) || pair_less(last_in.pos, last_in.slot, q, s))
              continue;
            cam_add_row<T>(vj, values + off(c.values_st, b, h, s, 0), c.D, vs, vs, m);  // merge.h
          }
        }
      }
    }
    __syncthreads();  // every thread is done reading j's statistics and values
    if (tid == 0) {
      c.slot_pos[off(c.pos_st, b, h, j)] = -1;
      c.scores[off(c.scores_st, b, h, j)] = 0.0f;
      c.counts[off(c.counts_st, b, h, j)] = 0.0f;
      c.last[off(c.last_st, b, h, j)] = 0.0f;
      wpos[j] = -1;
      welig[j] = 0;
    }
    __syncthreads();  // the drop and the merged values are visible to the next removal
  }
}

}  // namespace

void compress(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                   const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                   int64_t budget, int64_t sinks, int64_t recent, c10::string_view policy,
                   int64_t cam_window, int64_t seed, int64_t head_offset) {
  const CompressParams p = host::prepare_compress(keys, values, scores, counts, last, slot_pos,
                                                  budget, sinks, recent, policy, cam_window, seed,
                                                  head_offset);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.cache.C == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "compress: too many (batch, head) rows: B*H=", rows);
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = p.cache.C <= 512 ? 128 : kMaxThreads;
  const size_t bytes = row_bytes(p.cache.C);
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "compress", [&] {
    const auto kernel = compress_kernel<host::elem_t<scalar_t>>;
    at::Tensor workspace;
    unsigned char* ws = nullptr;
    size_t smem = bytes;
    if (bytes > max_dynamic_smem(reinterpret_cast<const void*>(kernel))) {
      workspace = at::empty({static_cast<int64_t>(bytes) * rows}, keys.options().dtype(at::kByte));
      ws = workspace.data_ptr<uint8_t>();
      smem = 0;
    } else {
      allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    }
    kernel<<<rows, threads, smem, stream>>>(p, ws, bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CUDA, m) { m.impl("compress", &compress); }

}  // namespace wkv::gpu
