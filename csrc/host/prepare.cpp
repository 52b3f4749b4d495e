// prepare.cpp: validation + params packing for all the ops (see prepare.h).
#include "prepare.h"
#include "prepare_snap.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace wkv::host {
namespace {

bool is_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// "[B, H, C]"-style expected shape vs. actual.
void check_shape(const char* op, const char* name, const at::Tensor& t,
                 std::initializer_list<int64_t> expected, const char* layout) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(expected.size()), op, ": ", name, " must be a ",
              expected.size(), "-D tensor ", layout, ", got shape ", t.sizes());
  TORCH_CHECK(t.sizes().equals(expected), op, ": ", name, " must have shape ", layout, " = ",
              at::IntArrayRef(expected), ", got ", t.sizes());
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor ", layout,
              ", got shape ", t.sizes());
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ",
              t.scalar_type());
}

// Defined, with the expected shape and dtype.
void check_tensor(const char* op, const char* name, const at::Tensor& t,
                  std::initializer_list<int64_t> expected, const char* layout,
                  at::ScalarType want) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  check_shape(op, name, t, expected, layout);
  check_dtype(op, name, t, want);
}

void check_kv_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_kv_dtype(t.scalar_type()), op, ": ", name,
              " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_dtype_of_keys(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& keys) {
  TORCH_CHECK(t.scalar_type() == keys.scalar_type(), op, ": ", name,
              " must have the dtype of keys (", keys.scalar_type(), "), got ", t.scalar_type());
}

// GQA: Hq query heads over H KV heads.
void check_groups(const char* op, int64_t Hq, int64_t H) {
  TORCH_CHECK((H == 0 && Hq == 0) || (H > 0 && Hq % H == 0 && Hq > 0), op,
              ": the number of query heads Hq must be a positive multiple of the number of KV "
              "heads H, got Hq=", Hq, ", H=", H);
}

int groups(int64_t Hq, int64_t H) { return H > 0 ? static_cast<int>(Hq / H) : 1; }

void check_device(const char* op, const at::Tensor& ref, const char* ref_name,
                  std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  for (const auto& [name, t] : others)
    TORCH_CHECK(t->device() == ref.device(), op, ": all tensors must be on one device, but ",
                ref_name, " is on ", ref.device(), " and ", name, " is on ", t->device());
}

using Named = std::pair<const char*, const at::Tensor*>;

// True if a and b certainly share memory: the same tensor, the same first element, or (both
// dense) overlapping byte ranges. Interleaved non-dense views of one buffer are accepted.
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (a.is_same(b) || a.data_ptr() == b.data_ptr()) return true;
  const at::MemOverlapStatus s = at::get_overlap_status(a, b);
  return s == at::MemOverlapStatus::Full || s == at::MemOverlapStatus::Partial;
}

// Tensors written in place must not have self-overlapping elements (e.g. expanded, stride 0)
// nor share memory with each other or with the op's inputs: the result would depend on the
// order of the writes (a silent wrong result).
void check_no_aliasing(const char* op, std::initializer_list<Named> written,
                       std::initializer_list<Named> read) {
  const std::vector<Named> w(written);
  for (size_t i = 0; i < w.size(); ++i) {
    const at::Tensor& t = *w[i].second;
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", w[i].first,
                " is written in place but several of its elements share memory (an expanded "
                "tensor?), got shape ", t.sizes(), " and strides ", t.strides());
    for (size_t j = i + 1; j < w.size(); ++j)
      TORCH_CHECK(!shares_memory(t, *w[j].second), op, ": ", w[i].first, " and ", w[j].first,
                  " share memory, but both are written in place; pass distinct tensors");
    for (const auto& [name, r] : read)
      TORCH_CHECK(!shares_memory(t, *r), op, ": ", name, " shares memory with ", w[i].first,
                  ", which is written in place; pass distinct tensors");
  }
}

// A name must match exactly (no embedded NUL byte truncating the comparison).
bool plain_name(const std::string& name) { return name.find('\0') == std::string::npos; }
// The name for an error message, NUL bytes shown as \0 (a raw NUL would cut the message).
std::string printable(std::string name) {
  for (size_t i = name.find('\0'); i != std::string::npos; i = name.find('\0', i + 2))
    name.replace(i, 1, "\\0");
  return name;
}

void check_int32(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what, " too large: ", v);
}

