// ops.h: the C++ signature of every op of csrc/torch_bindings.cpp, written once as a function
// type and declared for each device (the vLLM ops.h convention): wkv::cpu::<op> (csrc/cpu/) and
// wkv::gpu::<op> (csrc/cuda/) must match it, or they do not compile. Each device file registers
// its definition with TORCH_LIBRARY_IMPL. Arguments as in the schemas (docs/design.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

namespace wkv {

using Tensor = at::Tensor;

using AppendOp = void(const Tensor& keys, const Tensor& values, const Tensor& scores,
                      const Tensor& counts, const Tensor& last, const Tensor& slot_pos,
                      const Tensor& new_keys, const Tensor& new_values, const Tensor& new_pos);

using AccumulateOp = void(const Tensor& probs, const Tensor& slot_pos, const Tensor& query_pos,
                          const Tensor& scores, const Tensor& counts, const Tensor& last,
                          c10::string_view group_reduce);

using CompressOp = void(const Tensor& keys, const Tensor& values, const Tensor& scores,
                        const Tensor& counts, const Tensor& last, const Tensor& slot_pos,
                        int64_t budget, int64_t sinks, int64_t recent, c10::string_view policy,
                        int64_t cam_window, int64_t seed, int64_t head_offset,
                        c10::string_view merge_target, double merge_gate,
                        c10::string_view merge_weights, const std::optional<Tensor>& merged);

// decode_attention (query/out [B, Hq, D]) and block_attention (query/out [B, Hq, Q, D]).
using AttentionOp = void(const Tensor& query, const Tensor& keys, const Tensor& values,
                         const Tensor& slot_pos, const Tensor& query_pos, const Tensor& scores,
                         const Tensor& counts, const Tensor& last, double scale,
                         c10::string_view group_reduce, int64_t window, double softcap,
                         const std::optional<Tensor>& sinks, const Tensor& out);

// snap_compress: the prompt-end step of the "snapkv" prompt mode (csrc/kernels/snap.h); kept
// [B, H, C] int64 is caller-allocated and written.
using SnapCompressOp = void(const Tensor& keys, const Tensor& values, const Tensor& scores,
                            const Tensor& counts, const Tensor& last, const Tensor& slot_pos,
                            int64_t budget, int64_t sinks, int64_t recent, int64_t pool,
                            bool merge, const Tensor& kept);

namespace cpu {
AppendOp append;
AccumulateOp accumulate;
CompressOp compress;
AttentionOp decode_attention;
AttentionOp block_attention;
SnapCompressOp snap_compress;
}  // namespace cpu

namespace gpu {
AppendOp append;
AccumulateOp accumulate;
CompressOp compress;
AttentionOp decode_attention;
AttentionOp block_attention;
SnapCompressOp snap_compress;
}  // namespace gpu

}  // namespace wkv
