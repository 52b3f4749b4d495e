// cuda_launch.h: host-side launch helpers of the CUDA wrappers.
// Provides: device_info() (multiprocessor count and the opt-in shared-memory limit of the current
// device, queried once per device), max_dynamic_smem(kernel) (bytes of dynamic shared memory one
// block of `kernel` may use on the current device: opt-in limit minus its static shared memory,
// queried once per (device, kernel)), allow_dynamic_smem(kernel, bytes) (raises the 48 KiB default
// when needed; the attribute is set only when `bytes` exceeds what was already allowed on that
// device), sync_checks() (WKV_CUDA_SYNC_CHECKS=1: checks that need the data on the host, e.g.
// append's free-slot count, synchronise and raise like the CPU kernels; default: a device-side
// assert, no host synchronisation) and round_up.
// The caches are process-wide, guarded by one mutex (a lookup per launch, no driver call once
// warm); they assume a kernel's attributes do not change behind their back (nothing else in the
// library sets them).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace wkv::gpu {

struct DeviceInfo {
  int sm_count = 0;        // cudaDevAttrMultiProcessorCount
  size_t smem_optin = 0;   // cudaDevAttrMaxSharedMemoryPerBlockOptin (bytes)
};

struct KernelInfo {
  size_t max_dynamic = 0;  // opt-in limit minus the kernel's static shared memory
  size_t allowed = 48 * 1024;  // current cudaFuncAttributeMaxDynamicSharedMemorySize
};

namespace detail {
inline std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}
// Caller holds cache_mutex().
inline const DeviceInfo& device_info_locked(int dev) {
  static std::map<int, DeviceInfo> cache;
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo d;
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  d.sm_count = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  d.smem_optin = static_cast<size_t>(v);
  return cache.emplace(dev, d).first->second;
}
// Caller holds cache_mutex().
inline KernelInfo& kernel_info_locked(int dev, const void* kernel) {
  static std::map<std::pair<int, const void*>, KernelInfo> cache;
  const auto key = std::make_pair(dev, kernel);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = device_info_locked(dev).smem_optin;
  KernelInfo k;
  k.max_dynamic = limit > attr.sharedSizeBytes ? limit - attr.sharedSizeBytes : 0;
  return cache.emplace(key, k).first->second;
}
}  // namespace detail

// The current device's attributes (a copy; queried once per device).
inline DeviceInfo device_info() {
  const int dev = detail::current_device();
  std::lock_guard<std::mutex> lock(detail::cache_mutex());
  return detail::device_info_locked(dev);
}

inline size_t max_dynamic_smem(const void* kernel) {
  const int dev = detail::current_device();
  std::lock_guard<std::mutex> lock(detail::cache_mutex());
  return detail::kernel_info_locked(dev, kernel).max_dynamic;
}

inline void allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  const int dev = detail::current_device();
  std::lock_guard<std::mutex> lock(detail::cache_mutex());
  KernelInfo& k = detail::kernel_info_locked(dev, kernel);
  if (bytes <= k.allowed) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  k.allowed = bytes;
}

inline bool sync_checks() {
  const char* v = std::getenv("WKV_CUDA_SYNC_CHECKS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

}  // namespace wkv::gpu