Stride1 st1(const at::Tensor& t) { return {t.stride(0)}; }
Stride2 st2(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }
Stride3 st3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
Stride4 st4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Stats tensors [B, H, C] float32 + slot_pos [B, H, C] int64.
void check_stats(const char* op, int64_t B, int64_t H, int64_t C, const at::Tensor& slot_pos,
                 const at::Tensor& scores, const at::Tensor& counts, const at::Tensor& last) {
  for (const auto& [name, t] : {Named{"scores", &scores}, {"counts", &counts}, {"last", &last}})
    check_tensor(op, name, *t, {B, H, C}, "[B, H, C]", at::kFloat);
  check_tensor(op, "slot_pos", slot_pos, {B, H, C}, "[B, H, C]", at::kLong);
}

// Validates the six cache tensors; returns {B, H, C, D}.
std::array<int64_t, 4> check_cache(const char* op, const at::Tensor& keys,
                                   const at::Tensor& values, const at::Tensor& scores,
                                   const at::Tensor& counts, const at::Tensor& last,
                                   const at::Tensor& slot_pos) {
  check_rank(op, "keys", keys, 4, "[B, H, C, D]");
  check_kv_dtype(op, "keys", keys);
  const int64_t B = keys.size(0), H = keys.size(1), C = keys.size(2), D = keys.size(3);
  TORCH_CHECK(values.defined(), op, ": values is undefined");
  check_shape(op, "values", values, {B, H, C, D}, "[B, H, C, D]");
  check_dtype_of_keys(op, "values", values, keys);
  check_stats(op, B, H, C, slot_pos, scores, counts, last);
  check_device(op, keys, "keys",
               {{"values", &values}, {"scores", &scores}, {"counts", &counts}, {"last", &last},
                {"slot_pos", &slot_pos}});
  check_int32(op, "B", B);
  check_int32(op, "H", H);
  check_int32(op, "C", C);
  check_int32(op, "D", D);
  return {B, H, C, D};
}

// Pointers + strides of keys/values (CacheParams, AttentionParams).
template <class P>
void pack_kv(P& p, const at::Tensor& keys, const at::Tensor& values) {
  p.keys = keys.data_ptr();
  p.keys_st = st4(keys);
  p.values = values.data_ptr();
  p.values_st = st4(values);
}

// Pointers + strides of slot_pos and the stats (the StatsParams part of CacheParams,
// AccumulateParams, AttentionParams).
void pack_stats(StatsParams& p, const at::Tensor& slot_pos, const at::Tensor& scores,
                const at::Tensor& counts, const at::Tensor& last) {
  p.slot_pos = slot_pos.data_ptr<int64_t>();
  p.pos_st = st3(slot_pos);
  p.scores = scores.data_ptr<float>();
  p.scores_st = st3(scores);
  p.counts = counts.data_ptr<float>();
  p.counts_st = st3(counts);
  p.last = last.data_ptr<float>();
  p.last_st = st3(last);
}

CacheParams make_cache(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                       const at::Tensor& counts, const at::Tensor& last,
                       const at::Tensor& slot_pos) {
  CacheParams c;
  pack_kv(c, keys, values);
  pack_stats(c, slot_pos, scores, counts, last);
  c.B = static_cast<int>(keys.size(0));
  c.H = static_cast<int>(keys.size(1));
  c.C = static_cast<int>(keys.size(2));
  c.D = static_cast<int>(keys.size(3));
  return c;
}

// "'a', 'b', 'c'" from a names table of policy.h (the error messages list what the kernels take).
std::string quoted_names(const char* const* names, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += (i ? ", '" : "'") + std::string(names[i]) + "'";
  return out;
}

GroupReduce parse_reduce_or_throw(const char* op, c10::string_view group_reduce) {
  const std::string name(group_reduce);
  GroupReduce r;
  TORCH_CHECK(plain_name(name) && parse_group_reduce(name.c_str(), &r), op,
              ": group_reduce must be one of ", quoted_names(kGroupReduceNames, kNumGroupReduces),
              ", got '", printable(name), "'");
  return r;
}

// append, compress: the six cache tensors are all written in place.
void check_cache_no_aliasing(const char* op, const at::Tensor& keys, const at::Tensor& values,
                             const at::Tensor& scores, const at::Tensor& counts,
                             const at::Tensor& last, const at::Tensor& slot_pos,
                             std::initializer_list<Named> read) {
  check_no_aliasing(op,
                    {{"keys", &keys}, {"values", &values}, {"scores", &scores},
                     {"counts", &counts}, {"last", &last}, {"slot_pos", &slot_pos}},
                    read);
}

}  // namespace

