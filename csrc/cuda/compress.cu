// compress.cu: CUDA implementation of weightedkv::compress (docs/design.md).
//
// One block per (b, h); the whole call (all removals) runs inside the kernel, no host sync. The
// kernel first counts the held tokens L (k = L - budget removals) and then takes one of two
// paths, as the CPU kernel (csrc/cpu/compress.cpp) does:
//  * one_removal (k == 1 and not CaM: every decode step): block-wide reductions straight over
//    the slots, no sorting and no working storage: the eligibility thresholds (held tokens of
//    rank sinks-1 and L-recent in (position, slot) order, by radix select), the arg-min of
//    (key, position, slot) over the eligible tokens, the merge target (right / previous
//    neighbour by a min / max reduction; 'nearest' by an arg-max of the key cosine, one slot per
//    thread), then the D-dimensional merge in parallel over d.
//  * sorted_removals (k > 1, or CaM): select once, then remove in order.
//      1. held (position, slot) pairs sorted once (block-wide bitonic sort): rank order; the
//         eligible tokens are ranks [sinks, L - recent);
//      2. keys never change during a call (a merge keeps the target's key and statistics, CaM
//         touches none), so the k successive arg-mins are the k smallest eligible
//         (key, position, slot) triples: one bitonic sort of 64-bit codes (order_key(key) << 32 |
//         rank), whose order is exactly the CPU's cand_less;
//      3. a doubly linked list over the ranks gives every removal its neighbours / CaM window
//         in O(1) per step (the cache as left by the previous removals); one thread decides
//         (target, gate, weights; CaM's mean in position order), then all threads apply the
//         merge in parallel over d (CaM: over window member x d), and one thread unlinks j.
//         Policies that never merge drop their k tokens in parallel.
//    Working storage: 32 bytes per slot, rounded to a power of two (row_bytes), in dynamic
//    shared memory or, when that is too small, in a global workspace.
// All float arithmetic goes through merge.h / policy.h in the CPU's order (no FMA contraction,
// key cosines summed serially over d by one thread), so the result is bit-identical to the CPU
// kernel by construction: the same removal order, the same targets, the same formulas.
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
// Working storage of sorted_removals above this stays in a global workspace (L2-resident), so
// that the dynamic shared memory reserved for every launch, decode steps included, never cuts
// the blocks per SM below four (C <= 1024 fits).
constexpr size_t kMaxRowSmem = 48 * 1024;

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

// Position order of held tokens: -1 = empty/removed never reaches it (callers filter).
struct PosSlotMax {
  __device__ __forceinline__ PosSlot operator()(PosSlot a, PosSlot b) const {
    if (b.slot == kNone) return a;
    if (a.slot == kNone) return b;
    return pair_less(a.pos, a.slot, b.pos, b.slot) ? b : a;
  }
};

// A 'nearest' candidate: the larger key cosine, then the smaller (position, slot) (merge.h).
struct Near {
  float cos;
  int slot;
  int64_t pos;
};

struct NearBest {
  __device__ __forceinline__ Near operator()(Near a, Near b) const {
    if (b.slot == kNone) return a;
    if (a.slot == kNone) return b;
    return similar_better(b.cos, b.pos, b.slot, a.cos, a.pos, a.slot) ? b : a;
  }
};

__device__ __forceinline__ Near shfl_xor(Near v, int m) {
  return {__shfl_xor_sync(kFullMask, v.cos, m), __shfl_xor_sync(kFullMask, v.slot, m),
          static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(v.pos), m))};
}

// Monotone 32-bit code of an eviction key under key_less: NaN lowest (0), -0 == +0.
__device__ __forceinline__ uint32_t order_key(float k) {
  if (wkv_isnan(k)) return 0u;
  if (k == 0.0f) k = 0.0f;
  const uint32_t u = __float_as_uint(k);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // >= 0x007FFFFF for every number
}

__host__ __device__ inline int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Bytes of working storage per (b, h) of sorted_removals, P = pow2_at_least(C): int64 position
// and uint64 candidate code per rank, int32 slot / next / prev / CaM window per rank (+ end).
inline size_t row_bytes(int C) {
  const size_t P = static_cast<size_t>(pow2_at_least(C < 1 ? 1 : C));
  return round_up(P * 8 * 2 + P * 4 + (P + 1) * 4 * 3, 16);
}

