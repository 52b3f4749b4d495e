// isa.h: run-time choice of an AVX2 build of a hot CPU loop (the extension itself is compiled for
// the baseline x86-64 ISA). Provides:
//   WKV_CPU_INLINE: always_inline, so that a loop body inlined into an AVX2 wrapper is compiled
//     for AVX2 (a default-ISA body may be inlined into an AVX2 caller, not the reverse);
//   WKV_AVX2_TARGET: the attribute of such a wrapper (empty where unsupported);
//   cpu_has_avx2(): whether the running CPU has AVX2 (false where unsupported).
// Results do not change: the wrappers run the same source, with no FMA contraction
// (-ffp-contract=off) and no reassociation, only wider registers.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__)
#define WKV_CPU_INLINE inline __attribute__((always_inline))
#define WKV_AVX2_TARGET __attribute__((target("avx2")))
#define WKV_HAVE_AVX2_PATH 1
#else
#define WKV_CPU_INLINE inline
#define WKV_AVX2_TARGET
#define WKV_HAVE_AVX2_PATH 0
#endif

namespace wkv::cpu {

inline bool cpu_has_avx2() {
#if WKV_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

}  // namespace wkv::cpu
