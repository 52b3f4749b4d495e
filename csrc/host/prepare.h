// prepare.h: host-side validation and parameter packing shared by the CPU and CUDA wrappers
// (device-neutral: no CPU- or CUDA-specific code).
// Provides wkv::host::prepare_append / prepare_accumulate / prepare_compress / prepare_decode /
// prepare_block:
// each validates ranks, shapes, dtypes, devices, scalar arguments and memory aliasing of the
// tensors written in place (TORCH_CHECK messages name the op, the argument and the bad value)
// and returns the torch-free params struct of csrc/kernels/params.h (raw pointers + element
// strides of the tensors as given, no copies).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "../kernels/params.h"

namespace wkv::host {

AppendParams prepare_append(const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& scores, const at::Tensor& counts,
                            const at::Tensor& last, const at::Tensor& slot_pos,
                            const at::Tensor& new_keys, const at::Tensor& new_values,
                            const at::Tensor& new_pos);

AccumulateParams prepare_accumulate(const at::Tensor& probs, const at::Tensor& slot_pos,
                                    const at::Tensor& query_pos, const at::Tensor& scores,
                                    const at::Tensor& counts, const at::Tensor& last,
                                    c10::string_view group_reduce);

CompressParams prepare_compress(const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& scores, const at::Tensor& counts,
                                const at::Tensor& last, const at::Tensor& slot_pos,
                                int64_t budget, int64_t sinks, int64_t recent,
                                c10::string_view policy, int64_t cam_window, int64_t seed,
                                int64_t head_offset, c10::string_view merge_target,
                                double merge_gate, c10::string_view merge_weights,
                                const std::optional<at::Tensor>& merged);

// decode_attention (query/out [B, Hq, D], query_pos [B]) and block_attention (query/out
// [B, Hq, Q, D], query_pos [B, Q]); out is caller-allocated (dtype of query) and written.
AttentionParams prepare_decode(const at::Tensor& query, const at::Tensor& keys,
                               const at::Tensor& values, const at::Tensor& slot_pos,
                               const at::Tensor& query_pos, const at::Tensor& scores,
                               const at::Tensor& counts, const at::Tensor& last, double scale,
                               c10::string_view group_reduce, int64_t window, double softcap,
                               const std::optional<at::Tensor>& sinks, const at::Tensor& out);

AttentionParams prepare_block(const at::Tensor& query, const at::Tensor& keys,
                              const at::Tensor& values, const at::Tensor& slot_pos,
                              const at::Tensor& query_pos, const at::Tensor& scores,
                              const at::Tensor& counts, const at::Tensor& last, double scale,
                              c10::string_view group_reduce, int64_t window, double softcap,
                              const std::optional<at::Tensor>& sinks, const at::Tensor& out);

}  // namespace wkv::host
