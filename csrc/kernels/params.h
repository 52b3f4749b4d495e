// params.h: torch-free parameter structs of the four ops (raw pointers + int64 element strides).
// Provides: CacheParams (the six per-layer cache tensors), AppendParams, AccumulateParams,
// CompressParams, DecodeParams. Shapes follow docs/design.md: keys/values [B,H,C,D];
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
};

// decode_attention: query/out [B, H*G, D], query_pos [B].
struct DecodeParams {
  const void* query;        Stride3 query_st;
  const void* keys;         Stride4 keys_st;
  const void* values;       Stride4 values_st;
  const int64_t* slot_pos;  Stride3 pos_st;
  const int64_t* query_pos; Stride1 query_pos_st;
  float* scores; Stride3 scores_st;
  float* counts; Stride3 counts_st;
  float* last;   Stride3 last_st;
  void* out;     Stride3 out_st;
  float scale;
  int B, H, G, C, D;
  GroupReduce reduce;
};

}  // namespace wkv