AppendParams prepare_append(const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& scores, const at::Tensor& counts,
                            const at::Tensor& last, const at::Tensor& slot_pos,
                            const at::Tensor& new_keys, const at::Tensor& new_values,
                            const at::Tensor& new_pos) {
  const char* op = "append";
  const auto [B, H, C, D] = check_cache(op, keys, values, scores, counts, last, slot_pos);
  check_rank(op, "new_keys", new_keys, 4, "[B, H, T, D]");
  const int64_t T = new_keys.size(2);
  check_shape(op, "new_keys", new_keys, {B, H, T, D}, "[B, H, T, D]");
  TORCH_CHECK(new_values.defined(), op, ": new_values is undefined");
  check_shape(op, "new_values", new_values, {B, H, T, D}, "[B, H, T, D]");
  check_dtype_of_keys(op, "new_keys", new_keys, keys);
  check_dtype_of_keys(op, "new_values", new_values, keys);
  check_tensor(op, "new_pos", new_pos, {B, T}, "[B, T]", at::kLong);
  check_device(op, keys, "keys",
               {{"new_keys", &new_keys}, {"new_values", &new_values}, {"new_pos", &new_pos}});
  check_int32(op, "T", T);
  check_cache_no_aliasing(
      op, keys, values, scores, counts, last, slot_pos,
      {{"new_keys", &new_keys}, {"new_values", &new_values}, {"new_pos", &new_pos}});

  AppendParams p;
  p.cache = make_cache(keys, values, scores, counts, last, slot_pos);
  p.new_keys = new_keys.data_ptr();
  p.new_keys_st = st4(new_keys);
  p.new_values = new_values.data_ptr();
  p.new_values_st = st4(new_values);
  p.new_pos = new_pos.data_ptr<int64_t>();
  p.new_pos_st = st2(new_pos);
  p.T = static_cast<int>(T);
  return p;
}

AccumulateParams prepare_accumulate(const at::Tensor& probs, const at::Tensor& slot_pos,
                                    const at::Tensor& query_pos, const at::Tensor& scores,
                                    const at::Tensor& counts, const at::Tensor& last,
                                    c10::string_view group_reduce) {
  const char* op = "accumulate";
  check_rank(op, "probs", probs, 4, "[B, Hq, Q, C]");
  check_kv_dtype(op, "probs", probs);
  check_rank(op, "slot_pos", slot_pos, 3, "[B, H, C]");
  const int64_t B = slot_pos.size(0), H = slot_pos.size(1), C = slot_pos.size(2);
  const int64_t Hq = probs.size(1), Q = probs.size(2);
  TORCH_CHECK(probs.size(0) == B && probs.size(3) == C, op,
              ": probs must have shape [B, Hq, Q, C] with B = ", B, " and C = ", C,
              " (from slot_pos), got ", probs.sizes());
  check_groups(op, Hq, H);
  check_stats(op, B, H, C, slot_pos, scores, counts, last);
  check_tensor(op, "query_pos", query_pos, {B, Q}, "[B, Q]", at::kLong);
  check_device(op, probs, "probs",
               {{"slot_pos", &slot_pos}, {"query_pos", &query_pos}, {"scores", &scores},
                {"counts", &counts}, {"last", &last}});
  for (int64_t v : {B, H, C, Q, Hq}) check_int32(op, "a dimension", v);
  check_no_aliasing(op, {{"scores", &scores}, {"counts", &counts}, {"last", &last}},
                    {{"probs", &probs}, {"slot_pos", &slot_pos}, {"query_pos", &query_pos}});

  AccumulateParams p;
  p.reduce = parse_reduce_or_throw(op, group_reduce);
  p.probs = probs.data_ptr();
  p.probs_st = st4(probs);
  pack_stats(p, slot_pos, scores, counts, last);
  p.query_pos = query_pos.data_ptr<int64_t>();
  p.query_pos_st = st2(query_pos);
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.G = groups(Hq, H);
  p.Q = static_cast<int>(Q);
  p.C = static_cast<int>(C);
  return p;
}

