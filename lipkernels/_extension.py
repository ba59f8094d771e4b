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


def build_info() -> dict:
    """What the library was compiled with: version, OpenMP, CUDA and its architectures."""
    if not _loaded:
        return {}
    return json.loads(torch.ops.lipkernels._build_info())
