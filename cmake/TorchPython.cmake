# TorchPython.cmake: the libtorch of the Python environment as the imported target wkv::torch.
# WKV_PYTHON (default: <repo>/.venv/bin/python if present, else python3) is asked for
# torch.utils.cmake_prefix_path and the C++ ABI flag. The target is built by hand from
# <torch>/include and <torch>/lib instead of find_package(Torch): the pip wheels' Caffe2 config
# insists on finding the whole CUDA toolkit (cuDNN, nvrtc, a GPU for arch detection), which a
# CPU-only build must not need. With WKV_WITH_CUDA the CUDA libraries of torch and
# CUDA::cudart (find_package(CUDAToolkit)) are added.
# Also defines wkv::openmp: -fopenmp against the libgomp that torch ships (one OpenMP runtime in
# the process; at::parallel_for is an inline OpenMP loop, so it needs -fopenmp to run threaded).
if(NOT WKV_PYTHON)
  if(EXISTS "${CMAKE_SOURCE_DIR}/.venv/bin/python")
    set(WKV_PYTHON "${CMAKE_SOURCE_DIR}/.venv/bin/python")
  else()
    find_program(WKV_PYTHON NAMES python3 python REQUIRED)
  endif()
endif()
execute_process(
  COMMAND "${WKV_PYTHON}" -c
          "import os, torch; print(torch.utils.cmake_prefix_path); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)"
  OUTPUT_VARIABLE _wkv_out
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _wkv_rc)
if(NOT _wkv_rc EQUAL 0)
  message(FATAL_ERROR "weightedkv: could not import torch with ${WKV_PYTHON}")
endif()
string(REPLACE "\n" ";" _wkv_out "${_wkv_out}")
list(GET _wkv_out 0 WKV_TORCH_CMAKE_PREFIX)
list(GET _wkv_out 1 WKV_TORCH_DIR)
list(GET _wkv_out 2 WKV_TORCH_CXX11_ABI)
list(GET _wkv_out 3 WKV_TORCH_VERSION)
message(STATUS "weightedkv: torch ${WKV_TORCH_VERSION} at ${WKV_TORCH_DIR}")

set(_wkv_torch_libs c10 torch_cpu torch)
if(WKV_WITH_CUDA)
  list(PREPEND _wkv_torch_libs c10_cuda torch_cuda)
endif()
add_library(wkv_torch INTERFACE)
add_library(wkv::torch ALIAS wkv_torch)
target_include_directories(wkv_torch SYSTEM INTERFACE "${WKV_TORCH_DIR}/include"
                                                     "${WKV_TORCH_DIR}/include/torch/csrc/api/include")
target_compile_definitions(wkv_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${WKV_TORCH_CXX11_ABI})
target_compile_options(wkv_torch INTERFACE $<$<COMPILE_LANGUAGE:CXX,CUDA>:-std=c++20>)
foreach(_lib IN LISTS _wkv_torch_libs)
  find_library(WKV_TORCH_LIB_${_lib} NAMES ${_lib} PATHS "${WKV_TORCH_DIR}/lib" NO_DEFAULT_PATH
               REQUIRED)
  target_link_libraries(wkv_torch INTERFACE "${WKV_TORCH_LIB_${_lib}}")
endforeach()
target_link_options(wkv_torch INTERFACE "LINKER:-rpath,${WKV_TORCH_DIR}/lib")
if(WKV_WITH_CUDA)
  find_package(CUDAToolkit REQUIRED)
  target_link_libraries(wkv_torch INTERFACE CUDA::cudart)
endif()

add_library(wkv_openmp INTERFACE)
add_library(wkv::openmp ALIAS wkv_openmp)
if(EXISTS "${WKV_TORCH_DIR}/lib/libgomp.so.1")
  target_compile_options(wkv_openmp INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  target_link_libraries(wkv_openmp INTERFACE "${WKV_TORCH_DIR}/lib/libgomp.so.1")
else()
  find_package(OpenMP)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(wkv_openmp INTERFACE OpenMP::OpenMP_CXX)
  endif()
endif()