namespace {

// compress's merge-rule options (merge.h): names, the gate's range, the combinations, and the
// optional merged tensor [B, H, C] float32 (written in place); fills p's merge fields.
void check_merge_options(const char* op, const at::Tensor& keys, const at::Tensor& values,
                         const at::Tensor& scores, const at::Tensor& counts,
                         const at::Tensor& last, const at::Tensor& slot_pos,
                         c10::string_view target_name, double gate,
                         c10::string_view weights_name, const std::optional<at::Tensor>& merged,
                         CompressParams* p) {
  const std::string target(target_name), weights(weights_name);
  bool ok = false;
  for (int i = 0; i < kNumMergeTargets && plain_name(target); ++i)
    if (target == kMergeTargetNames[i]) { p->merge_target = static_cast<MergeTarget>(i); ok = true; }
  TORCH_CHECK(ok, op, ": merge_target must be one of ",
              quoted_names(kMergeTargetNames, kNumMergeTargets), ", got '", printable(target), "'");
  ok = false;
  for (int i = 0; i < kNumMergeWeightings && plain_name(weights); ++i)
    if (weights == kMergeWeightingNames[i]) {
      p->merge_weights = static_cast<MergeWeighting>(i);
      ok = true;
    }
  TORCH_CHECK(ok, op, ": merge_weights must be one of ",
              quoted_names(kMergeWeightingNames, kNumMergeWeightings), ", got '",
              printable(weights), "'");
  TORCH_CHECK(gate >= 0.0 && gate <= 1.0, op, ": merge_gate must be a key cosine in [0, 1] "
              "(0 = no gate), got merge_gate=", gate);
  p->merge_gate = static_cast<float>(gate);
  const bool paper = p->merge_target == MergeTarget::Right && gate == 0.0 &&
                     p->merge_weights == MergeWeighting::Average;
  TORCH_CHECK(paper || p->policy == Policy::WeightedKV, op, ": merge_target='", target,
              "', merge_gate=", gate, ", merge_weights='", weights, "' change weightedkv's merge "
              "and apply only to policy='weightedkv', got policy='", kPolicyNames[int(p->policy)],
              "'; leave them at 'right', 0, 'average'");
  TORCH_CHECK(p->merge_weights != MergeWeighting::Mass || merged.has_value(), op,
              ": merge_weights='mass' needs the merged tensor (the evicted tokens each slot has "
              "absorbed, float32 [B, H, C], zeros for a new cache); pass merged=");
  if (!merged.has_value()) return;
  const at::Tensor& m = *merged;
  check_tensor(op, "merged", m, {keys.size(0), keys.size(1), keys.size(2)}, "[B, H, C]",
               at::kFloat);
  check_device(op, keys, "keys", {{"merged", &m}});
  check_no_aliasing(op,
                    {{"keys", &keys}, {"values", &values}, {"scores", &scores},
                     {"counts", &counts}, {"last", &last}, {"slot_pos", &slot_pos},
                     {"merged", &m}},
                    {});
  p->merged = m.data_ptr<float>();
  p->merged_st = st3(m);
}

// sinks >= 0, recent >= 0 and budget > sinks + recent (written so that huge sinks/recent cannot
// overflow int64); recent_note: what recent means to the op, for its message.
void check_budget(const char* op, int64_t budget, int64_t sinks, int64_t recent,
                  const char* recent_note) {
  TORCH_CHECK(sinks >= 0, op, ": sinks must be >= 0, got sinks=", sinks);
  TORCH_CHECK(recent >= 0, op, ": recent must be >= 0", recent_note, ", got recent=", recent);
  TORCH_CHECK(budget > sinks && budget - sinks > recent, op,
              ": budget must exceed sinks + recent, got budget=", budget, ", sinks=", sinks,
              ", recent=", recent);
}

}  // namespace