// Ascending block-wide bitonic sort of n (a power of two) elements: less(a, b) / swap(a, b)
// on element indices. Each compare-exchange pair belongs to one thread per stage.
template <class Less, class Swap>
__device__ void bitonic_sort(int n, Less less, Swap swap) {
  for (int k = 2; k <= n; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int ixj = i ^ j;
        if (ixj > i && ((i & k) == 0 ? less(ixj, i) : less(i, ixj))) swap(i, ixj);
      }
      __syncthreads();
    }
}

// The per-(b, h) view of the cache that both paths use.
template <class T>
struct Row {
  const CompressParams& p;
  const CacheParams& c;
  int b, h;
  __device__ int64_t pos(int s) const { return c.slot_pos[off(c.pos_st, b, h, s)]; }
  __device__ float avg(int s) const {
    return avg_score(c.scores[off(c.scores_st, b, h, s)], c.counts[off(c.counts_st, b, h, s)]);
  }
  __device__ float key(int s) const {
    return slot_key(p.policy, c.scores[off(c.scores_st, b, h, s)],
                    c.counts[off(c.counts_st, b, h, s)], c.last[off(c.last_st, b, h, s)]);
  }
  __device__ float merged(int s) const {
    return p.merged ? p.merged[off(p.merged_st, b, h, s)] : 0.0f;
  }
  __device__ T* value(int s) const {
    return static_cast<T*>(c.values) + off(c.values_st, b, h, s, 0);
  }
  __device__ float cosine(int a, int s) const {  // serial over d: merge.h's key_cosine
    const T* keys = static_cast<const T*>(c.keys);
    return key_cosine<T>(keys + off(c.keys_st, b, h, a, 0), keys + off(c.keys_st, b, h, s, 0),
                         c.D, c.keys_st.s3, c.keys_st.s3);
  }
  // weightedkv's merge weights of j into t (after the gate), as on the CPU
  __device__ MergeWeights weights(int j, int t) const {
    return merge_weights(slot_weight(p.merge_weights, avg(j), merged(j)),
                         slot_weight(p.merge_weights, avg(t), merged(t)));
  }
  __device__ bool gate(int j, int t) const {
    return gate_passes(p.merge_gate, p.merge_gate > 0.0f ? cosine(j, t) : 0.0f);
  }
  // one thread: the merged counter of t and the drop of j
  __device__ void count_merge(int j, int t) const {
    if (p.merged)
      p.merged[off(p.merged_st, b, h, t)] = wkv_add(merged(t), wkv_add(1.0f, merged(j)));
  }
  __device__ void drop(int s) const {
    c.slot_pos[off(c.pos_st, b, h, s)] = -1;
    c.scores[off(c.scores_st, b, h, s)] = 0.0f;
    c.counts[off(c.counts_st, b, h, s)] = 0.0f;
    c.last[off(c.last_st, b, h, s)] = 0.0f;
    if (p.merged) p.merged[off(p.merged_st, b, h, s)] = 0.0f;
  }
  // v_t <- merge(v_j, v_t), in parallel over d
  __device__ void merge_parallel(int j, int t, MergeWeights w) const {
    const int64_t vs = c.values_st.s3;
    const T* vj = value(j);
    T* vt = value(t);
    for (int d = threadIdx.x; d < c.D; d += blockDim.x)
      vt[d * vs] = from_float<T>(merge_value(to_float(vj[d * vs]), to_float(vt[d * vs]), w));
  }
};

struct Shared {
  SelectShared select;
  int red_i[kMaxWarps];
  long long red_ll[kMaxWarps];
  Cand red_cand[kMaxWarps];
  PosSlot red_ps[kMaxWarps];
  Near red_near[kMaxWarps];
  int target;  // sorted_removals: the decision of thread 0 for the current removal
  int m;
  MergeWeights w;
};

