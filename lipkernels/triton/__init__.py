"""The Triton backend: kernels for CUDA tensors, and for CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``, set before lipkernels is imported), which
is how CI runs them.

The kernel modules (``sample_norm``, ``spectral_norm``) are imported on first use, so
``import lipkernels`` does not import Triton.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

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


def implementations():
    """The Triton backend's ops for the backend table (lipkernels.backends); weight
    clipping has no Triton kernel (the op's multi-tensor torch._foreach call runs)."""
    from .. import backends
    from . import sample_norm, spectral_norm
    return backends.namespace(
        sample_norm=sample_norm.sample_norm, gn_normalize=sample_norm.gn_normalize,
        gran_normalize=sample_norm.gran_normalize, gradient_penalty=sample_norm.gradient_penalty,
        r1_penalty=sample_norm.r1_penalty, power_iteration=spectral_norm.power_iteration,
        spectral_normalize=spectral_norm.spectral_normalize)