CompressParams prepare_compress(const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& scores, const at::Tensor& counts,
                                const at::Tensor& last, const at::Tensor& slot_pos,
                                int64_t budget, int64_t sinks, int64_t recent,
                                c10::string_view policy_name, int64_t cam_window, int64_t seed,
                                int64_t head_offset, c10::string_view merge_target,
                                double merge_gate, c10::string_view merge_weights,
                                const std::optional<at::Tensor>& merged) {
  const char* op = "compress";
  const int64_t H = check_cache(op, keys, values, scores, counts, last, slot_pos)[1];
  check_budget(op, budget, sinks, recent, "");
  TORCH_CHECK(cam_window >= 1, op, ": cam_window must be >= 1, got cam_window=", cam_window);
  TORCH_CHECK(head_offset >= 0, op, ": head_offset must be >= 0 (the global index of this "
              "shard's first KV head), got head_offset=", head_offset);
  TORCH_CHECK(head_offset <= std::numeric_limits<int64_t>::max() - H, op,
              ": head_offset + H must fit in int64, got head_offset=", head_offset);
  CompressParams p;
  const std::string policy(policy_name);
  TORCH_CHECK(plain_name(policy) && parse_policy(policy.c_str(), &p.policy), op,
              ": policy must be one of ", quoted_names(kPolicyNames, kNumPolicies), ", got '",
              printable(policy), "'");
  check_merge_options(op, keys, values, scores, counts, last, slot_pos, merge_target, merge_gate,
                      merge_weights, merged, &p);
  check_cache_no_aliasing(op, keys, values, scores, counts, last, slot_pos, {});
  p.cache = make_cache(keys, values, scores, counts, last, slot_pos);
  p.budget = budget;
  p.sinks = sinks;
  p.recent = recent;
  p.cam_window = cam_window;
  p.seed = seed;
  p.head_offset = head_offset;
  return p;
}

namespace {

// The part of decode_attention and block_attention after the op-specific checks of query,
// query_pos and out's shape: groups, scale, window, softcap, sinks, out's dtype, devices,
// aliasing, then the params. query4 / query_pos2 / out4 are [B, Hq, Q, D] / [B, Q] views.
AttentionParams prepare_attention(const char* op, const at::Tensor& query4,
                                  const at::Tensor& keys, const at::Tensor& values,
                                  const at::Tensor& slot_pos, const at::Tensor& query_pos2,
                                  const at::Tensor& scores, const at::Tensor& counts,
                                  const at::Tensor& last, double scale,
                                  c10::string_view group_reduce, int64_t window, double softcap,
                                  const std::optional<at::Tensor>& sinks, const at::Tensor& out4) {
  const int64_t Hq = query4.size(1), H = keys.size(1);
  check_dtype_of_keys(op, "query", query4, keys);
  check_groups(op, Hq, H);
  check_int32(op, "Hq", Hq);
  check_int32(op, "Q", query4.size(2));
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), op,
              ": scale must be a finite float32 number, got scale=", scale);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no sliding window), got window=",
              window);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(static_cast<float>(softcap)), op,
              ": softcap must be a finite float32 number >= 0 (0 = no soft-capping), got "
              "softcap=", softcap);
  const at::Tensor no_sinks;
  const at::Tensor& sk = sinks.has_value() ? *sinks : no_sinks;
  if (sk.defined())
    check_tensor(op, "sinks", sk, {Hq}, "[Hq] (one logit per query head)", at::kFloat);
  TORCH_CHECK(out4.scalar_type() == query4.scalar_type(), op,
              ": out must have the dtype of query (", query4.scalar_type(), "), got ",
              out4.scalar_type());
  check_device(op, keys, "keys",
               {{"query", &query4}, {"query_pos", &query_pos2}, {"out", &out4}});
  if (sk.defined()) check_device(op, keys, "keys", {{"sinks", &sk}});
  check_no_aliasing(op, {{"scores", &scores}, {"counts", &counts}, {"last", &last},
                         {"out", &out4}},
                    {{"query", &query4}, {"keys", &keys}, {"values", &values},
                     {"slot_pos", &slot_pos}, {"query_pos", &query_pos2}, {"sinks", &sk}});

  AttentionParams p;
  p.reduce = parse_reduce_or_throw(op, group_reduce);
  p.query = query4.data_ptr();
  p.query_st = st4(query4);
  pack_kv(p, keys, values);
  pack_stats(p, slot_pos, scores, counts, last);
  p.query_pos = query_pos2.data_ptr<int64_t>();
  p.query_pos_st = st2(query_pos2);
  p.out = out4.data_ptr();
  p.out_st = st4(out4);
  if (sk.defined()) {
    p.sinks = sk.data_ptr<float>();
    p.sinks_st = st1(sk);
  }
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window = window;
  p.B = static_cast<int>(keys.size(0));
  p.H = static_cast<int>(H);
  p.G = groups(Hq, H);
  p.Q = static_cast<int>(query4.size(2));
  p.C = static_cast<int>(keys.size(2));
  p.D = static_cast<int>(keys.size(3));
  return p;
}

}  // namespace

