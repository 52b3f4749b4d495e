// compress.cpp: CPU implementation of weightedkv::compress (docs/design.md).
//
// Per (b, h), with L held tokens and k = L - budget removals:
//  * eligibility thresholds once: held tokens ordered by (position, slot); the sinks lowest and
//    the recent highest ranks are protected (nth_element, O(L));
//  * the removal order: keys never change during a call (a merge keeps r's key and statistics,
//    CaM touches no statistics), so the k successive arg-mins over the shrinking eligible set are
//    exactly the k smallest eligible (key, position, slot) triples in increasing order
//    (partial_sort, O(L log k); a plain O(L) scan when k == 1);
//  * the removals are then applied one by one, each seeing the cache left by the previous one:
//    the right neighbour / CaM window of j are the next held tokens in (position, slot) order at
//    that moment (for k == 1 found by partial selection; for k > 1 through a linked list over the
//    position order built once). Hence k removals in one call == k calls removing one, bit for bit.
//  * weightedkv's merge rule (merge.h): merge_target 'similar' also needs the previous held token
//    and 'nearest' scans every held token's key; both go through the general linked list for
//    k > 1 (the one of CaM). The gate and the weights only change the merge itself.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../ops.h"
#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare.h"
#include "../kernels/merge.h"
#include "../kernels/policy.h"
#include "cpu_common.h"

namespace wkv::cpu {
namespace {

struct PosSlot {
  int64_t pos;
  int64_t slot;
  bool operator<(const PosSlot& o) const { return pos != o.pos ? pos < o.pos : slot < o.slot; }
};

struct Cand {
  float key;
  int64_t pos;
  int64_t slot;
};

inline bool cand_less(const Cand& a, const Cand& b) {
  if (key_less(a.key, a.pos, b.key, b.pos)) return true;
  if (key_less(b.key, b.pos, a.key, a.pos)) return false;
  return a.slot < b.slot;  // only for duplicate positions (not produced by the integration)
}

// Scratch buffers of one thread, reused across rows and calls (no allocation once warm).
struct Scratch {
  std::vector<PosSlot> held, tmp, tmp2;
  std::vector<Cand> cands;
  std::vector<int64_t> rank_of_slot, next, prev;
  std::vector<int64_t> window;
  std::vector<int32_t> hist;
  // k > 1 WeightedKV removals: removed tokens in (pos, slot) order and their links
  std::vector<PosSlot> rs;
  std::vector<PosSlot> next_kept;
  std::vector<int64_t> rs_index, rs_next;
  void reserve(int64_t C) {
    if (static_cast<int64_t>(rank_of_slot.size()) < C) rank_of_slot.resize(C);
    held.reserve(C);
    tmp.reserve(C);
    cands.reserve(C);
  }
};

constexpr int kHistBuckets = 1024;
constexpr PosSlot kNoToken{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max()};

template <class T>
class RowCompressor {
 public:
  RowCompressor(const CompressParams& p, int64_t b, int64_t h, Scratch& s)
      : p_(p), c_(p.cache), b_(b), h_(h), s_(s) {
    values_ = static_cast<T*>(c_.values);
  }

