// test_kernels.cpp: the torch-free helpers of csrc/kernels against c10 / known values.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "harness.h"
#include "kernels/convert.h"
#include "kernels/merge.h"
#include "kernels/policy.h"

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || bits(a) == bits(b); }

uint16_t c10_half_bits(float f) { return c10::Half(f).x; }
uint16_t c10_bf16_bits(float f) { return c10::BFloat16(f).x; }

}  // namespace

WKV_TEST(convert_all_16bit_patterns_to_float) {
  int bad = 0;
  for (uint32_t u = 0; u < 65536; ++u) {
    c10::Half h;
    h.x = static_cast<uint16_t>(u);
    c10::BFloat16 bf;
    bf.x = static_cast<uint16_t>(u);
    bad += !same(wkv::to_float(wkv::half_t{uint16_t(u)}), static_cast<float>(h));
    bad += !same(wkv::to_float(wkv::bf16_t{uint16_t(u)}), static_cast<float>(bf));
    // round trip of every representable value
    if (!std::isnan(static_cast<float>(h)))
      bad += wkv::from_float<wkv::half_t>(static_cast<float>(h)).bits != uint16_t(u);
  }
  WKV_CHECK(bad == 0);
}

WKV_TEST(convert_float_rounding_matches_c10) {
  std::mt19937 rng(123);
  int bad = 0;
  auto check = [&](float f) {
    const bool nan = std::isnan(f);
    const uint16_t h = wkv::from_float<wkv::half_t>(f).bits, b = wkv::from_float<wkv::bf16_t>(f).bits;
    if (nan) {
      bad += (h & 0x7C00u) != 0x7C00u || (h & 0x3FFu) == 0;
      bad += (b & 0x7F80u) != 0x7F80u || (b & 0x7Fu) == 0;
    } else {
      bad += h != c10_half_bits(f);
      bad += b != c10_bf16_bits(f);
    }
  };
  for (int i = 0; i < 2000000; ++i) check(from_bits(rng()));  // every exponent, incl. inf/nan
  std::uniform_real_distribution<float> small(-70000.f, 70000.f);
  for (int i = 0; i < 200000; ++i) check(small(rng));
  // half rounding boundaries: ties, subnormals, overflow
  for (float f : {65504.f, 65519.99f, 65520.f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f,
                  6.1035156e-5f, 6.1032e-5f, 1.0009766f, 1.0004883f, 1.0014648f, -0.0f, 0.0f,
                  std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min()})
    check(f), check(-f);
  WKV_CHECK(bad == 0);
}

WKV_TEST(hash_known_values) {
  // values of weightedkv_ext.reference.uniform (Python big-int implementation)
  WKV_CHECK(wkv::cam_uniform(0, 0, 0, 0) == 2175092.0f / 16777216.0f);
  WKV_CHECK(wkv::cam_uniform(7, 1, 2, 100) == 13172745.0f / 16777216.0f);
  WKV_CHECK(wkv::cam_uniform(-3, 5, 0, 12345) == 4859328.0f / 16777216.0f);
  float lo = 1, hi = 0;
  for (int pos = 0; pos < 10000; ++pos) {
    const float u = wkv::cam_uniform(1, 0, 0, pos);
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  WKV_CHECK(lo >= 0.0f && lo < 0.01f && hi < 1.0f && hi > 0.99f);
}

WKV_TEST(key_order_and_policies) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  WKV_CHECK(wkv::key_less(0.1f, 5, 0.2f, 1));
  WKV_CHECK(wkv::key_less(0.1f, 1, 0.1f, 5));
  WKV_CHECK(!wkv::key_less(0.1f, 5, 0.1f, 1));
  WKV_CHECK(wkv::key_less(nan, 9, -1e30f, 0));
  WKV_CHECK(!wkv::key_less(-1e30f, 0, nan, 9));
  WKV_CHECK(wkv::key_less(nan, 1, nan, 2));
  WKV_CHECK(wkv::key_less(-0.0f, 1, 0.0f, 2) && wkv::key_less(0.0f, 1, -0.0f, 2));
  WKV_CHECK(wkv::avg_score(1.0f, 0.0f) == 0.0f && wkv::avg_score(1.0f, 4.0f) == 0.25f);
  WKV_CHECK(wkv::slot_key(wkv::Policy::H2O, 3.f, 4.f, 5.f) == 3.f);
  WKV_CHECK(wkv::slot_key(wkv::Policy::TOVA, 3.f, 4.f, 5.f) == 5.f);
  WKV_CHECK(wkv::slot_key(wkv::Policy::Evict, 3.f, 4.f, 5.f) == 0.75f);
  WKV_CHECK(wkv::slot_key(wkv::Policy::Streaming, 3.f, 4.f, 5.f) == 0.f);
  wkv::Policy p;
  WKV_CHECK(wkv::parse_policy("cam", &p) && p == wkv::Policy::CaM);
  WKV_CHECK(!wkv::parse_policy("WeightedKV", &p));
  wkv::GroupReduce r;
  WKV_CHECK(wkv::parse_group_reduce("max", &r) && r == wkv::GroupReduce::Max);
  WKV_CHECK(!wkv::parse_group_reduce("min", &r));
}

WKV_TEST(merge_weights_and_cam_probability) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  auto w = wkv::merge_weights(0.1f, 0.5f);
  WKV_CHECK(w.wj == 0.1f && w.wr == 0.5f && w.denom == 0.1f + 0.5f);
  for (auto [a, b] : {std::pair{0.f, 0.f}, {nan, 1.f}, {inf, 1.f}, {3e38f, 3e38f}, {-1.f, 0.5f}}) {
    w = wkv::merge_weights(a, b);
    WKV_CHECK(w.wj == 0.5f && w.wr == 0.5f && w.denom == 1.0f);
  }
  WKV_CHECK(wkv::merge_value(2.f, 4.f, wkv::merge_weights(0.f, 0.f)) == 3.f);
  WKV_CHECK(wkv::cam_probability(0.f, 1.f) == 0.f);
  WKV_CHECK(wkv::cam_probability(0.5f, 0.f) == 1.f);
  WKV_CHECK(wkv::cam_probability(nan, 1.f) == 0.f && wkv::cam_probability(1.f, nan) == 0.f);
  WKV_CHECK(wkv::cam_probability(1.f, 4.f) == 0.25f && wkv::cam_probability(4.f, 1.f) == 1.f);
  WKV_CHECK(wkv::cam_probability(inf, inf) == 0.f);
}
