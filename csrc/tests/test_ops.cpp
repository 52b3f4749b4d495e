// test_ops.cpp: the four ops through the dispatcher (torch::ops weightedkv::*) on at:: tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "harness.h"
#include "ops_util.h"

using namespace wkv_test;  // NOLINT: State, the op wrappers, random_state, ...

WKV_TEST(fig3_weightedkv_merge_into_right_neighbour) {
  // 5 held tokens with one-hot values, stored in reversed slot order; budget 4 removes the
  // lowest average (position 1, avg 0.1) and merges it into position 2 (avg 0.5).
  const int64_t C = 6, D = 6;
  State st = empty_state(1, 1, C, D, at::kFloat);
  const float avg[5] = {0.9f, 0.1f, 0.5f, 0.3f, 0.8f};
  for (int64_t pos = 0; pos < 5; ++pos) {
    const int64_t slot = 4 - pos;
    st.v[0][0][slot][pos] = 1.0f;
    st.k[0][0][slot][pos] = 1.0f;
    st.p[0][0][slot] = pos;
    st.s[0][0][slot] = 2 * avg[pos];
    st.n[0][0][slot] = 2.0f;
  }
  const State before = st.clone();
  compress(st, 4, 0, 0, "weightedkv");
  WKV_CHECK(st.p[0][0][3].item<int64_t>() == -1);
  WKV_CHECK(st.s[0][0][3].item<float>() == 0 && st.n[0][0][3].item<float>() == 0);
  const float a = 0.2f / 2.0f, b = 1.0f / 2.0f;  // avg as the kernel computes it
  Tensor expect = at::zeros({D});
  expect[1] = (a * 1.0f + b * 0.0f) / (a + b);
  expect[2] = (a * 0.0f + b * 1.0f) / (a + b);
  WKV_CHECK(at::equal(st.v[0][0][2], expect));
  // r keeps key and statistics, other slots untouched
  WKV_CHECK(at::equal(st.k, before.k) && at::equal(st.s[0][0][2], before.s[0][0][2]));
  for (int64_t slot : {0, 1, 4}) WKV_CHECK(at::equal(st.v[0][0][slot], before.v[0][0][slot]));
  // next step: position 3 (avg 0.3) merges into position 4
  compress(st, 3, 0, 0, "weightedkv");
  WKV_CHECK(st.p[0][0][1].item<int64_t>() == -1 && st.p[0][0][0].item<int64_t>() == 4);
}

WKV_TEST(k_removals_equal_k_single_removals) {
  for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16})
    for (const char* policy : kPolicies)
      for (auto [sinks, recent] : {std::pair<int64_t, int64_t>{2, 3}, {0, 0}, {1, 0}}) {
        const State st = random_state(2, 3, 40, 7, 37, dt, 11);
        State once = st.clone(), steps = st.clone();
        compress(once, 15, sinks, recent, policy, 4, 5);
        for (int64_t budget = 36; budget >= 15; --budget)
          compress(steps, budget, sinks, recent, policy, 4, 5);
        WKV_CHECK(once.equals(steps));
        WKV_CHECK(((once.p >= 0).sum(-1) == 15).all().item<bool>());
        // sinks / recent never removed
        for (int64_t pos = 0; pos < sinks; ++pos) WKV_CHECK(((once.p == pos).sum(-1) == 1).all().item<bool>());
        for (int64_t pos = 37 - recent; pos < 37; ++pos)
          WKV_CHECK(((once.p == pos).sum(-1) == 1).all().item<bool>());
        // a budget at or above L changes nothing
        State same = st.clone();
        compress(same, 37, sinks, recent, policy);
        WKV_CHECK(same.equals(st));
      }
}

WKV_TEST(ties_go_to_the_lowest_position) {
  for (const char* policy : {"weightedkv", "evict", "h2o", "tova", "streaming"}) {
    State st = empty_state(1, 1, 8, 2, at::kFloat);
    const int64_t slot_of_pos[6] = {5, 2, 7, 0, 3, 1};
    for (int64_t pos = 0; pos < 6; ++pos) {
      st.p[0][0][slot_of_pos[pos]] = pos;
      st.s[0][0][slot_of_pos[pos]] = 1.0f;
      st.n[0][0][slot_of_pos[pos]] = 2.0f;
      st.l[0][0][slot_of_pos[pos]] = 0.25f;
    }
    compress(st, 4, 1, 1, policy);
    Tensor held = std::get<0>(at::sort(st.p[0][0].masked_select(st.p[0][0] >= 0)));
    WKV_CHECK(at::equal(held, at::tensor({0, 3, 4, 5}, at::kLong)));
  }
}

