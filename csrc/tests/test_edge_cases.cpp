// test_edge_cases.cpp: numerical and argument edge cases of the four ops, written to be run under
// AddressSanitizer + UndefinedBehaviorSanitizer (WKV_SANITIZE=ON): NaN/inf inputs stay in their
// (b, h), ties, full-capacity appends, head_dim 4096, zero-size tensors, one eligible slot,
// integer overflow of the scalar arguments, aliasing of the written tensors, tiny/huge merge
// weights, fp16 values at the top of the range.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"
#include "kernels/merge.h"
#include "ops_util.h"

using namespace wkv_test;  // NOLINT

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// Every tensor of a and b is equal on the (b, h) rows other than (bad_b, bad_h).
bool equal_except(const State& a, const State& b, int64_t bad_b, int64_t bad_h) {
  const int64_t B = a.k.size(0), H = a.k.size(1);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t h = 0; h < H; ++h) {
      if (i == bad_b && h == bad_h) continue;
      const Tensor x[6] = {a.k[i][h], a.v[i][h], a.s[i][h], a.n[i][h], a.l[i][h], a.p[i][h]};
      const Tensor y[6] = {b.k[i][h], b.v[i][h], b.s[i][h], b.n[i][h], b.l[i][h], b.p[i][h]};
      for (int t = 0; t < 6; ++t)
        if (!at::equal(x[t], y[t])) return false;
    }
  return true;
}

// append -> accumulate -> decode -> compress; `poison` puts `bad` into row (1, 1) of one input.
std::pair<State, Tensor> pipeline(at::ScalarType dt, const std::string& policy,
                                  const std::string& poison, float bad) {
  const int64_t B = 3, H = 2, G = 2, C = 12, D = 8, T = 3;
  State st = random_state(B, H, C, D, 6, dt, 21);
  at::manual_seed(22);
  Tensor nk = at::randn({B, H, T, D}).to(dt), nv = at::randn({B, H, T, D}).to(dt);
  Tensor pos = at::arange(6, 6 + T).repeat({B, 1});
  Tensor probs = at::rand({B, H * G, T, C});
  Tensor q = at::randn({B, H * G, D}).to(dt);
  if (poison == "new_keys") nk[1][1][1][3] = bad;
  if (poison == "new_values") nv[1][1][0].fill_(bad);
  if (poison == "probs") probs[1][2][2].fill_(bad);
  if (poison == "query") q[1][2][5] = bad;
  if (poison == "scores") st.s[1][1].fill_(bad);
  if (poison == "last") st.l[1][1].fill_(bad);
  append(st, nk, nv, pos);
  accumulate_op().call(probs, st.p, pos, st.s, st.n, st.l, "mean");
  Tensor out = decode(q, st, at::full({B}, 9, at::kLong), 0.35, "max");
  compress(st, 5, 1, 1, policy, 3, 4);
  return {st, out};
}

}  // namespace

WKV_TEST(nan_and_inf_stay_in_their_row) {
  for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16})
    for (const char* policy : {"weightedkv", "h2o", "tova", "cam"}) {
      const auto clean = pipeline(dt, policy, "", 0.0f);
      for (const char* poison : {"new_keys", "new_values", "probs", "query", "scores", "last"})
        for (float bad : {kNaN, kInf, -kInf}) {
          const auto dirty = pipeline(dt, policy, poison, bad);
          WKV_CHECK(equal_except(clean.first, dirty.first, 1, 1));
          // decode outputs: query heads 2, 3 of row 1 belong to KV head 1
          Tensor keep = at::ones({3, 4}, at::kBool);
          keep[1][2] = false;
          keep[1][3] = false;
          WKV_CHECK(at::equal(clean.second.index({keep}), dirty.second.index({keep})));
        }
    }
}

WKV_TEST(nan_statistic_is_removed_first) {
  for (const char* policy : {"weightedkv", "evict", "h2o", "tova"}) {
    State st = empty_state(1, 1, 8, 2, at::kFloat);
    for (int64_t pos = 0; pos < 6; ++pos) {
      st.p[0][0][5 - pos] = pos;
      st.s[0][0][5 - pos] = 0.5f;
      st.n[0][0][5 - pos] = 1.0f;
      st.l[0][0][5 - pos] = 0.5f;
    }
    const int64_t slot_of_4 = 1;
    (std::string(policy) == "tova" ? st.l : st.s)[0][0][slot_of_4] = kNaN;
    compress(st, 5, 1, 1, policy);
    WKV_CHECK(st.p[0][0][slot_of_4].item<int64_t>() == -1);
    WKV_CHECK(((st.p >= 0).sum().item<int64_t>()) == 5);
  }
}

