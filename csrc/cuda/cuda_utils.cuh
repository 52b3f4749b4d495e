// cuda_utils.cuh: device building blocks shared by the CUDA kernels.
// Provides: warp_allreduce / block_allreduce (deterministic all-reductions, result on every
// thread; ops SumOp, MinOp, MaxOp, FMaxOp; struct types add a shfl_xor overload),
// block_exclusive_scan (int prefix sum in thread order), load_chunk<T, VEC> (one element or
// one 16-byte vector of a K/V row, as float) and RowChunk<T, VEC> (the same load, converted on
// use). The block functions must be called by all threads
// of the block (they synchronise); blockDim.x must be a multiple of 32, at most 1024. Results do
// not depend on timing: the combine order is fixed by the block size.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../kernels/convert.h"

namespace wkv {
namespace gpu {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;

// Shuffles for the scalar types used by the reductions (structs add their own overload).
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ int shfl_xor(int v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ long long shfl_xor(long long v, int m) {
  return __shfl_xor_sync(kFullMask, v, m);
}
__device__ __forceinline__ unsigned long long shfl_xor(unsigned long long v, int m) {
  return __shfl_xor_sync(kFullMask, v, m);
}

// Butterfly all-reduce inside a warp. For a commutative op every lane ends with the same bits
// (each level combines the same two partial values, only the operand order differs).
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// Block all-reduce. `buf` is shared memory for kMaxWarps values of T. Warp results are combined
// by every thread in warp order, so the result is identical on all threads and across runs.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* buf) {
  v = warp_allreduce(v, op);
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T r = buf[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, buf[w]);
  return r;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// fmaxf semantics: a NaN operand is ignored when the other one is a number.
struct FMaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Loads VEC consecutive elements (VEC > 1: one 16-byte load, the caller guarantees alignment and
// unit stride; VEC == 1: one element at row[i * stride]) of chunk i of a row, as float.
template <class T, int VEC>
__device__ __forceinline__ void load_chunk(const T* row, int i, int64_t stride, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(row[static_cast<int64_t>(i) * stride]);
  } else {
    static_assert(sizeof(T) * VEC == 16, "vector loads are 16 bytes");
    union {
      uint4 raw;
      T v[VEC];
    } u;
    u.raw = __ldg(reinterpret_cast<const uint4*>(row) + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(u.v[k]);
  }
}

// One chunk of a K/V row as loaded (VEC > 1: one 16-byte vector, 4 registers; VEC == 1: one
// element), converted to float only when used: lets a loop keep several loads in flight without
// holding them as floats. Same alignment and stride rules as load_chunk.
template <class T, int VEC>
struct RowChunk {
  using Raw = typename std::conditional<VEC == 1, T, uint4>::type;
  Raw raw;
  __device__ __forceinline__ void load(const T* row, int i, int64_t stride) {
    if constexpr (VEC == 1) {
      raw = row[static_cast<int64_t>(i) * stride];
    } else {
      static_assert(sizeof(T) * VEC == 16, "vector loads are 16 bytes");
      raw = __ldg(reinterpret_cast<const uint4*>(row) + i);
    }
  }
  __device__ __forceinline__ void get(float (&out)[VEC]) const {
    if constexpr (VEC == 1) {
      out[0] = to_float(raw);
    } else {
      union {
        uint4 r;
        T v[VEC];
      } u;
      u.r = raw;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = to_float(u.v[k]);
    }
  }
};

// Exclusive prefix sum of one int per thread, in thread order. Returns the exclusive prefix and
// writes the block total to *total. `buf` is shared memory for kMaxWarps ints.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total, int* buf) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  int incl = v;
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const int n = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += n;
  }
  __syncthreads();
  if (lane == kWarpSize - 1) buf[warp] = incl;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < nwarps; ++w) {
    if (w < warp) before += buf[w];
    all += buf[w];
  }
  *total = all;
  return before + incl - v;
}

}  // namespace gpu
}  // namespace wkv