// k == 1, not CaM: reductions over the slots, no working storage.
template <class T>
__device__ void one_removal(const Row<T>& row, int L, long long mn, long long mx, Shared& sh) {
  const CompressParams& p = row.p;
  const int C = row.c.C, tid = threadIdx.x, nthreads = blockDim.x;
  // thresholds: eligible iff lo < (pos, slot) < hi
  int64_t lo_pos = LLONG_MIN, hi_pos = LLONG_MAX;
  int lo_slot = -1, hi_slot = INT_MAX;
  if (p.sinks > 0 || p.recent > 0) {
    Selection sel[2] = {{p.sinks > 0, p.sinks - 1, 0, 0}, {p.recent > 0, L - p.recent, 0, 0}};
    const uint64_t range = static_cast<uint64_t>(mx - mn);
    const int nbits = range == 0 ? 0 : 64 - __clzll(static_cast<long long>(range));
    radix_select2(
        C, nbits,
        [&](int, int i, uint64_t* v) {
          const int64_t q = row.pos(i);
          if (q < 0) return false;
          *v = static_cast<uint64_t>(q - mn);
          return true;
        },
        sel, sh.select);
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
            if (row.pos(i) != P[s]) return false;
            *v = static_cast<uint64_t>(i);
            return true;
          },
          ss, sh.select);
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
  // the removed token: arg-min of (key, position, slot) over the eligible ones
  Cand best{0.0f, kNone, 0};
  for (int s = tid; s < C; s += nthreads) {
    const int64_t q = row.pos(s);
    if (q >= 0 && pair_less(lo_pos, lo_slot, q, s) && pair_less(q, s, hi_pos, hi_slot))
      best = CandMin()(best, Cand{row.key(s), s, q});
  }
  best = block_allreduce(best, CandMin(), sh.red_cand);
  const int j = best.slot;  // never kNone: more than one token is eligible
  const int64_t pj = best.pos;

  if (p.policy == Policy::WeightedKV) {
    int t = kNone;
    if (p.merge_target == MergeTarget::Nearest) {
      Near nb{0.0f, kNone, 0};
      for (int s = tid; s < C; s += nthreads) {
        const int64_t q = row.pos(s);
        if (q >= 0 && s != j) nb = NearBest()(nb, Near{row.cosine(j, s), s, q});
      }
      t = block_allreduce(nb, NearBest(), sh.red_near).slot;
    } else {
      PosSlot r{0, kNone}, l{0, kNone};
      const bool similar = p.merge_target == MergeTarget::Similar;
      for (int s = tid; s < C; s += nthreads) {
        const int64_t q = row.pos(s);
        if (q < 0) continue;
        if (pair_less(pj, j, q, s)) r = PosSlotMin()(r, PosSlot{q, s});
        if (similar && pair_less(q, s, pj, j)) l = PosSlotMax()(l, PosSlot{q, s});
      }
      t = block_allreduce(r, PosSlotMin(), sh.red_ps).slot;
      if (similar) {
        const int left = block_allreduce(l, PosSlotMax(), sh.red_ps).slot;
        if (t == kNone || (left != kNone && prefer_left(row.cosine(j, left), row.cosine(j, t))))
          t = left;
      }
    }
    // every thread evaluates the same gate and weights (the same bits): no broadcast needed
    if (t != kNone && row.gate(j, t)) {
      row.merge_parallel(j, t, row.weights(j, t));
      __syncthreads();  // every thread has read merged(j) / merged(t) and the values
      if (tid == 0) row.count_merge(j, t);
    }
  }
  __syncthreads();  // every thread is done reading j's statistics
  if (tid == 0) row.drop(j);
}