WKV_TEST(ties_remove_the_oldest_eligible_for_every_removal_count) {
  for (const char* policy : {"weightedkv", "evict", "h2o", "tova", "cam"})
    for (int64_t budget : {3, 5, 9}) {
      State st = random_state(2, 2, 16, 4, 14, at::kFloat, 5);
      const Tensor held = st.p >= 0;
      st.s.copy_(held.to(at::kFloat) * 0.25f);
      st.n.copy_(held.to(at::kFloat));
      st.l.copy_(st.s);
      State streaming = st.clone();
      compress(st, budget, 1, 1, policy);
      compress(streaming, budget, 1, 1, "streaming");
      WKV_CHECK(at::equal(st.p, streaming.p));
    }
}

WKV_TEST(append_to_a_full_row_is_an_error_and_changes_nothing) {
  for (auto dt : {at::kFloat, at::kHalf}) {
    State st = random_state(3, 4, 6, 5, 3, dt, 7);
    st.p[2][3].copy_(at::arange(6));  // only (b=2, h=3) is full
    const State before = st.clone();
    Tensor nk = at::randn({3, 4, 2, 5}).to(dt);
    Tensor pos = at::tensor({10, 11, -1, -1, 10, -1}, at::kLong).reshape({3, 2});
    WKV_CHECK_THROWS(append(st, nk, nk.clone(), pos),
                     "append: not enough free slots in batch row 2, head 3: 1 new tokens but "
                     "only 0 free slots (capacity C=6)");
    WKV_CHECK(st.equals(before));
    // padding only in the full row: valid
    pos[2][0] = -1;
    append(st, nk, nk.clone(), pos);
    WKV_CHECK(at::equal(st.p[2][3], before.p[2][3]));
    WKV_CHECK(((st.p[0] >= 0).sum(-1) == 5).all().item<bool>());
  }
}

WKV_TEST(huge_head_dim) {
  const int64_t B = 1, H = 2, G = 2, C = 6, D = 4096;
  for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    State st = random_state(B, H, C, D, 4, dt, 9);
    Tensor nk = at::randn({B, H, 2, D}).to(dt);
    append(st, nk, nk * 0.5, at::tensor({4, 5}, at::kLong).reshape({1, 2}));
    WKV_CHECK(at::equal(st.k.index({0, 1, st.p[0][1] == 5}).squeeze(0), nk[0][1][1]));
    Tensor q = (at::randn({B, H * G, D}) / 64).to(dt);
    const State before = st.clone();
    Tensor out = decode(q, st, at::tensor({5}, at::kLong), 1.0 / 64);
    // explicit softmax attention in float32
    for (int64_t hq = 0; hq < H * G; ++hq) {
      const int64_t h = hq / G;
      Tensor vis = before.p[0][h] >= 0;
      Tensor logits = at::matmul(before.k[0][h].to(at::kFloat), q[0][hq].to(at::kFloat)) / 64;
      Tensor p = at::softmax(logits.masked_fill(~vis, -INFINITY), 0);
      Tensor want = at::matmul(p, before.v[0][h].to(at::kFloat));
      const double tol = dt == at::kFloat ? 1e-4 : 2e-2;
      WKV_CHECK(at::allclose(out[0][hq].to(at::kFloat), want, tol, tol));
    }
    for (const char* policy : kPolicies) {
      State c = st.clone();
      compress(c, 3, 1, 1, policy, 2, 1);
      WKV_CHECK(((c.p >= 0).sum(-1) == 3).all().item<bool>());
      WKV_CHECK(at::isfinite(c.v.to(at::kFloat)).all().item<bool>());
    }
  }
}

WKV_TEST(one_eligible_slot_streams) {
  // budget = sinks + recent + 1, one or four new tokens per step
  for (int64_t chunk : {1, 4})
    for (const char* policy : kPolicies) {
      const int64_t sinks = 2, recent = 3, budget = sinks + recent + 1;
      State st = empty_state(2, 2, budget + chunk, 4, at::kHalf);
      at::manual_seed(3);
      int64_t n = 0;
      for (int step = 0; step < 8; ++step) {
        Tensor pos = at::arange(n, n + chunk).repeat({2, 1});
        n += chunk;
        append(st, at::randn({2, 2, chunk, 4}).to(at::kHalf),
               at::randn({2, 2, chunk, 4}).to(at::kHalf), pos);
        accumulate_op().call(at::rand({2, 2, chunk, budget + chunk}), st.p, pos, st.s, st.n, st.l,
                             "sum");
        compress(st, budget, sinks, recent, policy, 1, 2);
        WKV_CHECK(((st.p >= 0).sum(-1) == std::min(n, budget)).all().item<bool>());
        for (int64_t p = 0; p < std::min<int64_t>(sinks, n); ++p)
          WKV_CHECK(((st.p == p).sum(-1) == 1).all().item<bool>());
        for (int64_t p = std::max<int64_t>(0, n - recent); p < n; ++p)
          WKV_CHECK(((st.p == p).sum(-1) == 1).all().item<bool>());
      }
    }
}

