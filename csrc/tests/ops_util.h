// ops_util.h: shared helpers of the C++ op tests: the four ops through the dispatcher
// (torch::ops weightedkv::*), the cache State (six tensors), empty/random/strided states.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <utility>

namespace wkv_test {

using at::Tensor;


using TR = const Tensor&;
using SV = c10::string_view;

struct State {
  Tensor k, v, s, n, l, p;  // keys, values, scores, counts, last, slot_pos
  State clone() const { return {k.clone(), v.clone(), s.clone(), n.clone(), l.clone(), p.clone()}; }
  bool equals(const State& o) const {
    return at::equal(k, o.k) && at::equal(v, o.v) && at::equal(s, o.s) && at::equal(n, o.n) &&
           at::equal(l, o.l) && at::equal(p, o.p);
  }
};

inline c10::TypedOperatorHandle<void(TR, TR, TR, TR, TR, TR, TR, TR, TR)>& append_op() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("weightedkv::append", "")
                      .typed<void(TR, TR, TR, TR, TR, TR, TR, TR, TR)>();
  return h;
}
inline c10::TypedOperatorHandle<void(TR, TR, TR, TR, TR, TR, SV)>& accumulate_op() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("weightedkv::accumulate", "")
                      .typed<void(TR, TR, TR, TR, TR, TR, SV)>();
  return h;
}
using CompressSig = void(TR, TR, TR, TR, TR, TR, int64_t, int64_t, int64_t, SV, int64_t,
                         int64_t, int64_t, SV, double, SV, const std::optional<Tensor>&);
inline c10::TypedOperatorHandle<CompressSig>& compress_op() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("weightedkv::compress", "")
                      .typed<CompressSig>();
  return h;
}
using OptT = const std::optional<Tensor>&;
using DecodeSig = void(TR, TR, TR, TR, TR, TR, TR, TR, double, SV, int64_t, double, OptT, TR);
inline c10::TypedOperatorHandle<DecodeSig>& decode_op() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("weightedkv::decode_attention", "")
                      .typed<DecodeSig>();
  return h;
}

inline void append(State& st, TR nk, TR nv, TR npos) {
  append_op().call(st.k, st.v, st.s, st.n, st.l, st.p, nk, nv, npos);
}
inline void compress(State& st, int64_t budget, int64_t sinks, int64_t recent,
                     const std::string& policy, int64_t cam_window = 16, int64_t seed = 0) {
  compress_op().call(st.k, st.v, st.s, st.n, st.l, st.p, budget, sinks, recent, policy,
                     cam_window, seed, /*head_offset=*/0, "right", 0.0, "average", std::nullopt);
}
inline Tensor decode(TR q, State& st, TR qpos, double scale,
                     const std::string& reduce = "mean") {
  Tensor out = at::empty_like(q);
  decode_op().call(q, st.k, st.v, st.p, qpos, st.s, st.n, st.l, scale, reduce, /*window=*/0,
                   /*softcap=*/0.0, std::nullopt, out);
  return out;
}

inline const char* const kPolicies[] = {"weightedkv", "evict", "h2o", "tova", "streaming", "cam"};

inline State empty_state(int64_t B, int64_t H, int64_t C, int64_t D, at::ScalarType dt) {
  auto f = at::TensorOptions().dtype(dt);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  return {at::zeros({B, H, C, D}, f), at::zeros({B, H, C, D}, f), at::zeros({B, H, C}, f32),
          at::zeros({B, H, C}, f32), at::zeros({B, H, C}, f32),
          at::full({B, H, C}, -1, at::TensorOptions().dtype(at::kLong))};
}

// Random cache: `held` tokens per (b, h) at shuffled slots, positions 0..held-1, random stats
// (about a quarter of the counts zero, some exact ties).
inline State random_state(int64_t B, int64_t H, int64_t C, int64_t D, int64_t held,
                          at::ScalarType dt, uint64_t seed) {
  at::manual_seed(seed);
  State st = empty_state(B, H, C, D, dt);
  st.k.copy_(at::randn({B, H, C, D}));
  st.v.copy_(at::randn({B, H, C, D}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      Tensor slots = at::randperm(C).slice(0, 0, held);
      st.p[b][h].index_put_({slots}, at::arange(held));
    }
  st.n.copy_(at::randint(0, 4, {B, H, C}).to(at::kFloat));
  st.s.copy_(at::floor(at::rand({B, H, C}) * 8) / 8 * st.n);  // coarse values: ties happen
  st.l.copy_(at::floor(at::rand({B, H, C}) * 4) / 4);
  Tensor empty = st.p < 0;
  st.s.masked_fill_(empty, 0);
  st.n.masked_fill_(empty, 0);
  st.l.masked_fill_(empty, 0);
  return st;
}

// The same data in non-contiguous layouts (permuted storage, padded rows).
inline State strided_copy(const State& st) {
  const int64_t B = st.k.size(0), H = st.k.size(1), C = st.k.size(2), D = st.k.size(3);
  auto kv = [&](const Tensor& t) {
    Tensor big = at::empty({C, B, H, D + 3}, t.options());
    Tensor view = big.slice(3, 1, D + 1).permute({1, 2, 0, 3});
    view.copy_(t);
    return view;
  };
  auto stat = [&](const Tensor& t) {
    Tensor big = at::empty({H, C, 2 * B}, t.options());
    Tensor view = big.slice(2, 0, 2 * B, 2).permute({2, 0, 1});
    view.copy_(t);
    return view;
  };
  return {kv(st.k), kv(st.v), stat(st.s), stat(st.n), stat(st.l), stat(st.p)};
}


}  // namespace wkv_test
