// append.h: the per-(b, h) body of the append op, torch-free and usable from host or device.
// Provides: count_append(p, b, h, &free, &needed) and append_row<T>(p, b, h): tokens with
// new_pos >= 0, in increasing t, go to the free slots (slot_pos == -1) in increasing slot index;
// their statistics are zeroed. append_row assumes free >= needed (checked by the host wrapper).
#pragma once

#include <cstdint>

#include "common.h"
#include "params.h"

namespace wkv {

WKV_HOST_DEVICE inline void count_append(const AppendParams& p, int64_t b, int64_t h,
                                         int64_t* free_slots, int64_t* needed) {
  const CacheParams& c = p.cache;
  int64_t f = 0, n = 0;
  for (int64_t s = 0; s < c.C; ++s) f += c.slot_pos[off(c.pos_st, b, h, s)] == -1;
  for (int64_t t = 0; t < p.T; ++t) n += p.new_pos[off(p.new_pos_st, b, t)] >= 0;
  *free_slots = f;
  *needed = n;
}

template <class T>
WKV_HOST_DEVICE inline void append_row(const AppendParams& p, int64_t b, int64_t h) {
  const CacheParams& c = p.cache;
  T* keys = static_cast<T*>(c.keys);
  T* values = static_cast<T*>(c.values);
  const T* nk = static_cast<const T*>(p.new_keys);
  const T* nv = static_cast<const T*>(p.new_values);
  int64_t s = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t pos = p.new_pos[off(p.new_pos_st, b, t)];
    if (pos < 0) continue;
    while (s < c.C && c.slot_pos[off(c.pos_st, b, h, s)] != -1) ++s;
    if (s >= c.C) return;  // not reached when the host checked the free-slot count
    T* kd = keys + off(c.keys_st, b, h, s, 0);
    T* vd = values + off(c.values_st, b, h, s, 0);
    const T* ks = nk + off(p.new_keys_st, b, h, t, 0);
    const T* vs = nv + off(p.new_values_st, b, h, t, 0);
    for (int64_t d = 0; d < c.D; ++d) {
      kd[d * c.keys_st.s3] = ks[d * p.new_keys_st.s3];
      vd[d * c.values_st.s3] = vs[d * p.new_values_st.s3];
    }
    c.scores[off(c.scores_st, b, h, s)] = 0.0f;
    c.counts[off(c.counts_st, b, h, s)] = 0.0f;
    c.last[off(c.last_st, b, h, s)] = 0.0f;
    c.slot_pos[off(c.pos_st, b, h, s)] = pos;
    ++s;
  }
}

}  // namespace wkv
