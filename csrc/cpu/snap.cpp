// snap.cpp: CPU implementation of weightedkv::snap_compress (docs/design.md, "snap_compress").
//
// Per (b, h) row, phases as in csrc/kernels/snap.h: held tokens sorted by (position, slot) ->
// pooled window scores per rank -> the top (budget - sinks - recent) eligible ranks by
// (pooled desc, rank asc) (nth_element, O(L)) -> optional merge of each dropped run into its kept
// right neighbour -> drop -> kept list in position order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dispatch.h"
#include "../host/elem_type.h"
#include "../host/prepare_snap.h"
#include "../kernels/snap.h"
#include "../ops.h"
#include "cpu_common.h"

namespace wkv::cpu {
namespace {

struct SnapScratch {
  std::vector<std::pair<int64_t, int64_t>> held;  // (pos, slot)
  std::vector<int64_t> order, cands;
  std::vector<float> window, pooled;
  std::vector<char> keep;
};

template <class T>
void snap_row(const SnapParams& p, int64_t b, int64_t h, SnapScratch& s) {
  const CacheParams& c = p.cache;
  s.held.clear();
  for (int64_t slot = 0; slot < c.C; ++slot) {
    const int64_t pos = c.slot_pos[off(c.pos_st, b, h, slot)];
    if (pos >= 0) s.held.emplace_back(pos, slot);
  }
  std::sort(s.held.begin(), s.held.end());
  const int64_t L = static_cast<int64_t>(s.held.size());
  s.order.resize(L);
  for (int64_t k = 0; k < L; ++k) s.order[k] = s.held[k].second;
  s.keep.assign(L, 1);
  if (L > p.budget) {
    s.window.resize(L);
    s.pooled.resize(L);
    for (int64_t k = 0; k < L; ++k) s.window[k] = c.scores[off(c.scores_st, b, h, s.order[k])];
    for (int64_t k = 0; k < L; ++k) s.pooled[k] = snap_pooled(s.window.data(), k, L, p.pool);
    s.cands.clear();
    for (int64_t k = p.sinks; k < L - p.recent; ++k) {
      s.cands.push_back(k);
      s.keep[k] = 0;
    }
    const int64_t n_keep = p.budget - p.sinks - p.recent;  // < cands.size() since L > budget
    auto before = [&](int64_t a, int64_t bb) {
      return snap_before(s.pooled[a], a, s.pooled[bb], bb);
    };
    std::nth_element(s.cands.begin(), s.cands.begin() + (n_keep - 1), s.cands.end(), before);
    for (int64_t i = 0; i < n_keep; ++i) s.keep[s.cands[i]] = 1;
    if (p.merge) {
      int64_t run = 0;  // first rank of the current dropped run
      for (int64_t k = 0; k < L; ++k) {
        if (!s.keep[k]) continue;
        if (run < k) snap_merge_run<T>(c, b, h, s.order.data(), run, k);
        run = k + 1;
      }  // a dropped run with no kept right neighbour (recent == 0) is dropped unmerged
    }
    for (int64_t k = 0; k < L; ++k)
      if (!s.keep[k]) snap_drop(c, b, h, s.order[k]);
  }
  snap_write_kept(p, b, h, s.order.data(), s.keep.data(), L);
}

}  // namespace

void snap_compress(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& scores,
                   const at::Tensor& counts, const at::Tensor& last, const at::Tensor& slot_pos,
                   int64_t budget, int64_t sinks, int64_t recent, int64_t pool, bool merge,
                   const at::Tensor& kept) {
  const SnapParams p = host::prepare_snap(keys, values, scores, counts, last, slot_pos, budget,
                                          sinks, recent, pool, merge, kept);
  const int64_t rows = int64_t(p.cache.B) * p.cache.H;
  if (rows == 0 || p.cache.C == 0) return;
  WKV_DISPATCH_FLOAT_TYPES(keys.scalar_type(), "snap_compress", [&] {
    using T = host::elem_t<scalar_t>;
    const int64_t work = int64_t(p.cache.C) * (8 + p.pool + (merge ? p.cache.D : 0));
    at::parallel_for(0, rows, grain(work), [&](int64_t begin, int64_t end) {
      thread_local SnapScratch scratch;
      for (int64_t r = begin; r < end; ++r) snap_row<T>(p, r / p.cache.H, r % p.cache.H, scratch);
    });
  });
}

TORCH_LIBRARY_IMPL(weightedkv, CPU, m) { m.impl("snap_compress", &snap_compress); }

}  // namespace wkv::cpu
