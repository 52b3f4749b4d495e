// elem_type.h: c10 dtype -> torch-free element type of csrc/kernels, for the CPU and CUDA wrappers.
// Provides: wkv::host::elem_t<scalar_t> (float -> float, c10::Half -> wkv::half_t,
// c10::BFloat16 -> wkv::bf16_t).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kernels/convert.h"

namespace wkv::host {

template <class T> struct ElemType { using type = T; };
template <> struct ElemType<c10::Half> { using type = wkv::half_t; };
template <> struct ElemType<c10::BFloat16> { using type = wkv::bf16_t; };
template <class T> using elem_t = typename ElemType<T>::type;

static_assert(sizeof(wkv::half_t) == sizeof(c10::Half), "half layout");
static_assert(sizeof(wkv::bf16_t) == sizeof(c10::BFloat16), "bf16 layout");

}  // namespace wkv::host
