"""Per-sample gradient norm and its fused epilogues (docs/math.md sections 2-5).

For a per-sample gradient ``g`` of shape ``(B, ...)`` and ``n_i = ||g_i||_2`` over all
non-batch dimensions:

=====================  ===========================================  ==============
op                     forward                                      returns
=====================  ===========================================  ==============
``sample_norm(g)``     ``n``                                        ``(B,)``
``gn_normalize``       ``f / (n + |f|)``                            shape of ``f``
``gran_normalize``     ``f * n / (n^2 + eps)``                      shape of ``f``
``gradient_penalty``   ``mean_i (n_i - center)^2``                  scalar
``r1_penalty``         ``mean_i n_i^2``                             scalar
=====================  ===========================================  ==============

The penalties are losses: for float16/bfloat16 ``g`` they are returned in float32
(squared norms overflow float16); the other ops return ``g``'s dtype.

Mixed precision: ``f`` and ``g`` may differ in dtype (under ``torch.autocast`` a
discriminator's ``f`` is float16/bfloat16 while the gradient of a float32 input is
float32). GN and GraN then compute in the wider dtype
(``torch.promote_types(f.dtype, g.dtype)``) and return ``f``'s dtype. Autocast is off
inside every op, so each runs in its inputs' dtypes on every backend.

Edge cases (finite input never gives NaN or Inf; docs/math.md section 10):

* ``dn_i/dg_i = g_i / n_i`` is defined as 0 where ``n_i = 0`` (as in
  ``torch.linalg.vector_norm``), so a zero gradient gets a zero gradient back;
* GN at ``f_i = 0`` and ``n_i = 0`` (0/0) is defined as 0, with zero derivatives; it is
  the only case redefined: NaN and Inf in ``f`` or ``g`` propagate as the plain formula
  does, forward and backward, on every backend;
* an empty batch (``B = 0``) gives empty outputs and gradients (the penalties: NaN,
  torch's mean of nothing);
* ``eps`` / ``center`` beyond the range of the dtype the op computes in (float64 for
  float64 ``g``, float32 otherwise), or rounding to 0 there, is a ``ValueError``.

Compiled backends read ``g`` once forward and once backward (plus one write of
``dL/dg``), accumulate in float32 for float16/bfloat16 inputs, and support
derivatives of every order (a backward taken with ``create_graph=True`` is built from
differentiable ops).
"""
from __future__ import annotations

import torch

from .. import backends
from .._epilogue import (gn_normalize_reference, gran_normalize_reference,  # noqa: F401
                         per_sample_reference, sample_norm_reference)
from . import _amp, _func, _validate

# ----------------------------------------------------------------- references
#
# The per-sample formulas live in lipkernels/_epilogue.py, below the ops and the backends
# (the Triton backend's create_graph backward and the reference's kernel object use them
# too); they are this module's references under the same names.


def gradient_penalty_reference(g: torch.Tensor, center: float = 1.0) -> torch.Tensor:
    """``mean_i (n_i - center)^2`` (WGAN-GP without its weight); float32 for half g."""
    return per_sample_reference("gp", None, g, center).mean()


def r1_penalty_reference(g: torch.Tensor) -> torch.Tensor:
    """``mean_i n_i^2`` (R1 without its gamma / 2); float32 for half g."""
    return per_sample_reference("r1", None, g, 0.0).mean()


# ----------------------------------------------------------------- dispatch

def _implementation(g: torch.Tensor):
    """The selected backend's ops (same names and signatures: its kernel object,
    lipkernels.backends), or None for the reference; under a torch.func transform, a
    compiled backend's ops as :mod:`._func` runs them, with the same kernel object's raw
    kernels."""
    impl = backends.implementation(g.device)
    return impl if impl is None or not _func.active() else _FuncOps(impl)


# A plain call (exact torch.Tensor arguments that pass every check, no torch.func
# transform or forward-mode AD, not being traced) goes straight to the backend's op: at
# (64, 3, 32, 32) the checked path's Python costs about 2.5 us of a 35 us
# forward+backward, this test about 1 us (docs/math.md section 12). Anything else takes
# the checked path, which gives the same result or the error. (Every op runs with
# autocast off, _amp.autocast_off, so autocast needs no test here.)
_Tensor = torch.Tensor
_compiling = torch.compiler.is_compiling
# |x| in [_LEAST, _MOST] is a finite non-zero float32 (docs/math.md section 10): an eps > 0
# or a center in that range passes the checks of the checked path for every dtype.
_LEAST, _MOST = 2.0 ** -126, 3.0e38


def _plain(g, f=None):
    """The backend's ops for a plain call on g (and f: (B,), g's dtype and device), or
    None: then the checked path runs."""
    if (type(g) is not _Tensor or _compiling() or _func.active() or g.dim() < 2
            or not g.is_floating_point()):
        return None
    if f is not None and (type(f) is not _Tensor or f.dtype != g.dtype or f.dim() != 1
                          or f.shape[0] != g.shape[0] or f.device != g.device):
        return None
    return backends.implementation(g.device)


def _plain_eps(x) -> bool:
    return type(x) is float and _LEAST <= x <= _MOST


