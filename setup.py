"""Builds lipkernels._C, the compiled operator library.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda/) are built too,
as a CUDAExtension, when the installed torch has CUDA (torch.version.cuda is not
None) and nvcc is found (CUDA_HOME, or nvcc on PATH), unless LIPKERNELS_NO_CUDA=1;
for the architectures of TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). Why a build has no
CUDA kernels is compiled into the library (``lipkernels info`` prints it).

LIPKERNELS_CUDA_EMULATION=1 builds, instead of real CUDA kernels, the same csrc/cuda/*.cu
sources as host C++ against csrc/cuda/emulation/ (the ``cuda`` backend then runs them on
CPU tensors: a correctness tool), with the memory-access hooks that count their traffic.

Build with the torch that is already installed: ``pip install --no-build-isolation
-e .`` (the Makefile does this).
"""
import glob
import os
import re

from setuptools import setup
import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

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


DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_config():
    """(build CUDA kernels?, reason code when not, architectures as sm_80.sm_90).

    The reason codes are read back by lipkernels._extension.cuda_reason()."""
    if os.environ.get("LIPKERNELS_NO_CUDA", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "disabled_by_env", ""
    if torch.version.cuda is None:
        return False, "torch_without_cuda", ""
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, "nvcc_not_found", ""
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        # torch takes CUDA_HOME from the nvcc on PATH: a link or wrapper script
        # /usr/local/bin/nvcc gives /usr/local, which has no CUDA headers. The toolkit is
        # where a link points, or at its default place.
        real = os.path.dirname(os.path.dirname(os.path.realpath(os.path.join(home, "bin", "nvcc"))))
        for cand in (real, "/usr/local/cuda"):
            if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")) and \
                    os.path.exists(os.path.join(cand, "bin", "nvcc")):
                print(f"lipkernels: CUDA_HOME {home} has no CUDA headers; using {cand}")
                cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cand
                break
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
    # torch.utils.cpp_extension reads the list from the environment (without it, it
    # would build for the GPUs of the build machine only).
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return True, "", arch_tag(archs)


def arch_tag(archs):
    """TORCH_CUDA_ARCH_LIST as one preprocessor-safe token sequence (no commas or
    semicolons) for LIPKERNELS_CUDA_ARCHS: "8.0;9.0+PTX" -> "sm_80.sm_90+PTX"."""
    tags = []
    for a in re.split(r"[;,\s]+", archs):
        if a:
            ptx = a.upper().endswith("+PTX")
            a = a[:-4] if ptx else a
            tags.append("sm_" + re.sub(r"[^0-9A-Za-z]", "", a) + ("+PTX" if ptx else ""))
    return ".".join(tags)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# The emulated kernels' translation units: compiled on their own, with the -fsanitize=thread
# instrumentation whose per-access hooks csrc/cuda/emulation/counters.cpp defines (the
# traffic counters), and linked into the extension as objects.
EMULATED_KERNELS = sorted(glob.glob("csrc/cuda/emulation/kernels_*.cpp"))
EMULATION_DEFINES = ["-DLIPKERNELS_CUDA_EMULATION", "-DLK_EMU_COUNT_TRAFFIC"]


class Build(BuildExtension):
    def build_extensions(self):
        for ext in self.extensions:
            if getattr(ext, "lk_emulated_kernels", None):
                objects = self.compiler.compile(
                    ext.lk_emulated_kernels, output_dir=self.build_temp, include_dirs=["csrc"],
                    extra_postargs=["-std=c++17", "-O2", "-fPIC", "-Wno-unknown-pragmas", "-fsanitize=thread",
                                    "--param=tsan-instrument-func-entry-exit=0"] + EMULATION_DEFINES)
                ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", f"-DLIPKERNELS_VERSION={read_version()}"] + cpu_arch_flags()
    if env_flag("LIPKERNELS_CUDA_EMULATION"):
        print("lipkernels: building the CUDA kernels for the host (LIPKERNELS_CUDA_EMULATION=1)")
        ext = CppExtension(
            "lipkernels._C",
            sources + ["csrc/cuda/bindings.cpp", "csrc/cuda/emulation/executor.cpp",
                       "csrc/cuda/emulation/counters.cpp", "csrc/cuda/emulation/torch_ops.cpp"],
            extra_compile_args={"cxx": cxx + EMULATION_DEFINES + ["-Wno-unknown-pragmas",
                                                                   "-DLIPKERNELS_NO_CUDA_REASON=emulation_build"]},
            extra_link_args=["-fopenmp"],
        )
        ext.lk_emulated_kernels = EMULATED_KERNELS
        return ext
    use_cuda, reason, archs = cuda_config()
    if not use_cuda:
        print(f"lipkernels: building without CUDA kernels ({reason})")
        return CppExtension(
            "lipkernels._C",
            sources,
            extra_compile_args={"cxx": cxx + [f"-DLIPKERNELS_NO_CUDA_REASON={reason}"]},
            extra_link_args=["-fopenmp"],
        )
    print(f"lipkernels: building CUDA kernels for {archs}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    defines = ["-DLIPKERNELS_WITH_CUDA", f"-DLIPKERNELS_CUDA_ARCHS={archs}"]
    return CUDAExtension(
        "lipkernels._C",
        sources,
        extra_compile_args={"cxx": cxx + defines,
                            "nvcc": ["-O3", "-lineinfo"] + defines},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
