// dispatch.h: the one project dtype macro.
// WKV_DISPATCH_FLOAT_TYPES(dtype, "op name", [&] { ... scalar_t ... }) runs the lambda with
// scalar_t = float, at::Half or at::BFloat16; any other dtype raises a TORCH_CHECK error that
// names the op.
#pragma once

#include <ATen/Dispatch.h>

#define WKV_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
