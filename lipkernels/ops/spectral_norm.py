"""Batched spectral normalization (docs/math.md section 1).

A list of layers is processed in one call: each weight ``w`` is viewed as the
matrix ``W = w.flatten(1)`` of shape ``(m, k)`` (move the normalized dim to the front
first, as ``lipkernels.spectral_norm`` does for transposed convolutions), with unit
vectors ``u`` ``(m,)`` and ``v`` ``(k,)`` kept by the caller and updated in place in
torch's order (u first, then v):

    repeat n_power_iterations times:  u <- normalize(W v);  v <- normalize(W^T u)
    sigma = u^T W v;  W_sn = W / sigma

``normalize(x) = x / max(||x||, eps)`` as in ``torch.nn.functional.normalize``. The
derivative treats ``u`` and ``v`` as constants, as torch does:
``dL/dW = (G - <G, W_sn> u v^T) / sigma``.

Compiled backends read each ``W`` once per iteration (``t = W v`` and ``W^T t`` from the
same rows) and get ``sigma = ||W^T u||`` without another pass.

Edge case: where ``|sigma| < eps`` (an all-zero weight) the divisor is ``eps``, so
``W_sn`` stays finite (torch gives NaN there); elsewhere the results are torch's.
Sigmas are float32 for float16/bfloat16 weights.

Complex weights (complex64, complex128) are computed as torch does, with the conjugate
transpose: ``v <- normalize(W^H u)``, ``sigma = u^H W v`` (complex in general). Only the
reference has them: ``auto`` sends complex weights to it, and a compiled backend selected
explicitly raises an error naming the backend and the dtype.

Autocast is off inside these ops: they run in the weights' dtype on every backend.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from .. import _layout, backends
from . import _amp, _func, _validate


# ----------------------------------------------------------------- references

@torch.no_grad()
def power_iteration_reference(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                              vs: Sequence[torch.Tensor], n_power_iterations: int = 1,
                              eps: float = 1e-12) -> torch.Tensor:
    """torch's ``_SpectralNorm._power_method``, then ``sigma = u^H W v``, per layer
    (``W^H`` = ``W^T`` for real weights; complex sigmas keep the weights' dtype)."""
    sigmas = []
    for w, u, v in zip(weights, us, vs):
        mat = w.flatten(1)
        for _ in range(n_power_iterations):
            u.copy_(F.normalize(torch.mv(mat, v), dim=0, eps=eps))
            v.copy_(F.normalize(torch.mv(mat.mH, u), dim=0, eps=eps))
        sigma = torch.vdot(u, torch.mv(mat, v))
        sigmas.append(sigma if w.is_complex() else sigma.to(_layout.acc_dtype(w.dtype)))
    if not sigmas:
        return torch.empty(0)
    return torch.stack(sigmas)


def spectral_normalize_reference(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                                 vs: Sequence[torch.Tensor], n_power_iterations: int = 1,
                                 eps: float = 1e-12, training: bool = True) -> List[torch.Tensor]:
    """torch.nn.utils.parametrizations.spectral_norm's forward for each layer."""
    out = []
    for w, u, v in zip(weights, us, vs):
        mat = w.flatten(1)
        if training:
            power_iteration_reference([w.detach()], [u], [v], n_power_iterations, eps)
        u_c = u.clone(memory_format=torch.contiguous_format)
        v_c = v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u_c, torch.mv(mat, v_c))
        sigma = torch.where(sigma.abs() < eps, torch.full_like(sigma, eps), sigma)
        out.append(w / sigma)
    return out


# ----------------------------------------------------------------- dispatch

def _implementation(op: str, weights):
    """The selected backend's ops for the weights' device (its kernel object,
    lipkernels.backends; under a transform :mod:`._func` calls its raw kernels), or None
    for the reference.
    Complex weights: the reference under ``auto``; an explicitly selected compiled
    backend, which has no complex kernels, raises."""
    device = weights[0].device
    if not weights[0].is_complex():
        return backends.implementation(device)
    name = backends.select(device)
    if backends.get_backend() != "auto" and name != "reference":
        raise RuntimeError(f"{op}: the lipkernels backend {name!r} has no kernels for complex "
                           f"weights (got {weights[0].dtype}); select 'auto' or 'reference', "
                           "which compute complex spectral norms as torch does")
    return None