  void run() {
    // held tokens
    s_.held.clear();
    int64_t minp = std::numeric_limits<int64_t>::max(), maxp = -1;
    for (int64_t c = 0; c < c_.C; ++c) {
      const int64_t pos = slot_pos(c);
      if (pos >= 0) {
        s_.held.push_back({pos, c});
        minp = std::min(minp, pos);
        maxp = std::max(maxp, pos);
      }
    }
    const int64_t L = static_cast<int64_t>(s_.held.size());
    if (L <= p_.budget) return;
    const int64_t k = L - p_.budget;

    // eligibility: rank in [sinks, L - recent) of the (pos, slot) order
    PosSlot lo{std::numeric_limits<int64_t>::min(), -1};
    PosSlot hi = kNoToken;
    select_ranks(minp, maxp, p_.sinks > 0 ? p_.sinks - 1 : -1, p_.recent > 0 ? L - p_.recent : -1,
                 &lo, &hi);

    // removal order: the k smallest eligible candidates (more than k are eligible since
    // budget > sinks + recent)
    s_.cands.clear();
    Cand best{0.0f, 0, -1};
    for (const PosSlot& ps : s_.held) {
      if (!(lo < ps) || !(ps < hi)) continue;
      const int64_t c = ps.slot;
      const Cand cand{slot_key(p_.policy, stat(c_.scores, c_.scores_st, c),
                               stat(c_.counts, c_.counts_st, c), stat(c_.last, c_.last_st, c)),
                      ps.pos, c};
      if (k == 1) {
        if (best.slot < 0 || cand_less(cand, best)) best = cand;
      } else {
        s_.cands.push_back(cand);
      }
    }
    if (k == 1) {
      TORCH_INTERNAL_ASSERT(best.slot >= 0);
      s_.cands.push_back(best);
    } else {
      TORCH_INTERNAL_ASSERT(static_cast<int64_t>(s_.cands.size()) > k);
      // cand_less is a strict total order (slots are unique): the k smallest, sorted
      std::nth_element(s_.cands.begin(), s_.cands.begin() + (k - 1), s_.cands.end(), cand_less);
      std::sort(s_.cands.begin(), s_.cands.begin() + k, cand_less);
    }

    if (!policy_merges(p_.policy)) {
      for (int64_t i = 0; i < k; ++i) drop(s_.cands[i].slot);
      return;
    }
    const int64_t m_max = p_.policy == Policy::WeightedKV ? 1 : p_.cam_window;
    const bool right = p_.policy != Policy::WeightedKV || p_.merge_target == MergeTarget::Right;
    if (k == 1) {
      const int64_t j = s_.cands[0].slot;
      const PosSlot pj{s_.cands[0].pos, j};
      s_.window.clear();
      if (!right) {
        // the previous and next held tokens around j
        PosSlot l{-1, -1}, r = kNoToken;
        for (const PosSlot& ps : s_.held) {
          if (pj < ps && ps < r) r = ps;
          if (ps < pj && (l.slot < 0 || l < ps)) l = ps;
        }
        s_.window.push_back(choose_target(j, l.slot, r.slot == kNoToken.slot ? -1 : r.slot,
                                          s_.held.data(), static_cast<int64_t>(s_.held.size())));
      } else if (m_max == 1) {
        // right neighbour: the smallest held token after j
        PosSlot r = kNoToken;
        for (const PosSlot& ps : s_.held)
          if (pj < ps && ps < r) r = ps;
        if (r.slot != kNoToken.slot) s_.window.push_back(r.slot);
      } else {
        // the m_max held tokens after j, in position order
        s_.tmp.clear();
        for (const PosSlot& ps : s_.held)
          if (pj < ps) s_.tmp.push_back(ps);
        const int64_t m = std::min<int64_t>(m_max, static_cast<int64_t>(s_.tmp.size()));
        std::partial_sort(s_.tmp.begin(), s_.tmp.begin() + m, s_.tmp.end());
        for (int64_t i = 0; i < m; ++i) s_.window.push_back(s_.tmp[i].slot);
      }
      remove_with_merge(j);
      return;
    }
    if (m_max == 1 && right) {
      remove_many_weightedkv(k);
      return;
    }
    // k > 1 (CaM, weightedkv's similar / nearest targets): doubly linked list over the (pos, slot) order of the held tokens; rank L = end.
    std::sort(s_.held.begin(), s_.held.end());
    s_.next.resize(L + 1);
    s_.prev.resize(L + 1);
    for (int64_t i = 0; i < L; ++i) {
      s_.rank_of_slot[s_.held[i].slot] = i;
      s_.next[i] = i + 1;
      s_.prev[i] = i - 1;
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = s_.cands[i].slot;
      const int64_t rj = s_.rank_of_slot[j];
      s_.window.clear();
      if (!right) {
        const int64_t pv = s_.prev[rj], nx = s_.next[rj];
        s_.window.push_back(choose_target(j, pv >= 0 ? s_.held[pv].slot : -1,
                                          nx < L ? s_.held[nx].slot : -1, s_.held.data(), L));
      } else {
        for (int64_t r = s_.next[rj]; r < L && static_cast<int64_t>(s_.window.size()) < m_max;
             r = s_.next[r])
          s_.window.push_back(s_.held[r].slot);
      }
      remove_with_merge(j);
      // unlink rj
      const int64_t nx = s_.next[rj], pv = s_.prev[rj];
      if (pv >= 0) s_.next[pv] = nx;
      s_.prev[nx] = pv;  // nx may be the end sentinel L
    }
  }

