"""Builds the native extension ``conceptevo._C`` with pybind11 + setuptools only.

Deliberately not ``torch.utils.cpp_extension``: pip's isolated build environment
would then have to install torch (a multi-GB CUDA build from the registry).
The extension works on raw NumPy buffers, so it needs no torch headers.
"""
import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extra_compile = ["-O3", "-fopenmp", "-std=c++17"]
extra_link = ["-fopenmp"]
if sys.platform == "darwin":  # Apple clang has no bundled OpenMP; build single-threaded there.
    extra_compile = ["-O3", "-std=c++17"]
    extra_link = []
if os.environ.get("CONCEPTEVO_NATIVE_ARCH") == "1":  # opt-in: not portable across machines
    extra_compile.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "conceptevo._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        cxx_std=17,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
