"""Functional API: the fused ops, each dispatched to the selected backend.

Every op has a plain-PyTorch reference (``*_reference``) beside it, written from
docs/math.md; the tests hold every backend to it.
"""
from .. import _batching
from . import _fake, _func
from .clip import clip_, clip_reference
from .sample_norm import (gn_normalize, gn_normalize_reference, gradient_penalty,
                          gradient_penalty_reference, gran_normalize, gran_normalize_reference,
                          r1_penalty, r1_penalty_reference, sample_norm, sample_norm_reference)
from .spectral_norm import (power_iteration, power_iteration_reference, spectral_normalize,
                            spectral_normalize_reference)

_fake.register()
for _ns in _fake.namespaces():
    _batching.register(_ns)  # batching rules of the kernel ops (torch.func.vmap)

__all__ = [
    "power_iteration", "spectral_normalize", "sample_norm", "gn_normalize", "gran_normalize",
    "gradient_penalty", "r1_penalty", "clip_",
    "power_iteration_reference", "spectral_normalize_reference", "sample_norm_reference",
    "gn_normalize_reference", "gran_normalize_reference", "gradient_penalty_reference",
    "r1_penalty_reference", "clip_reference",
]
