// params.h: torch-free parameter structs of the ops (raw pointers + int64 element strides),
// zero-initialised (every field has a default: an unset field is a null pointer / zero, never
// garbage; the flash-attention flash.h convention).
// Provides: StatsParams (slot_pos and the statistics scores/counts/last, shared by every struct
// that reads or writes them), CacheParams (the six per-layer cache tensors), AppendParams,
// AccumulateParams, CompressParams, AttentionParams (decode_attention, block_attention).
// Shapes follow docs/design.md: keys/values [B,H,C,D]; scores/counts/last/slot_pos [B,H,C].
// Element pointers of keys/values are void*: the kernels cast them to the element type they
// were instantiated for (float, wkv::half_t, wkv::bf16_t).
#pragma once

#include <cstdint>

#include "common.h"
#include "merge.h"
#include "policy.h"

namespace wkv {

// slot_pos [B,H,C] int64 (-1 = empty slot) and the float32 statistics [B,H,C].
struct StatsParams {
  int64_t* slot_pos = nullptr; Stride3 pos_st{};
  float* scores = nullptr;     Stride3 scores_st{};
  float* counts = nullptr;     Stride3 counts_st{};
  float* last = nullptr;       Stride3 last_st{};
};

struct CacheParams : StatsParams {
  void* keys = nullptr;   Stride4 keys_st{};
  void* values = nullptr; Stride4 values_st{};
  int B = 0, H = 0, C = 0, D = 0;
};

// append: new_keys/new_values [B,H,T,D], new_pos [B,T] (-1 = padding token).
struct AppendParams {
  CacheParams cache{};
  const void* new_keys = nullptr;   Stride4 new_keys_st{};
  const void* new_values = nullptr; Stride4 new_values_st{};
  const int64_t* new_pos = nullptr; Stride2 new_pos_st{};
  int T = 0;
};

// accumulate: probs [B, H*G, Q, C] (own dtype), query_pos [B,Q].
struct AccumulateParams : StatsParams {
  const void* probs = nullptr;        Stride4 probs_st{};
  const int64_t* query_pos = nullptr; Stride2 query_pos_st{};
  int B = 0, H = 0, G = 1, Q = 0, C = 0;
  GroupReduce reduce = GroupReduce::Mean;
};

struct CompressParams {
  CacheParams cache{};
  int64_t budget = 0, sinks = 0, recent = 0;
  Policy policy = Policy::WeightedKV;
  int64_t cam_window = 1;
  int64_t seed = 0;
  int64_t head_offset = 0;  // CaM's draw uses the global KV head head_offset + h (tensor parallel)
  // weightedkv's merge rule (merge.h; the defaults are the paper's); merged [B,H,C] float32 or
  // null: the evicted tokens each slot has absorbed (added to by merges, zeroed by drops).
  MergeTarget merge_target = MergeTarget::Right;
  float merge_gate = 0.0f;
  MergeWeighting merge_weights = MergeWeighting::Average;
  float* merged = nullptr; Stride3 merged_st{};
};

// decode_attention and block_attention: query/out [B, H*G, Q, D] (decode_attention: Q = 1, its
// [B, H*G, D] query and output seen with a unit Q dimension), query_pos [B, Q], sinks [H*G]
// float32 or null. The features window / softcap / sinks are off at their zero values.
struct AttentionParams : StatsParams {
  const void* query = nullptr;        Stride4 query_st{};
  const void* keys = nullptr;         Stride4 keys_st{};
  const void* values = nullptr;       Stride4 values_st{};
  const int64_t* query_pos = nullptr; Stride2 query_pos_st{};
  void* out = nullptr;                Stride4 out_st{};
  const float* sinks = nullptr; Stride1 sinks_st{};
  float scale = 1.0f;
  float softcap = 0.0f;  // > 0: logit = softcap * tanh(logit / softcap)
  int64_t window = 0;    // > 0: slot visible only if query_pos - slot_pos < window
  int B = 0, H = 0, G = 1, Q = 1, C = 0, D = 0;
  GroupReduce reduce = GroupReduce::Mean;
};

}  // namespace wkv
