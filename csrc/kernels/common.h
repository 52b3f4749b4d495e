// common.h: torch-free basics shared by the CPU and CUDA code.
// Provides: WKV_HOST_DEVICE, the stride structs Stride1..Stride4 with offset helpers, and
// wkv_add/wkv_mul/wkv_div: IEEE round-to-nearest float ops that are never contracted into FMAs
// (on the device they map to __fadd_rn/__fmul_rn/__fdiv_rn; host code is built with
// -ffp-contract=off), so merges round identically on every device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define WKV_HOST_DEVICE __host__ __device__
#else
#define WKV_HOST_DEVICE
#endif

namespace wkv {

struct Stride1 { int64_t s0; };
struct Stride2 { int64_t s0, s1; };
struct Stride3 { int64_t s0, s1, s2; };
struct Stride4 { int64_t s0, s1, s2, s3; };

WKV_HOST_DEVICE inline int64_t off(Stride1 s, int64_t i) { return i * s.s0; }
WKV_HOST_DEVICE inline int64_t off(Stride2 s, int64_t i, int64_t j) { return i * s.s0 + j * s.s1; }
WKV_HOST_DEVICE inline int64_t off(Stride3 s, int64_t i, int64_t j, int64_t k) {
  return i * s.s0 + j * s.s1 + k * s.s2;
}
WKV_HOST_DEVICE inline int64_t off(Stride4 s, int64_t i, int64_t j, int64_t k, int64_t l) {
  return i * s.s0 + j * s.s1 + k * s.s2 + l * s.s3;
}

WKV_HOST_DEVICE inline float wkv_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
WKV_HOST_DEVICE inline float wkv_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
WKV_HOST_DEVICE inline float wkv_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

WKV_HOST_DEVICE inline bool wkv_isnan(float x) { return x != x; }

}  // namespace wkv
