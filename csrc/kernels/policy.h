// policy.h: compression policies, group reduction, tie-breaking and the CaM random numbers.
// Provides:
//   enum Policy + parse_policy(name) (host), policy_merges/uses_position_key;
//   enum GroupReduce + parse_group_reduce(name) (host), reduce_init/reduce_step/reduce_finish;
//   avg_score(a, n): a / n, 0 when n == 0 (float32);
//   slot_key(policy, a, n, last): the per-policy eviction key (0 for the position-keyed policies,
//     so the (key, position) tie-break picks the oldest eligible token);
//   key_less(ka, pa, kb, pb): (key, position) lexicographic order, NaN keys sort lowest;
//   splitmix64 / cam_uniform(seed, b, h, pos): the counter-based uniform in [0, 1).
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace wkv {

enum class Policy : int { WeightedKV = 0, Evict = 1, H2O = 2, TOVA = 3, Streaming = 4, CaM = 5 };
enum class GroupReduce : int { Mean = 0, Sum = 1, Max = 2 };

// Names accepted by the ops (case-sensitive), in enum order.
constexpr const char* kPolicyNames[] = {"weightedkv", "evict", "h2o", "tova", "streaming", "cam"};
constexpr int kNumPolicies = 6;
constexpr const char* kGroupReduceNames[] = {"mean", "sum", "max"};
constexpr int kNumGroupReduces = 3;

// Returns false for an unknown name.
inline bool parse_policy(const char* name, Policy* out) {
  for (int i = 0; i < kNumPolicies; ++i)
    if (std::strcmp(name, kPolicyNames[i]) == 0) { *out = static_cast<Policy>(i); return true; }
  return false;
}
inline bool parse_group_reduce(const char* name, GroupReduce* out) {
  for (int i = 0; i < kNumGroupReduces; ++i)
    if (std::strcmp(name, kGroupReduceNames[i]) == 0) {
      *out = static_cast<GroupReduce>(i);
      return true;
    }
  return false;
}

WKV_HOST_DEVICE inline bool policy_merges(Policy p) {
  return p == Policy::WeightedKV || p == Policy::CaM;
}
WKV_HOST_DEVICE inline bool uses_position_key(Policy p) {
  return p == Policy::Streaming || p == Policy::CaM;
}

// ---- GQA group reduction of probabilities (float32, in increasing g) -----------------------
WKV_HOST_DEVICE inline float reduce_init(GroupReduce, float first) { return first; }
WKV_HOST_DEVICE inline float reduce_step(GroupReduce r, float acc, float x) {
  if (r == GroupReduce::Max) return (x > acc || wkv_isnan(x)) && !wkv_isnan(acc) ? x : acc;
  return wkv_add(acc, x);
}
WKV_HOST_DEVICE inline float reduce_finish(GroupReduce r, float acc, int G) {
  return r == GroupReduce::Mean ? wkv_div(acc, static_cast<float>(G)) : acc;
}

// ---- eviction keys -------------------------------------------------------------------------
WKV_HOST_DEVICE inline float avg_score(float a, float n) { return n == 0.0f ? 0.0f : wkv_div(a, n); }

WKV_HOST_DEVICE inline float slot_key(Policy p, float a, float n, float last) {
  switch (p) {
    case Policy::WeightedKV:
    case Policy::Evict: return avg_score(a, n);
    case Policy::H2O: return a;
    case Policy::TOVA: return last;
    default: return 0.0f;  // Streaming, CaM: oldest eligible via the position tie-break
  }
}

// (key, position) lexicographic "less than". A NaN key counts as lower than every number (as
// torch.argmin picks NaN first), NaNs among themselves by position; -0.0 == +0.0.
WKV_HOST_DEVICE inline bool key_less(float ka, int64_t pa, float kb, int64_t pb) {
  const bool na = wkv_isnan(ka), nb = wkv_isnan(kb);
  if (na || nb) {
    if (na && nb) return pa < pb;
    return na;
  }
  if (ka < kb) return true;
  if (kb < ka) return false;
  return pa < pb;
}

// ---- counter-based uniform for CaM ---------------------------------------------------------
// splitmix64 finaliser (Steele et al. 2014; the constants of java.util.SplittableRandom):
//   x += 0x9E3779B97F4A7C15; x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9;
//   x = (x ^ (x >> 27)) * 0x94D049BB133111EB; return x ^ (x >> 31)    (all mod 2^64)
WKV_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// u = uniform(seed, b, h, pos), exactly representable in float32, in [0, 1):
//   x = splitmix64(uint64(seed))            (seed as two's complement uint64)
//   x = splitmix64(x ^ uint64(b)); x = splitmix64(x ^ uint64(h)); x = splitmix64(x ^ uint64(pos))
//   u = (x >> 40) * 2^-24
// Python: M = 2**64 - 1; sm = lambda x: ... with "& M" after every + and *.
WKV_HOST_DEVICE inline float cam_uniform(int64_t seed, int64_t b, int64_t h, int64_t pos) {
  uint64_t x = splitmix64(static_cast<uint64_t>(seed));
  x = splitmix64(x ^ static_cast<uint64_t>(b));
  x = splitmix64(x ^ static_cast<uint64_t>(h));
  x = splitmix64(x ^ static_cast<uint64_t>(pos));
  return static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
}

}  // namespace wkv
