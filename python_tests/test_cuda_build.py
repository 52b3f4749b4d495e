"""The build: one list of sources and numerics flags (cmake/sources.cmake) read by setup.py and
CMakeLists.txt, covering every source file; a CUDA build registers a CUDA kernel for every op
(no GPU needed: dispatch-table check)."""
import re

import pytest
import torch

from helpers import OPS, ROOT, compiled_ops


def sources_cmake() -> dict:
    text = re.sub(r"#[^\n]*", "", (ROOT / "cmake" / "sources.cmake").read_text())
    return {m.group(1): m.group(2).split() for m in re.finditer(r"set\(\s*(\w+)\s+([^)]*)\)", text)}


def test_sources_cmake_lists_every_source_file():
    lists = sources_cmake()
    on_disk = {str(p.relative_to(ROOT)) for pattern in ("csrc/*.cpp", "csrc/host/*.cpp",
                                                         "csrc/cpu/*.cpp", "csrc/cuda/*.cu",
                                                         "csrc/cuda/*.cpp")
               for p in ROOT.glob(pattern)}
    listed = lists["WKV_CORE_SOURCES"] + lists["WKV_CUDA_SOURCES"]
    assert sorted(listed) == sorted(on_disk)
    assert lists["WKV_NUMERICS_CXX_FLAGS"] == ["-ffp-contract=off"]
    assert lists["WKV_NUMERICS_CUDA_FLAGS"] == ["--fmad=false"]


def test_builds_take_sources_and_flags_from_sources_cmake_only():
    """No build file spells a source or a numerics flag itself (they could drift)."""
    setup = (ROOT / "setup.py").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for text in (setup, cmake):
        assert "-ffp-contract" not in text and "--fmad" not in text
        assert ".cu\"" not in text and "csrc/cpu" not in text and "csrc/cuda" not in text
        assert "WKV_WITH_CUDA\")" not in text and "-DWKV_WITH_CUDA" not in text
    assert "include(sources)" in cmake
    src = setup.split("CONFIG = _cmake_lists()")[0]
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(src, "setup.py", "exec"), namespace)  # the helpers only, not setup()
    assert namespace["_cmake_lists"]() == sources_cmake()


def test_cuda_build_registers_every_op():
    compiled_ops()
    from weightedkv_ext import _loader
    if not _loader.cuda_built():
        pytest.skip("weightedkv_ext was built without the CUDA kernels (CPU-only build, e.g. "
                    "scripts/build.sh; FORCE_CUDA=1 builds them without a GPU)")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"weightedkv::{op}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
    for op in OPS:  # the CPU kernels stay registered next to them
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weightedkv::{op}", "CPU"), op
