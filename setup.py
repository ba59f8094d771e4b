"""Builds lipkernels._C, the compiled operator library.

The C++ CPU kernels are always built. Build with the torch that is already
installed: ``pip install --no-build-isolation -e .`` (the Makefile does this).
"""
import glob
import os
import re

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "lipkernels", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def cpu_arch_flags():
    """SIMD level of the CPU kernels, for the machine that builds them (the extension is
    built from source where it runs). LIPKERNELS_CPU_ARCH=generic|x86-64-v3|x86-64-v4
    overrides the detection."""
    level = os.environ.get("LIPKERNELS_CPU_ARCH", "auto")
    if level == "auto":
        level = "generic"
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
        except OSError:
            flags = set()
        if {"avx2", "fma", "bmi2", "movbe"} <= flags:
            level = "x86-64-v3"
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
                level = "x86-64-v4"
    return [] if level == "generic" else [f"-march={level}"]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", f"-DLIPKERNELS_VERSION={read_version()}"] + cpu_arch_flags()
    return CppExtension(
        "lipkernels._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
