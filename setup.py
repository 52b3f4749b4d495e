"""Build of weightedkv_ext and its compiled ops library weightedkv_ext._C.

CPU-only (CppExtension over WKV_CORE_SOURCES of cmake/sources.cmake) unless
CUDA is wanted and possible: torch built with CUDA (torch.version.cuda), a toolkit found (CUDA_HOME /
nvcc) and USE_CUDA != 0 (no GPU needed); FORCE_CUDA=1 turns "cannot build CUDA" into an error.
TORCH_CUDA_ARCH_LIST defaults to WKV_DEFAULT_CUDA_ARCHS. Sources and the flags the numerics depend on
come from cmake/sources.cmake, the list CMakeLists.txt uses too.

    pip install --no-build-isolation -e .      (or: bash scripts/build.sh, CPU-only)
    pip install --no-build-isolation .
"""
from __future__ import annotations

import glob
import os
import re
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _requirement(name: str) -> str:
    """The requirement line for ``name`` in requirements.txt (the one place versions are pinned)."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            spec = line.split("#", 1)[0].strip()
            if re.match(rf"{re.escape(name)}\b", spec):
                return spec
    raise RuntimeError(f"setup.py: requirements.txt has no line for {name!r}")


def _cmake_lists(path: str = os.path.join(ROOT, "cmake", "sources.cmake")) -> dict[str, list[str]]:
    """The ``set(NAME v1 v2 ...)`` lists of cmake/sources.cmake (comments dropped)."""
    text = re.sub(r"#[^\n]*", "", open(path).read())
    return {m.group(1): m.group(2).split() for m in re.finditer(r"set\(\s*(\w+)\s+([^)]*)\)", text)}


CONFIG = _cmake_lists()


def _want_cuda() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why not. No GPU is needed to compile them."""
    if os.environ.get("USE_CUDA", "") == "0":
        return False, "USE_CUDA=0"
    why = ""
    if torch.version.cuda is None:
        why = "this torch has no CUDA support"
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            why = "no CUDA toolkit found (set CUDA_HOME)"
    if why and os.environ.get("FORCE_CUDA", "") == "1":
        raise RuntimeError(f"weightedkv_ext: FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return not why, why


def _nvidia_pip_includes() -> list[str]:
    """Include dirs of the pip `nvidia-*` wheels (headers the system toolkit may lack).

    Searched after every other include dir (-idirafter), so they never shadow the toolkit's own
    headers and only supply missing ones (e.g. cusparse.h, cublas_v2.h).
    """
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return list(dict.fromkeys(dirs))


def _extension():
    # torch >= 2.10 headers need C++20 (std::strong_ordering, string_view::starts_with).
    cxx = ["-O3", "-std=c++20", *CONFIG["WKV_NUMERICS_CXX_FLAGS"], "-DWKV_PYTHON_MODULE"]
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
    sources = CONFIG["WKV_CORE_SOURCES"]
    use_cuda, why = _want_cuda()
    if not use_cuda:
        print(f"weightedkv_ext: building CPU-only ({why})", flush=True)
        return CppExtension(
            "weightedkv_ext._C", sources, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(CONFIG["WKV_DEFAULT_CUDA_ARCHS"]))
    after = _nvidia_pip_includes()
    nvcc = ["-O3", "-std=c++20", *CONFIG["WKV_NUMERICS_CUDA_FLAGS"], *CONFIG["WKV_CUDA_EXTRA_FLAGS"]]
    nvcc += [f"-Xcompiler=-idirafter{d}" for d in after]
    return CUDAExtension(
        "weightedkv_ext._C", sources + CONFIG["WKV_CUDA_SOURCES"],
        extra_compile_args={"cxx": cxx + [f"-idirafter{d}" for d in after], "nvcc": nvcc},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
    )


setup(
    name="weightedkv_ext",
    version="0.1.0",
    description="WeightedKV KV-cache compression ops (C++/CUDA) for PyTorch and transformers",
    packages=find_packages(include=["weightedkv_ext", "weightedkv_ext.*"]),
    python_requires=">=3.10",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": [
        "weightedkv-eval = weightedkv_ext.eval.cli:main",
        "weightedkv-demo = weightedkv_ext.demo:main",
    ], "vllm.general_plugins": [  # run by vLLM in each process; a no-op unless WEIGHTEDKV_VLLM set
        "weightedkv = weightedkv_ext.vllm:register",
    ]},
    # transformers: the one tested range, pinned in requirements.txt (read, not repeated, here).
    install_requires=["torch", "numpy", _requirement("transformers")],
    # `pip install .[eval]`: the evaluation harness (python -m weightedkv_ext.eval) and its plots
    extras_require={"eval": ["tqdm", "matplotlib"]},
    zip_safe=False,
)