WKV_TEST(strided_inputs_match_contiguous) {
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    const int64_t B = 2, H = 2, G = 3, C = 24, D = 9, T = 5;
    State a = random_state(B, H, C, D, 17, dt, 3), b = strided_copy(a);
    WKV_CHECK(!b.k.is_contiguous() && !b.s.is_contiguous());
    Tensor nk = at::randn({B, H, T, D}).to(dt), nv = at::randn({B, H, T, D}).to(dt);
    Tensor npos = at::arange(17, 17 + T).repeat({B, 1});
    npos[1][0] = -1;
    append(a, nk, nv, npos);
    append(b, nk.transpose(0, 1).contiguous().transpose(0, 1), nv, npos);
    Tensor probs = at::rand({B, H * G, T, C}).softmax(-1);
    accumulate_op().call(probs, a.p, npos, a.s, a.n, a.l, "sum");
    accumulate_op().call(probs.transpose(2, 3).contiguous().transpose(2, 3), b.p, npos, b.s, b.n,
                         b.l, "sum");
    Tensor q = at::randn({B, H * G, D}).to(dt), qpos = at::tensor({21, 20}, at::kLong);
    Tensor oa = decode(q, a, qpos, 0.3, "max");
    Tensor ob = decode(q.transpose(0, 1).contiguous().transpose(0, 1), b, qpos, 0.3, "max");
    WKV_CHECK(at::equal(oa, ob));
    for (const char* policy : kPolicies) {
      State ca = a.clone(), cb = strided_copy(b);
      compress(ca, 10, 2, 2, policy, 3, 9);
      compress(cb, 10, 2, 2, policy, 3, 9);
      WKV_CHECK(ca.equals(cb));
    }
    WKV_CHECK(a.equals(b));
  }
}

WKV_TEST(results_independent_of_thread_count) {
  const int threads = at::get_num_threads();
  auto run = [](int n) {
    at::set_num_threads(n);
    State st = random_state(3, 4, 64, 16, 60, at::kHalf, 5);
    Tensor q = at::randn({3, 8, 16}).to(at::kHalf);
    Tensor out = decode(q, st, at::tensor({70, 59, -1}, at::kLong), 0.25);
    compress(st, 20, 4, 4, "weightedkv");
    return std::make_pair(out, st);
  };
  auto [o1, s1] = run(1);
  auto [o2, s2] = run(std::max(2, threads));
  at::set_num_threads(threads);
  WKV_CHECK(at::equal(o1, o2) && s1.equals(s2));
}

WKV_TEST(decode_attention_matches_explicit_softmax) {
  const int64_t B = 3, H = 2, G = 2, C = 13, D = 11;
  State st = random_state(B, H, C, D, 10, at::kFloat, 8);
  State acc = st.clone();
  Tensor q = at::randn({B, H * G, D});
  Tensor qpos = at::tensor({9, 4, -1}, at::kLong);
  const double scale = 0.3;
  Tensor out = decode(q, st, qpos, scale);
  // explicit: masked softmax of scale * K q per (b, hq), then accumulate the probabilities
  Tensor probs = at::zeros({B, H * G, 1, C});
  Tensor expect = at::zeros({B, H * G, D});
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t hq = 0; hq < H * G; ++hq) {
      const int64_t h = hq / G;
      Tensor vis = (acc.p[b][h] >= 0) & (acc.p[b][h] <= qpos[b]);
      Tensor logits = at::matmul(acc.k[b][h], q[b][hq]) * scale;
      Tensor p = at::softmax(logits.masked_fill(~vis, -INFINITY), 0);
      probs[b][hq][0] = p;
      expect[b][hq] = at::matmul(p, acc.v[b][h]);
    }
  WKV_CHECK(at::allclose(out, expect, 1e-5, 1e-6));
  WKV_CHECK(at::equal(out[2], at::zeros({H * G, D})));
  accumulate_op().call(probs, acc.p, qpos.unsqueeze(1), acc.s, acc.n, acc.l, "mean");
  WKV_CHECK(at::allclose(st.s, acc.s, 1e-5, 1e-6) && at::equal(st.n, acc.n));
  WKV_CHECK(at::allclose(st.l, acc.l, 1e-5, 1e-6) && at::equal(st.p, acc.p));
}

WKV_TEST(accumulate_padding_and_visibility) {
  State st = empty_state(1, 1, 4, 1, at::kFloat);
  st.p[0][0] = at::tensor({0, 3, -1, 1}, at::kLong);
  st.l.fill_(7.0f);
  Tensor probs = at::full({1, 2, 3, 4}, 0.25f);
  probs[0][1].fill_(0.75f);  // mean over the 2 heads of the group = 0.5
  Tensor qpos = at::tensor({2, 1, -1}, at::kLong).reshape({1, 3});
  accumulate_op().call(probs, st.p, qpos, st.s, st.n, st.l, "mean");
  WKV_CHECK(at::equal(st.s[0][0], at::tensor({1.0f, 0.0f, 0.0f, 1.0f})));
  WKV_CHECK(at::equal(st.n[0][0], at::tensor({2.0f, 0.0f, 0.0f, 2.0f})));
  // q* = query 1 (pos 1): sees positions 0 and 1; position 3 gets 0; the empty slot is untouched
  WKV_CHECK(at::equal(st.l[0][0], at::tensor({0.5f, 0.0f, 7.0f, 0.5f})));
  // no valid query: nothing changes
  State before = st.clone();
  accumulate_op().call(probs, st.p, at::full({1, 3}, -1, at::kLong), st.s, st.n, st.l, "max");
  WKV_CHECK(st.equals(before));
}

