"""Loads the compiled operator library (``lipkernels._C``) and says why when it can't.

The library holds no Python module code: it registers the ``torch.ops.lipkernels``
operators when loaded with :func:`torch.ops.load_library`, so the same loader works
for the ``setup.py`` build (``lipkernels/_C*.so``) and the CMake build
(``LIPKERNELS_LIBRARY=/path/to/liblipkernels.so``).
"""
from __future__ import annotations

import glob
import json
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_loaded = False
_error: str | None = None
_path: str | None = None


def _find_library() -> str | None:
    explicit = os.environ.get("LIPKERNELS_LIBRARY")
    if explicit:
        return explicit
    # The build for this interpreter first (an in-place build for another Python, e.g.
    # _C.cpython-311-*.so beside _C.cpython-312-*.so, is built against another torch).
    import importlib.machinery
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(os.path.join(_PACKAGE_DIR, "_C" + suffix)):
            return os.path.join(_PACKAGE_DIR, "_C" + suffix)
    found = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) +
                   glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    return found[0] if found else None


def _load() -> None:
    global _loaded, _error, _path
    if os.environ.get("LIPKERNELS_DISABLE_EXTENSION") == "1":
        _error = "disabled by LIPKERNELS_DISABLE_EXTENSION=1"
        return
    _path = _find_library()
    if _path is None:
        _error = ("the compiled extension lipkernels/_C*.so was not found; build it with "
                  "`pip install --no-build-isolation -e .` (or `make install`)")
        return
    try:
        torch.ops.load_library(_path)
    except (OSError, RuntimeError) as exc:
        _error = f"loading {_path} failed: {exc}"
        return
    _loaded = True


_load()


def loaded() -> bool:
    """True when the compiled operators are registered in ``torch.ops.lipkernels``."""
    return _loaded


def error() -> str | None:
    """Why the compiled library is not loaded (None when it is)."""
    return _error


def path() -> str | None:
    return _path


_build_info: dict | None = None


def build_info() -> dict:
    """What the library was compiled with: version, OpenMP, CUDA and its architectures,
    whether its CUDA kernels are an emulation build for the host."""
    global _build_info
    if not _loaded:
        return {}
    if _build_info is None:
        _build_info = json.loads(torch.ops.lipkernels._build_info())
    return dict(_build_info)


def cuda_emulated() -> bool:
    """True for an emulation build (LIPKERNELS_CUDA_EMULATION=1): the CUDA kernel sources
    compiled for the host, run on CPU tensors as the ``cuda`` backend."""
    return bool(build_info().get("cuda_emulation", False))


#: Why a build has no CUDA kernels: the codes setup.py / CMakeLists.txt compile in.
_NO_CUDA_REASONS = {
    "disabled_by_env": "LIPKERNELS_NO_CUDA=1 was set when it was built",
    "torch_without_cuda": "the torch it was built against has no CUDA (torch.version.cuda is None)",
    "nvcc_not_found": ("nvcc was not found when it was built (set CUDA_HOME or put nvcc on PATH, "
                       "then rebuild)"),
    "cmake_option_off": "it was configured with the CMake option LIPKERNELS_CUDA=OFF",
    "emulation_build": ("it is an emulation build (LIPKERNELS_CUDA_EMULATION): its CUDA kernels "
                        "are compiled for the host and run on CPU tensors"),
}


def cuda_reason() -> str | None:
    """Why the loaded library has no CUDA kernels (None when it has them)."""
    if not _loaded:
        return _error or "the compiled extension is not loaded"
    info = build_info()
    if info.get("cuda", False):
        return None
    code = info.get("cuda_reason", "")
    return _NO_CUDA_REASONS.get(code, f"it was built without them (reason code {code!r})"
                                if code else "it was built without them")


def cuda_archs() -> list:
    """The GPU architectures of the compiled CUDA kernels, e.g. ``['sm_80', 'sm_90']``."""
    info = build_info()
    return [a for a in info.get("cuda_archs", "").split(".") if a] if info.get("cuda") else []


def cuda_arch_mismatch(capability) -> str | None:
    """Why kernels compiled for :func:`cuda_archs` cannot run on a GPU of compute
    capability ``(major, minor)``, or None when they can (or the list is not understood)."""
    import re
    major, minor = capability
    parsed = []
    for arch in cuda_archs():
        m = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)(\+PTX)?", arch, flags=re.IGNORECASE)
        if not m:
            return None  # an unknown spelling: do not second-guess it
        parsed.append((int(m.group(1)), int(m.group(2)), m.group(3), bool(m.group(4))))
    if not parsed:
        return None
    for a_major, a_minor, suffix, ptx in parsed:
        if ptx and (a_major, a_minor) <= (major, minor):
            return None  # PTX is compiled for newer GPUs by the driver
        if suffix and (a_major, a_minor) == (major, minor):
            return None
        if not suffix and a_major == major and a_minor <= minor:
            return None  # SASS runs on the same major version, same or newer minor
    return (f"its CUDA kernels were compiled for {'.'.join(cuda_archs())}, which cannot run on "
            f"this GPU (sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST including "
            f"{major}.{minor}")