// k > 1 or CaM: select once (two bitonic sorts), then remove in order over a linked list.
template <class T>
__device__ void sorted_removals(const Row<T>& row, int L, int64_t removals, unsigned char* base,
                                Shared& sh) {
  const CompressParams& p = row.p;
  const int C = row.c.C, tid = threadIdx.x, nthreads = blockDim.x;
  const int P = pow2_at_least(C);
  int64_t* spos = reinterpret_cast<int64_t*>(base);
  uint64_t* cand = reinterpret_cast<uint64_t*>(base + size_t(P) * 8);
  int* sslot = reinterpret_cast<int*>(base + size_t(P) * 16);
  int* nxt = sslot + P;
  int* prv = nxt + (P + 1);
  int* win = prv + (P + 1);

  // 1. held tokens in (position, slot) order: ranks 0 .. L-1
  for (int s = tid; s < P; s += nthreads) {
    const int64_t q = s < C ? row.pos(s) : -1;
    spos[s] = q >= 0 ? q : LLONG_MAX;
    sslot[s] = q >= 0 ? s : INT_MAX;
  }
  __syncthreads();
  bitonic_sort(
      P, [&](int a, int b) { return pair_less(spos[a], sslot[a], spos[b], sslot[b]); },
      [&](int a, int b) {
        const int64_t tp = spos[a];
        spos[a] = spos[b];
        spos[b] = tp;
        const int ts = sslot[a];
        sslot[a] = sslot[b];
        sslot[b] = ts;
      });

  // 2. the eligible ranks [sinks, L - recent) coded (key, rank) and sorted: removal order
  const int first = static_cast<int>(p.sinks), E = L - static_cast<int>(p.recent) - first;
  const int PE = pow2_at_least(E);
  for (int i = tid; i < PE; i += nthreads) {
    uint64_t code = ~0ull;
    if (i < E) {
      const int r = first + i;
      code = (uint64_t(order_key(row.key(sslot[r]))) << 32) | uint32_t(r);
    }
    cand[i] = code;
  }
  for (int i = tid; i <= L; i += nthreads) {
    nxt[i] = i + 1;
    prv[i] = i - 1;
  }
  __syncthreads();
  bitonic_sort(
      PE, [&](int a, int b) { return cand[a] < cand[b]; },
      [&](int a, int b) {
        const uint64_t t = cand[a];
        cand[a] = cand[b];
        cand[b] = t;
      });

  if (!policy_merges(p.policy)) {  // drops only: all at once
    for (int64_t i = tid; i < removals; i += nthreads)
      row.drop(sslot[static_cast<uint32_t>(cand[i])]);
    return;
  }

  // 3. removals in order
  const int64_t D = row.c.D, vs = row.c.values_st.s3;
  for (int64_t it = 0; it < removals; ++it) {
    const int jr = static_cast<int>(static_cast<uint32_t>(cand[it]));
    const int j = sslot[jr];
    if (tid == 0) {
      int t = kNone, m = 0;
      MergeWeights w{0.5f, 0.5f, 1.0f};
      if (p.policy == Policy::WeightedKV) {
        const int nr = nxt[jr], pr = prv[jr];
        const int right = nr < L ? sslot[nr] : kNone, left = pr >= 0 ? sslot[pr] : kNone;
        if (p.merge_target == MergeTarget::Right) {
          t = right;
        } else if (p.merge_target == MergeTarget::Similar) {
          t = right;
          if (t == kNone || (left != kNone &&
                             prefer_left(row.cosine(j, left), row.cosine(j, right))))
            t = left;
        } else {
          t = -2;  // nearest: a block-wide reduction below
        }
        if (t >= 0 && !row.gate(j, t)) t = kNone;
        if (t >= 0) w = row.weights(j, t);
      } else {  // CaM: the next cam_window held tokens, their mean in position order
        float sum = 0.0f;
        for (int r = nxt[jr]; r < L && m < p.cam_window; r = nxt[r]) {
          win[m++] = sslot[r];
          sum = wkv_add(sum, row.avg(sslot[r]));
        }
        if (m > 0) {
          const float prob = cam_probability(row.avg(j), wkv_div(sum, static_cast<float>(m)));
          if (!(cam_uniform(p.seed, row.b, p.head_offset + row.h, spos[jr]) < prob)) m = 0;
        }
      }
      sh.target = t;
      sh.m = m;
      sh.w = w;
    }
    __syncthreads();
    int t = sh.target;
    if (t == -2) {  // nearest: arg-max of the cosine over the still-held ranks
      Near nb{0.0f, kNone, 0};
      for (int r = tid; r < L; r += nthreads)
        if (spos[r] >= 0 && r != jr) nb = NearBest()(nb, Near{row.cosine(j, sslot[r]), sslot[r], spos[r]});
      t = block_allreduce(nb, NearBest(), sh.red_near).slot;
      if (t != kNone && !row.gate(j, t)) t = kNone;
      if (t != kNone) row.merge_parallel(j, t, row.weights(j, t));
    } else if (t >= 0) {
      row.merge_parallel(j, t, sh.w);
    } else if (sh.m > 0) {  // CaM: v_i += v_j / m over (window member, d) in parallel
      const int m = sh.m;
      const float fm = static_cast<float>(m);
      const T* vj = row.value(j);
      for (int64_t e = tid; e < int64_t(m) * D; e += nthreads) {
        const int64_t d = e % D;
        T* vi = row.value(win[e / D]);
        vi[d * vs] = from_float<T>(wkv_add(to_float(vi[d * vs]), wkv_div(to_float(vj[d * vs]), fm)));
      }
    }
    __syncthreads();  // merges done; every thread is done reading j and the list
    if (tid == 0) {
      if (t >= 0 && p.policy == Policy::WeightedKV) row.count_merge(j, t);
      row.drop(j);
      spos[jr] = -1;  // removed (the nearest scan skips it)
      const int nx = nxt[jr], pv = prv[jr];
      if (pv >= 0) nxt[pv] = nx;
      prv[nx] = pv;  // nx may be the end sentinel L
    }
    __syncthreads();
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads)
    compress_kernel(const CompressParams p, unsigned char* workspace, size_t ws_row_bytes) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ Shared sh;
  const CacheParams& c = p.cache;
  const int row_id = blockIdx.x;
  const Row<T> row{p, c, row_id / c.H, row_id % c.H};
  const int C = c.C, tid = threadIdx.x, nthreads = blockDim.x;

  // L, min and max held position
  int held = 0;
  long long mn = LLONG_MAX, mx = -1;
  for (int s = tid; s < C; s += nthreads) {
    const int64_t pos = row.pos(s);
    if (pos >= 0) {
      ++held;
      mn = pos < mn ? pos : mn;
      mx = pos > mx ? pos : mx;
    }
  }
  const int L = block_allreduce(held, SumOp(), sh.red_i);
  if (L <= p.budget) return;  // uniform
  const int64_t removals = L - p.budget;
  if (removals == 1 && p.policy != Policy::CaM) {
    mn = block_allreduce(mn, MinOp(), sh.red_ll);
    mx = block_allreduce(mx, MaxOp(), sh.red_ll);
    one_removal<T>(row, L, mn, mx, sh);
  } else {
    sorted_removals<T>(row, L, removals,
                       workspace ? workspace + size_t(row_id) * ws_row_bytes : dyn_smem, sh);
  }
}

}  // namespace