WKV_TEST(append_fills_free_slots_in_order) {
  State st = empty_state(1, 2, 5, 2, at::kFloat);
  st.p[0][0] = at::tensor({-1, 0, -1, -1, 1}, at::kLong);
  st.p[0][1] = at::tensor({-1, -1, -1, -1, 5}, at::kLong);
  st.s.fill_(3.0f);
  Tensor nk = at::arange(12, at::kFloat).reshape({1, 2, 3, 2});
  Tensor npos = at::tensor({-1, 2, 3}, at::kLong).reshape({1, 3});
  append(st, nk, nk * 2, npos);
  WKV_CHECK(at::equal(st.p[0][0], at::tensor({2, 0, 3, -1, 1}, at::kLong)));
  WKV_CHECK(at::equal(st.k[0][0][2], nk[0][0][2]) && at::equal(st.v[0][1][1], 2 * nk[0][1][2]));
  WKV_CHECK(st.s[0][0][0].item<float>() == 0 && st.s[0][0][3].item<float>() == 3);
  // not enough free slots in head 0: error, cache untouched
  const State before = st.clone();
  WKV_CHECK_THROWS(append(st, nk, nk, at::tensor({4, 5, 6}, at::kLong).reshape({1, 3})),
                   "append: not enough free slots in batch row 0, head 0");
  WKV_CHECK(st.equals(before));
}

WKV_TEST(validation_messages) {
  State st = empty_state(1, 2, 8, 4, at::kFloat);
  WKV_CHECK_THROWS(compress(st, 8, 4, 4, "weightedkv"),
                   "compress: budget must exceed sinks + recent, got budget=8, sinks=4, recent=4");
  WKV_CHECK_THROWS(compress(st, 8, -1, 4, "weightedkv"), "compress: sinks must be >= 0");
  WKV_CHECK_THROWS(compress(st, 8, 1, 1, "lru"), "compress: policy must be one of");
  WKV_CHECK_THROWS(compress(st, 8, 1, 1, "cam", 0), "cam_window must be >= 1, got cam_window=0");
  State bad = st.clone();
  bad.s = bad.s.to(at::kDouble);
  WKV_CHECK_THROWS(compress(bad, 6, 1, 1, "h2o"), "compress: scores must have dtype Float");
  bad = st.clone();
  bad.p = bad.p.to(at::kInt);
  WKV_CHECK_THROWS(compress(bad, 6, 1, 1, "h2o"), "compress: slot_pos must have dtype Long");
  bad = st.clone();
  bad.v = bad.v.to(at::kHalf);
  WKV_CHECK_THROWS(compress(bad, 6, 1, 1, "h2o"), "compress: values must have the dtype of keys");
  bad = st.clone();
  bad.n = at::zeros({1, 2, 7});
  WKV_CHECK_THROWS(compress(bad, 6, 1, 1, "h2o"), "compress: counts must have shape [B, H, C]");
  WKV_CHECK_THROWS(accumulate_op().call(at::zeros({1, 3, 1, 8}), st.p, at::zeros({1, 1}, at::kLong),
                                        st.s, st.n, st.l, "mean"),
                   "accumulate: the number of query heads Hq must be a positive multiple");
  WKV_CHECK_THROWS(accumulate_op().call(at::zeros({1, 4, 1, 8}), st.p, at::zeros({1, 1}, at::kLong),
                                        st.s, st.n, st.l, "median"),
                   "accumulate: group_reduce must be one of");
  WKV_CHECK_THROWS(decode(at::zeros({1, 4, 4}, at::kHalf), st, at::zeros({1}, at::kLong), 1.0),
                   "decode_attention: query must have the dtype of keys");
  WKV_CHECK_THROWS(decode(at::zeros({1, 4, 4}), st, at::zeros({1}, at::kInt), 1.0),
                   "decode_attention: query_pos must have dtype Long");
  WKV_CHECK_THROWS(append(st, at::zeros({1, 2, 3, 5}), at::zeros({1, 2, 3, 5}),
                          at::zeros({1, 3}, at::kLong)),
                   "append: new_keys must have shape [B, H, T, D]");
  bad = st.clone();
  bad.k = at::zeros({1, 2, 8, 4}, at::kInt);
  WKV_CHECK_THROWS(compress(bad, 6, 1, 1, "h2o"), "compress: keys must have dtype float32");
}
