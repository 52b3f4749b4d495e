// convert.h: torch-free element types and float conversions.
// Provides: wkv::half_t and wkv::bf16_t (16-bit storage, layout-compatible with c10::Half /
// c10::BFloat16 and __half / __nv_bfloat16), to_float(x) for float/half_t/bf16_t and
// from_float<T>(f) (round to nearest even; NaN stays NaN). Host code uses exact bit manipulation,
// device code the CUDA intrinsics (same results).
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace wkv {

struct alignas(2) half_t { uint16_t bits; };
struct alignas(2) bf16_t { uint16_t bits; };

WKV_HOST_DEVICE inline uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
WKV_HOST_DEVICE inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

WKV_HOST_DEVICE inline float to_float(float x) { return x; }

WKV_HOST_DEVICE inline float to_float(bf16_t x) { return f32_from_bits(uint32_t(x.bits) << 16); }

WKV_HOST_DEVICE inline float to_float(half_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return f32_from_bits(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return f32_from_bits(sign);  // +-0
    // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    man &= 0x3FFu;
    return f32_from_bits(sign | uint32_t(127 - 15 - e) << 23 | (man << 13));
  }
  return f32_from_bits(sign | (exp + (127 - 15)) << 23 | (man << 13));
#endif
}

template <class T> WKV_HOST_DEVICE inline T from_float(float f);

template <> WKV_HOST_DEVICE inline float from_float<float>(float f) { return f; }

template <> WKV_HOST_DEVICE inline bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = f32_bits(f);
  if (wkv_isnan(f)) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return bf16_t{uint16_t((u + rounding_bias) >> 16)};
}

template <> WKV_HOST_DEVICE inline half_t from_float<half_t>(float f) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = f32_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u)  // inf or nan
    return half_t{uint16_t(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u))};
  if (a >= 0x477FF000u) return half_t{uint16_t(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (a < 0x33000000u) return half_t{sign};  // < 2^-25: rounds to zero
    const uint32_t e = a >> 23;                // 102..112
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;           // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half_ulp = 1u << (shift - 1u);
    if (rem > half_ulp || (rem == half_ulp && (r & 1u))) ++r;
    return half_t{uint16_t(sign | r)};
  }
  // normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even
  uint32_t r = a - 0x38000000u;  // exponent bias 127 -> 15
  r += 0xFFFu + ((r >> 13) & 1u);
  return half_t{uint16_t(sign | (r >> 13))};
#endif
}

}  // namespace wkv
