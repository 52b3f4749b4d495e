# sources.cmake: the one list of the op library's sources and of the flags its numerics depend on,
# read by CMakeLists.txt (include) and by setup.py (which parses these set() lines: keep each
# value a plain whitespace-separated list, paths relative to the repository root).
#
# WKV_NUMERICS_CXX_FLAGS / WKV_NUMERICS_CUDA_FLAGS: no FMA contraction, so that append,
# accumulate and compress round identically on CPU and GPU and the CPU attention kernels match
# their AVX2 build bit for bit (docs/design.md, "Tie-breaking and determinism").
set(WKV_CORE_SOURCES
    csrc/torch_bindings.cpp
    csrc/host/prepare.cpp
    csrc/cpu/accumulate.cpp
    csrc/cpu/append.cpp
    csrc/cpu/attention.cpp
    csrc/cpu/compress.cpp
    csrc/cpu/snap.cpp)
set(WKV_CUDA_SOURCES
    csrc/cuda/accumulate.cu
    csrc/cuda/append.cu
    csrc/cuda/attention.cu
    csrc/cuda/compress.cu
    csrc/cuda/snap.cu)
set(WKV_NUMERICS_CXX_FLAGS -ffp-contract=off)
set(WKV_NUMERICS_CUDA_FLAGS --fmad=false)
set(WKV_CUDA_EXTRA_FLAGS --expt-relaxed-constexpr)
set(WKV_DEFAULT_CUDA_ARCHS 8.0 9.0)
