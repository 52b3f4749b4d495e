// cuda_launch.h: host-side launch helpers of the CUDA wrappers.
// Provides: max_dynamic_smem(kernel) (bytes of dynamic shared memory one block of `kernel` may use
// on the current device, opt-in limit minus its static shared memory), allow_dynamic_smem(kernel,
// bytes) (raises the 48 KiB default when needed), sync_checks() (WKV_CUDA_SYNC_CHECKS=1: checks
// that need the data on the host, e.g. append's free-slot count, synchronise and raise like the
// CPU kernels; default: a device-side assert, no host synchronisation).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>

namespace wkv::gpu {

inline size_t max_dynamic_smem(const void* kernel) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = static_cast<size_t>(optin);
  return limit > attr.sharedSizeBytes ? limit - attr.sharedSizeBytes : 0;
}

inline void allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

inline bool sync_checks() {
  const char* v = std::getenv("WKV_CUDA_SYNC_CHECKS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

}  // namespace wkv::gpu