WKV_TEST(zero_size_tensors) {
  for (auto dims : std::vector<std::vector<int64_t>>{
           {0, 2, 5, 4}, {2, 0, 5, 4}, {2, 2, 0, 4}, {2, 2, 5, 0}}) {
    const int64_t B = dims[0], H = dims[1], C = dims[2], D = dims[3], G = H ? 2 : 1;
    State st = empty_state(B, H, C, D, at::kBFloat16);
    Tensor pos = at::full({B, 2}, C ? 0 : -1, at::kLong);
    if (C) pos.select(1, 1).fill_(1);
    append(st, at::zeros({B, H, 2, D}, at::kBFloat16), at::zeros({B, H, 2, D}, at::kBFloat16), pos);
    accumulate_op().call(at::rand({B, H * G, 2, C}), st.p, pos, st.s, st.n, st.l, "max");
    Tensor out =
        decode(at::zeros({B, H * G, D}, at::kBFloat16), st, at::full({B}, 3, at::kLong), 1.0);
    WKV_CHECK(out.size(0) == B && out.size(1) == H * G && out.size(2) == D);
    for (const char* policy : kPolicies) compress(st, 1, 0, 0, policy);
    WKV_CHECK(((st.p >= 0).sum().item<int64_t>()) == (C ? B * H : 0));
  }
  // T = 0 and Q = 0
  State st = random_state(2, 2, 5, 3, 2, at::kFloat, 1);
  const State before = st.clone();
  append(st, at::zeros({2, 2, 0, 3}), at::zeros({2, 2, 0, 3}), at::zeros({2, 0}, at::kLong));
  accumulate_op().call(at::rand({2, 4, 0, 5}), st.p, at::zeros({2, 0}, at::kLong), st.s, st.n,
                       st.l, "mean");
  WKV_CHECK(st.equals(before));
}

WKV_TEST(scalar_arguments_cannot_overflow) {
  State st = random_state(1, 2, 12, 4, 10, at::kFloat, 2);
  const State before = st.clone();
  const int64_t big = int64_t(1) << 62, max = std::numeric_limits<int64_t>::max();
  WKV_CHECK_THROWS(compress(st, 5, big, big, "weightedkv"),
                   "compress: budget must exceed sinks + recent, got budget=5");
  WKV_CHECK_THROWS(compress(st, 5, max, max, "h2o"), "compress: budget must exceed sinks + recent");
  WKV_CHECK_THROWS(compress(st, std::numeric_limits<int64_t>::min(), 0, 0, "cam"),
                   "compress: budget must exceed sinks + recent");
  WKV_CHECK(st.equals(before));
  compress(st, max, big, big - 2, "cam", max, std::numeric_limits<int64_t>::min());  // no-op
  WKV_CHECK(st.equals(before));
  compress(st, 4, 0, 3, "cam", max, -1);  // a window longer than the cache
  WKV_CHECK(((st.p >= 0).sum(-1) == 4).all().item<bool>());
  WKV_CHECK_THROWS(decode(at::zeros({1, 2, 4}), st, at::zeros({1}, at::kLong), INFINITY),
                   "decode_attention: scale must be a finite float32 number");
  WKV_CHECK_THROWS(decode(at::zeros({1, 2, 4}), st, at::zeros({1}, at::kLong), 1e300),
                   "decode_attention: scale must be a finite float32 number");
  WKV_CHECK_THROWS(compress(st, 4, 0, 0, std::string("cam\0x", 5)),
                   "compress: policy must be one of");
}