 private:
  // The held tokens of ranks r_lo and r_hi (0-based, -1 = not wanted) in (pos, slot) order:
  // one histogram pass over position buckets, then a selection inside the bucket of each rank.
  void select_ranks(int64_t minp, int64_t maxp, int64_t r_lo, int64_t r_hi, PosSlot* lo,
                    PosSlot* hi) {
    if (r_lo < 0 && r_hi < 0) return;
    const uint64_t range = static_cast<uint64_t>(maxp - minp);
    int shift = 0;
    while ((range >> shift) >= static_cast<uint64_t>(kHistBuckets)) ++shift;
    auto bucket = [&](int64_t pos) { return static_cast<int>(static_cast<uint64_t>(pos - minp) >> shift); };
    s_.hist.assign(kHistBuckets, 0);
    for (const PosSlot& ps : s_.held) ++s_.hist[bucket(ps.pos)];
    // bucket of a rank and the rank's offset inside it
    auto locate = [&](int64_t r, int* bkt, int64_t* within) {
      int64_t below = 0;
      for (int i = 0; i < kHistBuckets; ++i) {
        if (below + s_.hist[i] > r) {
          *bkt = i;
          *within = r - below;
          return;
        }
        below += s_.hist[i];
      }
      TORCH_INTERNAL_ASSERT(false, "compress: rank beyond the held tokens");
    };
    int b_lo = -1, b_hi = -1;
    int64_t w_lo = 0, w_hi = 0;
    if (r_lo >= 0) locate(r_lo, &b_lo, &w_lo);
    if (r_hi >= 0) locate(r_hi, &b_hi, &w_hi);
    s_.tmp.clear();
    s_.tmp2.clear();
    for (const PosSlot& ps : s_.held) {
      const int bk = bucket(ps.pos);
      if (bk == b_lo) s_.tmp.push_back(ps);
      if (bk == b_hi) s_.tmp2.push_back(ps);
    }
    if (b_lo >= 0) {
      std::nth_element(s_.tmp.begin(), s_.tmp.begin() + w_lo, s_.tmp.end());
      *lo = s_.tmp[w_lo];
    }
    if (b_hi >= 0) {
      std::nth_element(s_.tmp2.begin(), s_.tmp2.begin() + w_hi, s_.tmp2.end());
      *hi = s_.tmp2[w_hi];
    }
  }

  // WeightedKV with k > 1 removals (s_.cands[0..k) in removal order). The right neighbour of the
  // i-th removed token j at its removal is the first held token after j not removed before it:
  // either the next still-present token of the removal set (when it lies before j's next kept
  // token), or j's next kept token (never removed). Only the k removed tokens are ordered.
  void remove_many_weightedkv(int64_t k) {
    s_.rs.resize(k);
    for (int64_t i = 0; i < k; ++i) s_.rs[i] = {s_.cands[i].pos, s_.cands[i].slot};
    std::sort(s_.rs.begin(), s_.rs.end());
    // rank_of_slot marks the removal set: slot -> sorted index (other entries may be stale: a
    // mark counts only if rs[mark] is that slot)
    for (int64_t i = 0; i < k; ++i) s_.rank_of_slot[s_.rs[i].slot] = i;
    // next_kept[i]: the smallest kept token after rs[i] (kNoToken if none)
    s_.next_kept.assign(k + 1, kNoToken);
    for (const PosSlot& ps : s_.held) {
      const int64_t ri = s_.rank_of_slot[ps.slot];
      if (ri >= 0 && ri < k && s_.rs[ri].slot == ps.slot) continue;  // removed
      // removed tokens before ps: rs[0 .. idx)
      const int64_t idx = std::lower_bound(s_.rs.begin(), s_.rs.end(), ps) - s_.rs.begin();
      if (idx > 0 && ps < s_.next_kept[idx - 1]) s_.next_kept[idx - 1] = ps;
    }
    for (int64_t i = k - 2; i >= 0; --i)
      if (s_.next_kept[i + 1] < s_.next_kept[i]) s_.next_kept[i] = s_.next_kept[i + 1];
    s_.rs_next.resize(k + 1);
    s_.prev.resize(k + 1);
    for (int64_t i = 0; i < k; ++i) {
      s_.rs_next[i] = i + 1;
      s_.prev[i] = i - 1;
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = s_.cands[i].slot;
      const int64_t si = s_.rank_of_slot[j];
      const int64_t ns = s_.rs_next[si];
      s_.window.clear();
      if (ns < k && s_.rs[ns] < s_.next_kept[si])
        s_.window.push_back(s_.rs[ns].slot);
      else if (s_.next_kept[si].slot != kNoToken.slot)
        s_.window.push_back(s_.next_kept[si].slot);
      remove_with_merge(j);
      const int64_t pv = s_.prev[si];
      if (pv >= 0) s_.rs_next[pv] = ns;
      s_.prev[ns] = pv;  // ns may be the end sentinel k
    }
  }

  // weightedkv's target for j (not 'right'): 'similar' picks between the previous held token
  // `left` and the next one `right` (-1 = none); 'nearest' scans the n tokens of `held` that
  // are still held (drop() has not freed their slot yet). -1: no target.
  int64_t choose_target(int64_t j, int64_t left, int64_t right, const PosSlot* held, int64_t n) {
    if (p_.merge_target == MergeTarget::Similar) {
      if (left < 0 || right < 0) return left < 0 ? right : left;
      return prefer_left(cosine(j, left), cosine(j, right)) ? left : right;
    }
    int64_t best = -1;
    float best_cos = 0.0f;
    PosSlot best_ps{0, 0};
    for (int64_t i = 0; i < n; ++i) {
      const PosSlot& ps = held[i];
      if (ps.slot == j || slot_pos(ps.slot) < 0) continue;
      const float c = cosine(j, ps.slot);
      if (best < 0 || similar_better(c, ps.pos, ps.slot, best_cos, best_ps.pos, best_ps.slot)) {
        best = ps.slot;
        best_cos = c;
        best_ps = ps;
      }
    }
    return best;
  }