AttentionParams prepare_decode(const at::Tensor& query, const at::Tensor& keys,
                               const at::Tensor& values, const at::Tensor& slot_pos,
                               const at::Tensor& query_pos, const at::Tensor& scores,
                               const at::Tensor& counts, const at::Tensor& last, double scale,
                               c10::string_view group_reduce, int64_t window, double softcap,
                               const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  const char* op = "decode_attention";
  const auto [B, H, C, D] = check_cache(op, keys, values, scores, counts, last, slot_pos);
  check_rank(op, "query", query, 3, "[B, Hq, D]");
  const int64_t Hq = query.size(1);
  TORCH_CHECK(query.size(0) == B && query.size(2) == D, op,
              ": query must have shape [B, Hq, D] with B = ", B, " and D = ", D,
              " (from keys), got ", query.sizes());
  check_dtype_of_keys(op, "query", query, keys);
  check_tensor(op, "query_pos", query_pos, {B}, "[B]", at::kLong);
  TORCH_CHECK(out.defined(), op, ": out is undefined");
  check_shape(op, "out", out, {B, Hq, D}, "[B, Hq, D] (the shape of query)");
  // the Q = 1 views (no copies)
  return prepare_attention(op, query.unsqueeze(2), keys, values, slot_pos, query_pos.unsqueeze(1),
                           scores, counts, last, scale, group_reduce, window, softcap, sinks,
                           out.unsqueeze(2));
}

AttentionParams prepare_block(const at::Tensor& query, const at::Tensor& keys,
                              const at::Tensor& values, const at::Tensor& slot_pos,
                              const at::Tensor& query_pos, const at::Tensor& scores,
                              const at::Tensor& counts, const at::Tensor& last, double scale,
                              c10::string_view group_reduce, int64_t window, double softcap,
                              const std::optional<at::Tensor>& sinks, const at::Tensor& out) {
  const char* op = "block_attention";
  const auto [B, H, C, D] = check_cache(op, keys, values, scores, counts, last, slot_pos);
  check_rank(op, "query", query, 4, "[B, Hq, Q, D]");
  const int64_t Hq = query.size(1), Q = query.size(2);
  TORCH_CHECK(query.size(0) == B && query.size(3) == D, op,
              ": query must have shape [B, Hq, Q, D] with B = ", B, " and D = ", D,
              " (from keys), got ", query.sizes());
  check_dtype_of_keys(op, "query", query, keys);
  check_tensor(op, "query_pos", query_pos, {B, Q}, "[B, Q]", at::kLong);
  TORCH_CHECK(out.defined(), op, ": out is undefined");
  check_shape(op, "out", out, {B, Hq, Q, D}, "[B, Hq, Q, D] (the shape of query)");
  return prepare_attention(op, query, keys, values, slot_pos, query_pos, scores, counts, last,
                           scale, group_reduce, window, softcap, sinks, out);
}

// snap_compress (prepare_snap.h): the compress checks of the cache and the budget, plus pool and
// the caller-allocated kept [B, H, C] int64.
SnapParams prepare_snap(const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& scores, const at::Tensor& counts,
                        const at::Tensor& last, const at::Tensor& slot_pos, int64_t budget,
                        int64_t sinks, int64_t recent, int64_t pool, bool merge,
                        const at::Tensor& kept) {
  const char* op = "snap_compress";
  const auto [B, H, C, D] = check_cache(op, keys, values, scores, counts, last, slot_pos);
  (void)D;
  check_budget(op, budget, sinks, recent, " (the observation window kept)");
  TORCH_CHECK(pool >= 1 && pool % 2 == 1, op,
              ": pool must be an odd int >= 1 (the pooling kernel, centred; 1 = no pooling), "
              "got pool=", pool);
  check_tensor(op, "kept", kept, {B, H, C}, "[B, H, C]", at::kLong);
  check_device(op, keys, "keys", {{"kept", &kept}});
  check_no_aliasing(op,
                    {{"keys", &keys}, {"values", &values}, {"scores", &scores},
                     {"counts", &counts}, {"last", &last}, {"slot_pos", &slot_pos},
                     {"kept", &kept}},
                    {});
  SnapParams p;
  p.cache = make_cache(keys, values, scores, counts, last, slot_pos);
  p.budget = budget;
  p.sinks = sinks;
  p.recent = recent;
  p.pool = pool;
  p.merge = merge;
  p.kept = kept.data_ptr<int64_t>();
  p.kept_st = st3(kept);
  return p;
}

}  // namespace wkv::host
