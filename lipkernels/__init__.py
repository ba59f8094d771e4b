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

from . import _extension, losses, nn, ops  # noqa: F401
from ._version import __version__
from .backends import available_backends, backend_status, get_backend, set_backend, use_backend
from .nn import gradient_penalty, r1_penalty, spectral_norm


def clip_weights_(module, c: float) -> None:
    """WGAN weight clipping: clamp every parameter of ``module`` (or an iterable of
    tensors) to ``[-c, c]`` in place, in one multi-tensor call."""
    params: Iterable[torch.Tensor]
    params = module.parameters() if isinstance(module, torch.nn.Module) else module
    ops.clip_(params, c)


__all__ = [
    "__version__", "ops", "nn", "losses", "available_backends", "backend_status",
    "set_backend", "get_backend", "use_backend", "spectral_norm", "gradient_penalty",
    "r1_penalty", "clip_weights_",
]