def _plain_center(x) -> bool:
    return type(x) is float and (_LEAST <= abs(x) <= _MOST or x == 0.0)


class _FuncOps:
    """A compiled backend's per-sample ops through the autograd.Function of :mod:`._func`
    (usable under vmap, grad, jacrev, jacfwd), which calls the raw kernels of the
    backend's kernel object ``kern``."""

    def __init__(self, kern) -> None:
        self.kern = kern

    def sample_norm(self, g):
        return _func.per_sample(self.kern, "norm", None, g, 0.0)

    def gn_normalize(self, f, g):
        return _func.per_sample(self.kern, "gn", f, g, 0.0)

    def gran_normalize(self, f, g, eps):
        return _func.per_sample(self.kern, "gran", f, g, eps)

    def gradient_penalty(self, g, center):
        return _func.per_sample(self.kern, "gp", None, g, center).mean()

    def r1_penalty(self, g):
        return _func.per_sample(self.kern, "r1", None, g, 0.0).mean()


@_amp.autocast_off
def sample_norm(g: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm ``n_i = ||g_i||_2`` over all non-batch dims.

    Args:
        g: ``(B, ...)``, rank >= 2, floating point; any layout.
    Returns:
        ``(B,)`` in ``g``'s dtype.
    """
    impl = _plain(g)
    if impl is not None:
        return impl.sample_norm(g)
    _validate.per_sample_grad("sample_norm", g)
    impl = _implementation(g)
    return sample_norm_reference(g) if impl is None else impl.sample_norm(g)


@_amp.autocast_off
def gn_normalize(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """GN-GAN gradient normalization ``f / (||g|| + |f|)``, in ``[-1, 1]``.

    Args:
        f: discriminator outputs, ``(B,)`` or ``(B, 1)``.
        g: ``dsum(f)/dx``, ``(B, ...)``, on ``f``'s device.
    Returns:
        shape and dtype of ``f``. Defined as 0 where ``f = 0`` and ``g = 0``. With
        different dtypes, computed in the wider one (module docstring).
    """
    impl = _plain(g, f)
    if impl is not None:
        return impl.gn_normalize(f, g)
    _validate.per_sample_grad("gn_normalize", g)
    fb = _validate.scores("gn_normalize", f, g)
    if f.dtype != g.dtype:
        wide = torch.promote_types(f.dtype, g.dtype)
        return gn_normalize(f.to(wide), g.to(wide)).to(f.dtype)
    impl = _implementation(g)
    if impl is None:
        return gn_normalize_reference(f, g)
    out = impl.gn_normalize(fb, g)
    return out if fb is f else out.view(f.shape)


@_amp.autocast_off
def gran_normalize(f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """GraN-GAN piecewise gradient normalization ``f * ||g|| / (||g||^2 + eps)``.

    Args:
        f: ``(B,)`` or ``(B, 1)``; g: ``(B, ...)``; eps: finite number > 0.
    Returns:
        shape and dtype of ``f`` (with different dtypes, computed in the wider one).
    """
    impl = _plain(g, f) if _plain_eps(eps) else None
    if impl is not None:
        return impl.gran_normalize(f, g, eps)
    _validate.per_sample_grad("gran_normalize", g)
    fb = _validate.scores("gran_normalize", f, g)
    eps = _validate.positive("gran_normalize", "eps", eps)
    if f.dtype != g.dtype:
        wide = torch.promote_types(f.dtype, g.dtype)
        return gran_normalize(f.to(wide), g.to(wide), eps).to(f.dtype)
    eps = _validate.fits("gran_normalize", "eps", eps, g.dtype, "g")
    impl = _implementation(g)
    if impl is None:
        return gran_normalize_reference(f, g, eps)
    out = impl.gran_normalize(fb, g, eps)
    return out if fb is f else out.view(f.shape)


@_amp.autocast_off
def gradient_penalty(g: torch.Tensor, center: float = 1.0) -> torch.Tensor:
    """WGAN-GP epilogue ``mean_i (||g_i|| - center)^2`` (multiply by the weight yourself,
    or use :func:`lipkernels.gradient_penalty`, which takes the critic)."""
    impl = _plain(g) if _plain_center(center) else None
    if impl is not None:
        return impl.gradient_penalty(g, center)
    _validate.per_sample_grad("gradient_penalty", g)
    center = _validate.fits("gradient_penalty", "center",
                            _validate.finite("gradient_penalty", "center", center), g.dtype, "g")
    impl = _implementation(g)
    return gradient_penalty_reference(g, center) if impl is None else impl.gradient_penalty(g, center)


@_amp.autocast_off
def r1_penalty(g: torch.Tensor) -> torch.Tensor:
    """R1 epilogue ``mean_i ||g_i||^2`` (multiply by gamma / 2 yourself, or use
    :func:`lipkernels.r1_penalty`, which takes the discriminator)."""
    impl = _plain(g)
    if impl is not None:
        return impl.r1_penalty(g)
    _validate.per_sample_grad("r1_penalty", g)
    impl = _implementation(g)
    return r1_penalty_reference(g) if impl is None else impl.r1_penalty(g)
