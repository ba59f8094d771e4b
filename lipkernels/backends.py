"""Which backends exist here, which one runs an op, and the fallback rules: one table.

Every backend is one :class:`Backend` entry of :data:`TABLE`: its name, a probe that
says whether it works in this process (and why not), the device types it runs on here,
and its *kernel object*: the one object through which everything reaches that backend's
kernels. A kernel object has

* the backend's public ops, with their autograd (the same names and signatures for
  every backend, see :data:`OPS`), which an op's plain path calls: an op asks
  :func:`implementation` for the ones that run on its tensors' device;
* the raw kernel entry points, without autograd, the same for every backend:
  ``norm_epilogue(g, f, epilogue, param) -> (out, norm)``,
  ``norm_epilogue_backward(go, g, f, norm, epilogue, param) -> (grad_f or empty(0),
  grad_g)``, and for the compiled backends ``sn_forward(ws, us, vs, iters, eps) ->
  (W_sn list, sigmas, uv)``, ``sn_backward(grads, ws, uv, sigmas, eps) -> list``; the
  torch.func rules (lipkernels/ops/_func.py) and the JVP steps (lipkernels/nn) call
  them, getting the object from :func:`kernels` (or, in the ops, :func:`implementation`:
  the same object).

The kernel objects live beside their backends (lipkernels/_cpp_kernels.py,
lipkernels/triton, lipkernels/_epilogue.py for the reference), never in lipkernels/ops,
which reaches every backend through this table; adding a backend is one entry here.

Backends:

``reference``
    Plain differentiable PyTorch written from ``docs/math.md``. Always available, any
    device. Its ops are the formulas beside each op in lipkernels.ops
    (:func:`implementation` is None); its kernel object has the per-sample raw kernels,
    written with torch ops.
``cpu``
    The C++ kernels of the compiled extension, for CPU tensors.
``cuda``
    The hand-written CUDA kernels of the compiled extension, for CUDA tensors; in an
    emulation build (``LIPKERNELS_CUDA_EMULATION=1``) the same kernel sources compiled
    for the host, for CPU tensors (a correctness tool, never picked by ``auto``).
``triton``
    Triton kernels, for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

``auto`` (the default) picks, for the device of an op's tensors, the first available
backend of :data:`AUTO_ORDER` that runs on that device and falls back to ``reference``.
A backend named explicitly (:func:`set_backend`, :func:`use_backend`) must be available,
and must run on the device of the tensors it is given, else a ``RuntimeError`` says why.

The choice is process-wide, like ``torch.backends`` flags (a plain module global,
which ``torch.compile`` reads and guards on, so a compiled function recompiles when
the backend changes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import _cpp_kernels, _epilogue, _extension

#: The public ops every compiled backend's kernel object provides (``clip_`` may be
#: missing: the op then uses the reference's multi-tensor ``torch._foreach`` call).
OPS: Tuple[str, ...] = ("sample_norm", "gn_normalize", "gran_normalize", "gradient_penalty",
                        "r1_penalty", "power_iteration", "spectral_normalize", "clip_")


@dataclass(frozen=True)
class Backend:
    """One row of the backend table."""
    name: str
    #: () -> (available, reason if not); called once per process.
    probe: Callable[[], Tuple[bool, str]]
    #: () -> device types it runs on here ("*": any).
    devices: Callable[[], Tuple[str, ...]]
    #: device type -> its kernel object (module docstring); the same object on every call.
    kernels: Callable[[str], object]
    #: How ``lipkernels info`` describes it when available.
    describe: Callable[[], str] = lambda: "available"


# ----------------------------------------------------------------- the rows

def _compiled() -> Tuple[bool, str]:
    if not _extension.loaded():
        return False, _extension.error() or "the compiled extension is not loaded"
    return True, ""


def _cuda_probe() -> Tuple[bool, str]:
    ok, why = _compiled()
    if not ok:
        return ok, why
    if _extension.cuda_emulated():
        return True, ""
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


def _cuda_devices() -> Tuple[str, ...]:
    return ("cpu",) if _extension.cuda_emulated() else ("cuda",)


def _cpu_kernels(device_type: str):
    return _cpp_kernels.kernels("lipkernels", OPS)


def _cuda_kernels(device_type: str):
    # The emulation build registers the CUDA kernels' ops under a namespace of their own
    # for CPU tensors (the CPU kernels keep torch.ops.lipkernels on CPU tensors).
    return _cpp_kernels.kernels("lipkernels_cuda_emu" if _extension.cuda_emulated() else "lipkernels",
                                OPS)


def _triton_probe() -> Tuple[bool, str]:
    from . import triton as triton_backend
    return triton_backend.status()


def _triton_devices() -> Tuple[str, ...]:
    from . import triton as triton_backend
    return triton_backend.devices()


def _triton_kernels(device_type: str):
    from . import triton as triton_backend
    return triton_backend.kernels()


TABLE: Tuple[Backend, ...] = (
    Backend("reference", lambda: (True, ""), lambda: ("*",),
            lambda device_type: _epilogue.REFERENCE_KERNELS),
    Backend("cpu", _compiled, lambda: ("cpu",), _cpu_kernels),
    Backend("cuda", _cuda_probe, _cuda_devices, _cuda_kernels,
            lambda: ("available (emulated on the CPU: the CUDA kernel sources built for the host, "
                     "for CPU tensors)") if _extension.cuda_emulated() else "available"),
    Backend("triton", _triton_probe, _triton_devices, _triton_kernels,
            lambda: ("available (interpreted on the CPU: TRITON_INTERPRET=1)"
                     if "cpu" in _triton_devices() else "available")),
)

BACKENDS: Tuple[str, ...] = tuple(b.name for b in TABLE)
_BY_NAME: Dict[str, Backend] = {b.name: b for b in TABLE}

#: Preference of ``auto`` per device type; ``reference`` closes every list. A backend
#: listed here is used only where it runs on that device type (the emulated CUDA and
#: interpreted Triton backends, which run on CPU tensors, are correctness tools and are
#: never in the ``cpu`` list).
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_current: str = "auto"
_status_cache: Dict[str, Tuple[bool, str]] = {}
_devices_cache: Dict[str, Tuple[str, ...]] = {}
#: (selected name, device type) -> (backend name, its ops for :func:`implementation`: the
#: kernel object, None for the reference; the kernel object).
_choice_cache: Dict[Tuple[str, str], Tuple[str, Optional[object], object]] = {}


def backend(name: str) -> Backend:
    """The table row of backend ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}") from None