WKV_TEST(aliasing_of_written_tensors_is_rejected) {
  State st = random_state(2, 2, 6, 4, 3, at::kFloat, 3);
  const State before = st.clone();
  State alias = st;
  alias.v = st.k;
  WKV_CHECK_THROWS(compress(alias, 2, 0, 0, "weightedkv"),
                   "compress: keys and values share memory");
  alias = st;
  alias.l = st.s.view({-1}).view({2, 2, 6});
  WKV_CHECK_THROWS(accumulate_op().call(at::rand({2, 2, 1, 6}), alias.p,
                                        at::zeros({2, 1}, at::kLong), alias.s, alias.n, alias.l,
                                        "mean"),
                   "accumulate: scores and last share memory");
  alias = st;
  alias.n = at::zeros({1}).expand({2, 2, 6});
  WKV_CHECK_THROWS(decode(at::zeros({2, 2, 4}), alias, at::zeros({2}, at::kLong), 1.0),
                   "decode_attention: counts is written in place but several of its elements");
  WKV_CHECK_THROWS(append(st, st.k.slice(2, 0, 1), st.v.slice(2, 0, 1).clone(),
                          at::zeros({2, 1}, at::kLong)),
                   "append: new_keys shares memory with keys");
  WKV_CHECK(st.equals(before));
}

WKV_TEST(merge_weights_are_scaled_not_underflowed) {
  const float tiny = std::numeric_limits<float>::denorm_min();
  for (auto [a, b] : {std::pair{tiny, tiny}, {tiny, 3 * tiny}, {1e-40f, 1e-38f}, {1e-30f, 2e-30f},
                      {0.25f, 0.5f}, {1.0f, 1.0f}, {3.0f, 4.0f}, {1e38f, 2e38f}, {0.0f, tiny}}) {
    const wkv::MergeWeights w = wkv::merge_weights(a, b);
    WKV_CHECK(w.denom >= 0.5f && w.denom < 1.0f);
    WKV_CHECK(w.wj >= 0.0f && w.wr >= 0.0f && w.wj + w.wr == w.denom);
    const double frac = double(a) / (double(a) + double(b));
    WKV_CHECK(std::fabs(double(w.wj) / double(w.denom) - frac) < 1e-6);
    WKV_CHECK(std::fabs(wkv::merge_value(0.3f, 0.3f, w) - 0.3f) <= 0.3f * 2.4e-7f);  // 2 ulp
    const float big = std::numeric_limits<float>::max();
    WKV_CHECK(std::isfinite(wkv::merge_value(big, big, w)));
    WKV_CHECK(std::isfinite(wkv::merge_value(-big, 0.5f * big, w)));
  }
  // equal subnormal weights: exactly the value (merging 0.3 with 0.3 used to give 0)
  WKV_CHECK(wkv::merge_value(0.3f, 0.3f, wkv::merge_weights(tiny, tiny)) == 0.3f);
  // s in [1/2, 1): the plain formula, unscaled
  const wkv::MergeWeights w = wkv::merge_weights(0.125f, 0.5f);
  WKV_CHECK(w.wj == 0.125f && w.wr == 0.5f && w.denom == 0.625f);
  // negative weights (not probabilities) are left alone
  const wkv::MergeWeights n = wkv::merge_weights(-1.0f, 1.25f);
  WKV_CHECK(n.wj == -1.0f && n.wr == 1.25f && n.denom == 0.25f);
}

WKV_TEST(fp16_merges_at_the_top_of_the_range_stay_finite) {
  State st = empty_state(1, 3, 4, 4, at::kHalf);
  const float w[3][2] = {{1.0f, 1.0f}, {3.0f, 4.0f}, {1e-45f, 1e-45f}};
  for (int64_t h = 0; h < 3; ++h) {
    for (int64_t pos = 0; pos < 3; ++pos) {
      st.p[0][h][pos] = pos;
      st.n[0][h][pos] = 1.0f;
      st.s[0][h][pos] = pos < 2 ? w[h][pos] : 10.0f;
    }
    st.v[0][h][0] = at::tensor({65504.0f, -65504.0f, 65504.0f, 1.0f}).to(at::kHalf);
    st.v[0][h][1] = at::tensor({65504.0f, -65504.0f, 60000.0f, -65504.0f}).to(at::kHalf);
  }
  compress(st, 2, 0, 1, "weightedkv");
  for (int64_t h = 0; h < 3; ++h) {
    WKV_CHECK(st.p[0][h][0].item<int64_t>() == -1);
    Tensor v = st.v[0][h][1].to(at::kFloat);
    WKV_CHECK(at::isfinite(v).all().item<bool>());
    WKV_CHECK(v[0].item<float>() == 65504.0f && v[1].item<float>() == -65504.0f);
    WKV_CHECK(v[2].item<float>() >= 60000.0f && v[2].item<float>() <= 65504.0f);
  }
}