void compress(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                   const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                   int64_t budget, int64_t sinks, int64_t recent, c10::string_view policy,
                   int64_t cam_window, int64_t seed, int64_t head_offset,
                   c10::string_view merge_target, double merge_gate,
                   c10::string_view merge_weights, const std::optional<at::Tensor>& merged) {
  const CompressParams p = host::prepare_compress(keys, values, scores, counts, last, slot_pos,
                                                  budget, sinks, recent, policy, cam_window, seed,
                                                  head_offset, merge_target, merge_gate,
                                                  merge_weights, merged);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.cache.C == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "compress: too many (batch, head) rows: B*H=", rows);
  TORCH_CHECK(p.cache.C <= (1 << 30), "compress: at most 2^30 slots per row on CUDA, got C=",
              p.cache.C);
  const c10::cuda::CUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = p.cache.C <= 512 ? 128 : kMaxThreads;
  const size_t bytes = row_bytes(p.cache.C);
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "compress", [&] {
    const auto kernel = compress_kernel<host::elem_t<scalar_t>>;
    at::Tensor workspace;
    unsigned char* ws = nullptr;
    size_t smem = bytes;
    if (bytes > kMaxRowSmem || bytes > max_dynamic_smem(reinterpret_cast<const void*>(kernel))) {
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
