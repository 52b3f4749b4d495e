// prepare_snap.h: host-side validation and parameter packing of snap_compress (the prompt-end
// step of the "snapkv" prompt mode; defined at the end of prepare.cpp, which holds the shared
// checks). Errors name the op, the argument and the bad value.
#pragma once

#include <ATen/core/Tensor.h>

#include "../kernels/snap.h"

namespace wkv::host {

SnapParams prepare_snap(const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& scores, const at::Tensor& counts,
                        const at::Tensor& last, const at::Tensor& slot_pos, int64_t budget,
                        int64_t sinks, int64_t recent, int64_t pool, bool merge,
                        const at::Tensor& kept);

}  // namespace wkv::host
