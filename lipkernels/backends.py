"""Which backends exist here, which one runs an op, and the fallback rules.

Backends:

``reference``
    Plain differentiable PyTorch written from MATH.md. Always available, any device.
``cpu``
    The C++ kernels of the compiled extension, for CPU tensors.
``cuda``
    Hand-written CUDA kernels of the compiled extension, for CUDA tensors.
``triton``
    Triton kernels, for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

``auto`` (the default) picks, for the device of an op's tensors, the first available
backend of :data:`AUTO_ORDER` and falls back to ``reference``. A backend named
explicitly (:func:`set_backend`, :func:`use_backend`) must be available, and must
run on the device of the tensors it is given, else a ``RuntimeError`` says why.

The choice is process-wide, like ``torch.backends`` flags (a plain module global,
which ``torch.compile`` reads and guards on, so a compiled function recompiles when
the backend changes).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch

from . import _extension

BACKENDS: Tuple[str, ...] = ("reference", "cpu", "cuda", "triton")

#: Preference of ``auto`` per device type; ``reference`` closes every list.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

#: Device types each backend runs on.
DEVICES: Dict[str, Tuple[str, ...]] = {
    "reference": ("*",),
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    "triton": ("cuda",),  # and "cpu" under TRITON_INTERPRET=1 (lipkernels.triton.devices)
}

_current: str = "auto"
_status_cache: Dict[str, Tuple[bool, str]] = {}


def _probe(name: str) -> Tuple[bool, str]:
    if name == "reference":
        return True, ""
    if name == "cpu":
        if not _extension.loaded():
            return False, _extension.error() or "the compiled extension is not loaded"
        return True, ""
    if name == "cuda":
        if not _extension.loaded():
            return False, _extension.error() or "the compiled extension is not loaded"
        why = _extension.cuda_reason()
        if why is not None:
            return False, f"the compiled extension has no CUDA kernels: {why}"
        if not torch.cuda.is_available():
            return False, ("the extension has CUDA kernels, but torch.cuda.is_available() is False "
                           "(no GPU visible, or the driver is missing)")
        mismatch = _extension.cuda_arch_mismatch(torch.cuda.get_device_capability())
        if mismatch is not None:
            return False, mismatch
        return True, ""
    if name == "triton":
        from . import triton as triton_backend
        return triton_backend.status()
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def backend_status() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason_if_not)}`` for every backend."""
    for name in BACKENDS:
        if name not in _status_cache:
            _status_cache[name] = _probe(name)
    return dict(_status_cache)


def is_available(name: str) -> bool:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return backend_status()[name][0]


def available_backends() -> List[str]:
    """Backends that work in this process, e.g. ``['reference', 'cpu']``."""
    return [name for name, (ok, _) in backend_status().items() if ok]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {name!r}")
    if name != "auto":
        ok, why = backend_status()[name]
        if not ok:
            raise RuntimeError(f"lipkernels backend {name!r} is not available: {why}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for all later calls (``'auto'`` restores the default)."""
    global _current
    _current = _check_name(name)


def get_backend() -> str:
    """The selected backend: ``'auto'`` or a backend name."""
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with backend ``name`` selected, then restore the previous choice."""
    global _current
    previous = _current
    _current = _check_name(name)
    try:
        yield
    finally:
        _current = previous


_auto_choice: Dict[str, str] = {}


def _auto(device_type: str) -> str:
    for candidate in AUTO_ORDER.get(device_type, ("reference",)):
        if backend_status()[candidate][0]:
            return candidate
    return "reference"


def select(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``, following the rules above."""
    name = _current
    device_type = device.type
    if name == "auto":
        choice = _auto_choice.get(device_type)
        if choice is None:
            choice = _auto_choice[device_type] = _auto(device_type)
        return choice
    devices = DEVICES[name]
    if name == "triton":
        from . import triton as triton_backend
        devices = triton_backend.devices()
    if "*" not in devices and device_type not in devices:
        raise RuntimeError(f"lipkernels backend {name!r} runs on {'/'.join(devices)} tensors, "
                           f"but the tensors are on {device}")
    return name
