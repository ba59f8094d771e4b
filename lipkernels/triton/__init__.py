"""The Triton backend: kernels for CUDA tensors, and for CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``, set before lipkernels is imported), which
is how CI runs them.

The kernel modules (``sample_norm``, ``spectral_norm``) are imported on first use (by
:func:`kernels`, when the backend is first selected for an op), so ``import lipkernels``
does not import Triton. They import nothing of lipkernels.ops: the helpers they share
with it (lipkernels/_layout.py, _epilogue.py, _batching.py) sit below both.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Tuple

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def status() -> Tuple[bool, str]:
    """(available, reason if not)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if interpreting():
        return True, ""
    if not torch.cuda.is_available():
        return False, ("no CUDA device (set TRITON_INTERPRET=1 before importing lipkernels to run "
                       "the Triton kernels on CPU tensors with the interpreter)")
    return True, ""


def devices() -> Tuple[str, ...]:
    """Device types the Triton kernels run on here."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


class TritonKernels:
    """The Triton backend's kernel object (the ``triton`` row of lipkernels.backends.TABLE):
    its public ops (lipkernels.backends.OPS; weight clipping has no Triton kernel, so the
    op's multi-tensor torch._foreach call runs), and the raw kernel entry points every
    backend's kernel object has (``norm_epilogue``, ``norm_epilogue_backward``,
    ``sn_forward``, ``sn_backward``: the custom ops of ``lipkernels_triton::``, called
    where autograd does not record them, in the calling convention of the compiled
    extension's kernel object, lipkernels/_cpp_kernels.py: lists of weights, not flat
    buffers).

    Made on the first use of the backend: that imports the kernel modules, and Triton."""

    def __init__(self) -> None:
        from . import sample_norm, spectral_norm
        self.tsn, self.tspec = sample_norm, spectral_norm
        self.sample_norm = sample_norm.sample_norm
        self.gn_normalize = sample_norm.gn_normalize
        self.gran_normalize = sample_norm.gran_normalize
        self.gradient_penalty = sample_norm.gradient_penalty
        self.r1_penalty = sample_norm.r1_penalty
        self.power_iteration = spectral_norm.power_iteration
        self.spectral_normalize = spectral_norm.spectral_normalize

    def __repr__(self) -> str:
        return "<lipkernels kernels of the triton backend>"

    def norm_epilogue(self, g, f, epilogue, param):
        return self.tsn.norm_epilogue(g, f, epilogue, param)

    def norm_epilogue_backward(self, go, g, f, norm, epilogue, param):
        return self.tsn.norm_epilogue_backward(go, g, f, norm, epilogue, param)

    def sn_forward(self, ws, us, vs, iters, eps):
        flat, sigmas, uv = self.tspec.sn_forward(ws, us, vs, iters, eps)
        return self.tspec._split(flat, ws), sigmas, uv

    def sn_backward(self, grads, ws, uv, sigmas, eps):
        flat = torch.cat([g.reshape(-1) for g in grads])
        return self.tspec._split(self.tspec.sn_backward(flat, ws, uv, sigmas, eps), ws)


_kernels: Dict[str, TritonKernels] = {}


def kernels() -> TritonKernels:
    """The backend's kernel object (one per process), for the backend table
    (lipkernels.backends)."""
    found = _kernels.get("triton")
    if found is None:
        # setdefault: threads making it at once all get the one that is kept.
        found = _kernels.setdefault("triton", TritonKernels())
    return found