def _check(op: str, weights, us, vs, n_power_iterations, eps):
    _validate.spectral_batch(op, weights, us, vs)
    _validate.non_negative_int(op, "n_power_iterations", n_power_iterations)
    eps = _validate.positive(op, "eps", eps)
    return _validate.fits(op, "eps", eps, weights[0].dtype, "weights") if weights else eps


@_amp.autocast_off
def power_iteration(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                    vs: Sequence[torch.Tensor], n_power_iterations: int = 1,
                    eps: float = 1e-12) -> torch.Tensor:
    """Run ``n_power_iterations`` power iterations on every layer, in place.

    Args:
        weights: L tensors of rank >= 2, each viewed as ``w.flatten(1)`` (m, k);
            one dtype and device for all (floating point, or complex: computed by the
            reference, see the module docstring). Not differentiated.
        us: L contiguous vectors (m,), updated in place.
        vs: L contiguous vectors (k,), updated in place.
        n_power_iterations: >= 0; with 0, only ``sigma = u^T W v`` is computed.
        eps: > 0, the floor of every norm divided by.
    Returns:
        ``sigmas``, shape ``(L,)``: ``u^T W v`` with the updated vectors.
    """
    eps = _check("power_iteration", weights, us, vs, n_power_iterations, eps)
    if not weights:
        return torch.empty(0)
    detached = [w.detach() for w in weights]
    impl = _implementation("power_iteration", weights)
    if _func.active():
        # Under a torch.func transform (vmap, grad, ...): see ops/_func.py.
        if impl is None:
            return _func.power_iteration_reference(detached, us, vs, n_power_iterations, eps)
        return _func.power_iteration(impl, detached, us, vs, n_power_iterations, eps)
    with torch.no_grad():
        if impl is None:
            return power_iteration_reference(detached, us, vs, n_power_iterations, eps)
        return impl.power_iteration(detached, list(us), list(vs), n_power_iterations, eps)


def spectral_normalize(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                       vs: Sequence[torch.Tensor], n_power_iterations: int = 1,
                       eps: float = 1e-12, training: bool = True) -> List[torch.Tensor]:
    """``W_sn = W / sigma(W)`` for every layer, differentiable in the weights.

    In training mode runs ``n_power_iterations`` iterations first (updating ``us``,
    ``vs`` in place); in eval mode (``training=False``) uses the stored vectors.
    Arguments as in :func:`power_iteration`. Returns one tensor per weight, of the
    weight's shape. All layers go through one call of the compiled kernels, forward
    and backward.
    """
    eps = _check("spectral_normalize", weights, us, vs, n_power_iterations, eps)
    return spectral_normalize_unchecked(weights, us, vs, n_power_iterations, eps, training)


@_amp.autocast_off
def spectral_normalize_unchecked(weights, us, vs, n_power_iterations: int, eps: float,
                                 training: bool) -> List[torch.Tensor]:
    """:func:`spectral_normalize` without the Python argument checks, for callers whose
    arguments are right by construction (the layers); the kernels still check."""
    if not weights:
        return []
    impl = _implementation("spectral_normalize", weights)
    if _func.active():
        # Under a torch.func transform (vmap, grad, ...): see ops/_func.py.
        if impl is None:
            return _func.spectral_normalize_reference(weights, us, vs, n_power_iterations, eps,
                                                      training)
        return _func.spectral_normalize(impl, weights, us, vs, n_power_iterations, eps, training)
    if impl is None:
        return spectral_normalize_reference(weights, us, vs, n_power_iterations, eps, training)
    return impl.spectral_normalize(list(weights), list(us), list(vs), n_power_iterations, eps,
                                   bool(training))
