"""lipkernels: fused kernels for Lipschitz-constrained GAN discriminators.

* ``lipkernels.ops``: the fused functional ops (batched power iteration and spectral
  normalization, per-sample gradient norm with the GN / GraN / GP / R1 epilogues,
  weight clipping), each with its plain-PyTorch reference.
* ``lipkernels.nn``: drop-in layers (``spectral_norm``, ``SNConv2d``, ...,
  ``SpectralNormGroup``, ``GradNorm``, ``GraN``) and penalties.
* ``lipkernels.losses``: hinge, Wasserstein and non-saturating losses.
* Backends: :func:`available_backends`, :func:`set_backend`, :func:`use_backend`.
"""
from __future__ import annotations

from typing import Iterable

import torch

from . import _extension, losses, models, nn, ops  # noqa: F401
from ._version import __version__
from .backends import available_backends, backend_status, get_backend, set_backend, use_backend
from .nn import gradient_penalty, r1_penalty, spectral_norm


def clip_weights_(module, c: float) -> None:
    """WGAN weight clipping: clamp every parameter of ``module`` (or an iterable of
    tensors) to ``[-c, c]`` in place, in one multi-tensor call."""
    params: Iterable[torch.Tensor]
    params = module.parameters() if isinstance(module, torch.nn.Module) else module
    ops.clip_(params, c)


def empty_cache() -> None:
    """Release the CPU kernels' cache of freed output blocks (see README: the cache keeps
    up to ``LIPKERNELS_CPU_CACHE_MB`` MiB, default 1024, so training steps reuse memory)."""
    if _extension.loaded():
        torch.ops.lipkernels._cpu_output_cache_clear()


def cpu_cache_bytes() -> int:
    """Bytes held by the CPU kernels' cache of freed output blocks."""
    return int(torch.ops.lipkernels._cpu_output_cache_bytes()) if _extension.loaded() else 0


__all__ = [
    "__version__", "ops", "nn", "losses", "models", "available_backends", "backend_status",
    "set_backend", "get_backend", "use_backend", "spectral_norm", "gradient_penalty",
    "r1_penalty", "clip_weights_", "empty_cache", "cpu_cache_bytes",
]
