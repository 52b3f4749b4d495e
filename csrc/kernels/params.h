// params.h: torch-free parameter structs of the four ops (raw pointers + int64 element strides).
// Provides: CacheParams (the six per-layer cache tensors), AppendParams, AccumulateParams,
// CompressParams, AttentionParams (decode_attention, block_attention). Shapes follow docs/design.md: keys/values [B,H,C,D];
// scores/counts/last/slot_pos [B,H,C]. Element pointers of keys/values are void*: the kernels
// cast them to the element type they were instantiated for (float, wkv::half_t, wkv::bf16_t).
#pragma once

#include <cstdint>

#include "common.h"
#include "policy.h"

namespace wkv {

struct CacheParams {
  void* keys;      Stride4 keys_st;
  void* values;    Stride4 values_st;
  float* scores;   Stride3 scores_st;
  float* counts;   Stride3 counts_st;
  float* last;     Stride3 last_st;
  int64_t* slot_pos; Stride3 pos_st;
  int B, H, C, D;
};

// append: new_keys/new_values [B,H,T,D], new_pos [B,T] (-1 = padding token).
struct AppendParams {
  CacheParams cache;
  const void* new_keys;   Stride4 new_keys_st;
  const void* new_values; Stride4 new_values_st;
  const int64_t* new_pos; Stride2 new_pos_st;
  int T;
};

// accumulate: probs [B, H*G, Q, C] (own dtype), query_pos [B,Q].
struct AccumulateParams {
  const void* probs;        Stride4 probs_st;
  const int64_t* slot_pos;  Stride3 pos_st;
  const int64_t* query_pos; Stride2 query_pos_st;
  float* scores; Stride3 scores_st;
  float* counts; Stride3 counts_st;
  float* last;   Stride3 last_st;
  int B, H, G, Q, C;
  GroupReduce reduce;
};

struct CompressParams {
  CacheParams cache;
  int64_t budget, sinks, recent;
  Policy policy;
  int64_t cam_window;
  int64_t seed;
  int64_t head_offset;  // CaM's draw uses the global KV head head_offset + h (tensor parallel)
};

// decode_attention and block_attention: query/out [B, H*G, Q, D] (decode_attention: Q = 1, its
// [B, H*G, D] query and output seen with a unit Q dimension), query_pos [B, Q], sinks [H*G]
// float32 or null. The features window / softcap / sinks are off at their zero values.
struct AttentionParams {
  const void* query = nullptr;        Stride4 query_st{};
  const void* keys = nullptr;         Stride4 keys_st{};
  const void* values = nullptr;       Stride4 values_st{};
  const int64_t* slot_pos = nullptr;  Stride3 pos_st{};
  const int64_t* query_pos = nullptr; Stride2 query_pos_st{};
  float* scores = nullptr; Stride3 scores_st{};
  float* counts = nullptr; Stride3 counts_st{};
  float* last = nullptr;   Stride3 last_st{};
  void* out = nullptr;     Stride4 out_st{};
  const float* sinks = nullptr; Stride1 sinks_st{};
  float scale = 1.0f;
  float softcap = 0.0f;  // > 0: logit = softcap * tanh(logit / softcap)
  int64_t window = 0;    // > 0: slot visible only if query_pos - slot_pos < window
  int B = 0, H = 0, G = 1, Q = 1, C = 0, D = 0;
  GroupReduce reduce = GroupReduce::Mean;
};

}  // namespace wkv