def backend_status() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason_if_not)}`` for every backend."""
    for row in TABLE:
        if row.name not in _status_cache:
            _status_cache[row.name] = row.probe()
    return dict(_status_cache)


def devices(name: str) -> Tuple[str, ...]:
    """Device types backend ``name`` runs on in this process (``"*"``: any)."""
    if name not in _devices_cache:
        _devices_cache[name] = backend(name).devices()
    return _devices_cache[name]


def describe(name: str) -> str:
    """``available`` (with how it runs, e.g. emulated), or ``unavailable: why``."""
    ok, why = backend_status()[backend(name).name]
    return backend(name).describe() if ok else "unavailable: " + why


def is_available(name: str) -> bool:
    backend(name)
    return backend_status()[name][0]


def available_backends() -> List[str]:
    """Backends that work in this process, e.g. ``['reference', 'cpu']``."""
    return [name for name, (ok, _) in backend_status().items() if ok]


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend ``name`` (available or not) runs on tensors of ``device_type``."""
    found = devices(name)
    return "*" in found or device_type in found


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


def swap(name: str) -> str:
    """Selects ``name``, already checked (the benchmark's per-call switch: no checks);
    returns the previous choice."""
    global _current
    previous, _current = _current, name
    return previous


def _auto(device_type: str) -> str:
    for candidate in AUTO_ORDER.get(device_type, ("reference",)):
        if backend_status()[candidate][0] and runs_on(candidate, device_type):
            return candidate
    return "reference"


def _choose(name: str, device_type: str) -> Tuple[str, Optional[object], object]:
    if name == "auto":
        name = _auto(device_type)
    elif not runs_on(name, device_type):
        raise RuntimeError(f"lipkernels backend {name!r} runs on {'/'.join(devices(name))} tensors "
                           f"here, but the tensors are on {device_type}")
    kern = backend(name).kernels(device_type)
    # The reference's ops are the formulas beside each op (None keeps the ops' code simple).
    return name, (None if name == "reference" else kern), kern


def _lookup(device: torch.device) -> Tuple[str, Optional[object], object]:
    key = (_current, device.type)
    found = _choice_cache.get(key)
    if found is None:
        found = _choose(*key)
        _choice_cache[key] = found
    return found


def select(device: torch.device) -> str:
    """The name of the backend that runs an op on tensors of ``device``, by the rules above."""
    return _lookup(device)[0]


def implementation(device: torch.device) -> Optional[object]:
    """The ops of the backend that runs an op on tensors of ``device``: its kernel object
    (with the functions of :data:`OPS`; the object :func:`kernels` returns), or None when
    that backend is the reference."""
    return _lookup(device)[1]


def kernels(device: torch.device):
    """The kernel object of the backend that runs an op on tensors of ``device`` (the
    reference's too): its raw kernel entry points (per-sample ``norm_epilogue`` /
    ``norm_epilogue_backward``; the compiled backends also ``sn_forward`` /
    ``sn_backward``), without autograd, for callers that differentiate by other means
    (the torch.func rules, the JVP steps). For every backend but the reference, the
    object :func:`implementation` returns."""
    return _lookup(device)[2]