  float cosine(int64_t a, int64_t b) const {
    const int64_t ks = c_.keys_st.s3;
    return key_cosine<T>(key_row(a), key_row(b), c_.D, ks, ks);
  }
  const T* key_row(int64_t c) const {
    return static_cast<const T*>(c_.keys) + off(c_.keys_st, b_, h_, c, 0);
  }
  float merged(int64_t c) const {
    return p_.merged ? p_.merged[off(p_.merged_st, b_, h_, c)] : 0.0f;
  }

  int64_t slot_pos(int64_t c) const { return c_.slot_pos[off(c_.pos_st, b_, h_, c)]; }
  float stat(const float* base, Stride3 st, int64_t c) const { return base[off(st, b_, h_, c)]; }
  float avg(int64_t c) const {
    return avg_score(stat(c_.scores, c_.scores_st, c), stat(c_.counts, c_.counts_st, c));
  }
  T* value_row(int64_t c) const { return values_ + off(c_.values_st, b_, h_, c, 0); }

  void drop(int64_t c) {
    c_.slot_pos[off(c_.pos_st, b_, h_, c)] = -1;
    c_.scores[off(c_.scores_st, b_, h_, c)] = 0.0f;
    c_.counts[off(c_.counts_st, b_, h_, c)] = 0.0f;
    c_.last[off(c_.last_st, b_, h_, c)] = 0.0f;
    if (p_.merged) p_.merged[off(p_.merged_st, b_, h_, c)] = 0.0f;
  }

  // Merges j into s_.window (its right neighbour / CaM window), then drops j.
  void remove_with_merge(int64_t j) {
    const int64_t m = static_cast<int64_t>(s_.window.size());
    const int64_t vs = c_.values_st.s3;
    if (m > 0 && p_.policy == Policy::WeightedKV && s_.window[0] >= 0) {
      const int64_t r = s_.window[0];
      if (gate_passes(p_.merge_gate, p_.merge_gate > 0.0f ? cosine(j, r) : 0.0f)) {
        const float mj = merged(j), mr = merged(r);
        weighted_merge_row<T>(value_row(j), value_row(r), c_.D, vs, vs,
                              merge_weights(slot_weight(p_.merge_weights, avg(j), mj),
                                            slot_weight(p_.merge_weights, avg(r), mr)));
        if (p_.merged)
          p_.merged[off(p_.merged_st, b_, h_, r)] = wkv_add(mr, wkv_add(1.0f, mj));
      }
    } else if (m > 0 && p_.policy == Policy::CaM) {
      float sum = 0.0f;
      for (int64_t i = 0; i < m; ++i) sum = wkv_add(sum, avg(s_.window[i]));
      const float mean = wkv_div(sum, static_cast<float>(m));
      const float prob = cam_probability(avg(j), mean);
      const float u = cam_uniform(p_.seed, b_, p_.head_offset + h_, slot_pos(j));
      if (u < prob)
        for (int64_t i = 0; i < m; ++i)
          cam_add_row<T>(value_row(j), value_row(s_.window[i]), c_.D, vs, vs, m);
    }
    drop(j);
  }

  const CompressParams& p_;
  const CacheParams& c_;
  const int64_t b_, h_;
  Scratch& s_;
  T* values_;
};

}  // namespace

void compress(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                  const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                  int64_t budget, int64_t sinks, int64_t recent, c10::string_view policy,
                  int64_t cam_window, int64_t seed, int64_t head_offset,
                  c10::string_view merge_target, double merge_gate,
                  c10::string_view merge_weights, const std::optional<at::Tensor>& merged) {
  const CompressParams p = host::prepare_compress(keys, values, scores, counts, last, slot_pos,
                                                  budget, sinks, recent, policy, cam_window, seed,
                                                  head_offset, merge_target, merge_gate,
                                                  merge_weights, merged);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.cache.C == 0) return;
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "compress", [&] {
    using T = host::elem_t<scalar_t>;
    at::parallel_for(0, rows, grain(4 * int64_t(p.cache.C)), [&](int64_t begin, int64_t end) {
      thread_local Scratch scratch;
      scratch.reserve(p.cache.C);
      for (int64_t r = begin; r < end; ++r)
        RowCompressor<T>(p, r / p.cache.H, r % p.cache.H, scratch).run();
    });
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) { m.impl("compress", &compress); }

}  // namespace wkv::cpu
