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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "../dispatch.h"
#include "../kernels/merge.h"
#include "../kernels/policy.h"
#include "cpu_common.h"
#include "prepare.h"

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

// Scratch buffers reused across the rows of one parallel task.
struct Scratch {
  std::vector<PosSlot> held, tmp;
  std::vector<Cand> cands;
  std::vector<int64_t> rank_of_slot, next, prev;
  std::vector<int64_t> window;
  explicit Scratch(int64_t C) : rank_of_slot(C) {
    held.reserve(C);
    tmp.reserve(C);
    cands.reserve(C);
    next.reserve(C + 1);
    prev.reserve(C + 1);
  }
};

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
    for (int64_t c = 0; c < c_.C; ++c) {
      const int64_t pos = slot_pos(c);
      if (pos >= 0) s_.held.push_back({pos, c});
    }
    const int64_t L = static_cast<int64_t>(s_.held.size());
    if (L <= p_.budget) return;
    const int64_t k = L - p_.budget;

    // eligibility: rank in [sinks, L - recent) of the (pos, slot) order
    PosSlot lo{std::numeric_limits<int64_t>::min(), -1};
    PosSlot hi{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max()};
    s_.tmp = s_.held;
    if (p_.sinks > 0) {
      std::nth_element(s_.tmp.begin(), s_.tmp.begin() + (p_.sinks - 1), s_.tmp.end());
      lo = s_.tmp[p_.sinks - 1];
    }
    if (p_.recent > 0) {
      std::nth_element(s_.tmp.begin(), s_.tmp.begin() + (L - p_.recent), s_.tmp.end());
      hi = s_.tmp[L - p_.recent];
    }
    s_.cands.clear();
    for (const PosSlot& ps : s_.held) {
      if (!(lo < ps) || !(ps < hi)) continue;
      const int64_t c = ps.slot;
      s_.cands.push_back({slot_key(p_.policy, stat(c_.scores, c_.scores_st, c),
                                   stat(c_.counts, c_.counts_st, c), stat(c_.last, c_.last_st, c)),
                          ps.pos, c});
    }
    // removal order: the k smallest eligible candidates (more than k are eligible since
    // budget > sinks + recent)
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(s_.cands.size()) > k);
    if (k == 1) {
      auto it = std::min_element(s_.cands.begin(), s_.cands.end(), cand_less);
      std::iter_swap(s_.cands.begin(), it);
    } else {
      std::partial_sort(s_.cands.begin(), s_.cands.begin() + k, s_.cands.end(), cand_less);
    }

    if (!policy_merges(p_.policy)) {
      for (int64_t i = 0; i < k; ++i) drop(s_.cands[i].slot);
      return;
    }
    const int64_t m_max = p_.policy == Policy::WeightedKV ? 1 : p_.cam_window;
    if (k == 1) {
      const int64_t j = s_.cands[0].slot;
      // the m_max held tokens after j, in position order
      const PosSlot pj{s_.cands[0].pos, j};
      s_.tmp.clear();
      for (const PosSlot& ps : s_.held)
        if (pj < ps) s_.tmp.push_back(ps);
      const int64_t m = std::min<int64_t>(m_max, static_cast<int64_t>(s_.tmp.size()));
      std::partial_sort(s_.tmp.begin(), s_.tmp.begin() + m, s_.tmp.end());
      s_.window.clear();
      for (int64_t i = 0; i < m; ++i) s_.window.push_back(s_.tmp[i].slot);
      remove_with_merge(j);
      return;
    }
    // k > 1: doubly linked list over the (pos, slot) order of the held tokens; rank L = end.
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
      for (int64_t r = s_.next[rj]; r < L && static_cast<int64_t>(s_.window.size()) < m_max;
           r = s_.next[r])
        s_.window.push_back(s_.held[r].slot);
      remove_with_merge(j);
      // unlink rj
      const int64_t nx = s_.next[rj], pv = s_.prev[rj];
      if (pv >= 0) s_.next[pv] = nx;
      s_.prev[nx] = pv;  // nx may be the end sentinel L
    }
  }

 private:
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
  }

  // Merges j into s_.window (its right neighbour / CaM window), then drops j.
  void remove_with_merge(int64_t j) {
    const int64_t m = static_cast<int64_t>(s_.window.size());
    const int64_t vs = c_.values_st.s3;
    if (m > 0 && p_.policy == Policy::WeightedKV) {
      const int64_t r = s_.window[0];
      weighted_merge_row<T>(value_row(j), value_row(r), c_.D, vs, vs, merge_weights(avg(j), avg(r)));
    } else if (m > 0 && p_.policy == Policy::CaM) {
      float sum = 0.0f;
      for (int64_t i = 0; i < m; ++i) sum = wkv_add(sum, avg(s_.window[i]));
      const float mean = wkv_div(sum, static_cast<float>(m));
      const float prob = cam_probability(avg(j), mean);
      const float u = cam_uniform(p_.seed, b_, h_, slot_pos(j));
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

void compress_cpu(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                  const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                  int64_t budget, int64_t sinks, int64_t recent, c10::string_view policy,
                  int64_t cam_window, int64_t seed) {
  const CompressParams p = host::prepare_compress(keys, values, scores, counts, last, slot_pos,
                                                  budget, sinks, recent, std::string(policy),
                                                  cam_window, seed);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.cache.C == 0) return;
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "compress", [&] {
    using T = elem_t<scalar_t>;
    at::parallel_for(0, rows, grain(4 * int64_t(p.cache.C)), [&](int64_t begin, int64_t end) {
      Scratch scratch(p.cache.C);
      for (int64_t r = begin; r < end; ++r)
        RowCompressor<T>(p, r / p.cache.H, r % p.cache.H, scratch).run();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) { m.impl("compress", &compress_cpu); }

}  // namespace wkv::cpu
