"""The per-sample epilogues (docs/math.md sections 2-5) written with torch ops: the
formulas every backend is held to, their partial derivatives, and the reference
backend's kernel object.

These sit below both the ops and the backends: :mod:`lipkernels.ops.sample_norm`
re-exports the references under the same names (they are its ``*_reference`` ops), the
Triton backend differentiates :func:`per_sample_reference` for a backward taken with
``create_graph=True``, the torch.func rules (:mod:`lipkernels.ops._func`) use
:func:`_epilogue_partials`, and :data:`REFERENCE_KERNELS` is the ``reference`` row's
kernel object in :data:`lipkernels.backends.TABLE`. None of them imports
:mod:`lipkernels.ops` or a backend, so no import circle runs through them.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _layout


def _acc_norm(g: torch.Tensor) -> torch.Tensor:
    """n in the accumulation dtype (float32 for half-precision g, as the kernels), so a
    norm beyond float16's range does not become Inf before the epilogue (nor in the
    backward, whose g / n stays finite)."""
    return torch.linalg.vector_norm(g.to(_layout.acc_dtype(g.dtype)), dim=tuple(range(1, g.dim())))


def sample_norm_reference(g: torch.Tensor) -> torch.Tensor:
    """``n_i = ||g_i||_2`` over all non-batch dims, plain PyTorch; computed in the
    accumulation dtype, returned in g's."""
    return _acc_norm(g).to(g.dtype)


def gn_normalize_reference(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``f / (n + |f|)``, 0 where ``n + |f| = 0`` exactly (NaN stays NaN). ``f``: (B,) or
    (B, 1). Computed in the accumulation dtype, returned in f's."""
    n = _acc_norm(g)
    fb = f.reshape(-1).to(n.dtype)
    d = n + fb.abs()
    zero = d == 0
    out = torch.where(zero, torch.zeros_like(fb), fb / torch.where(zero, torch.ones_like(d), d))
    return out.to(f.dtype).reshape(f.shape)


def gran_normalize_reference(f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``f * (n / (n^2 + eps))``, in the accumulation dtype, returned in f's."""
    n = _acc_norm(g)
    return (f.reshape(-1).to(n.dtype) * (n / (n * n + eps))).to(f.dtype).reshape(f.shape)


def _loss_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float64 if g.dtype == torch.float64 else torch.float32


def per_sample_reference(epilogue: str, f, g: torch.Tensor, param: float) -> torch.Tensor:
    """The per-sample output of an epilogue ('norm', 'gn', 'gran', 'gp', 'r1') before any
    batch mean (f: (B,) or None); the penalties' squared norms in float32/float64."""
    if epilogue == "norm":
        return sample_norm_reference(g)
    if epilogue == "gn":
        return gn_normalize_reference(f, g)
    if epilogue == "gran":
        return gran_normalize_reference(f, g, param)
    if epilogue == "gp":
        return (_acc_norm(g) - param) ** 2
    if epilogue == "r1":
        # x * x, not x.square(): its backward, go * x + go * x, does not overflow where
        # the result does not (square's computes 2 * x first).
        x = g.to(_loss_dtype(g))
        return (x * x).sum(dim=tuple(range(1, g.dim())))
    raise ValueError(f"unknown epilogue {epilogue!r}")


# ----------------------------------------------------------------- partial derivatives

def _dims(g: torch.Tensor) -> Tuple[int, ...]:
    return tuple(range(1, g.dim()))


def _per_sample_view(c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return c.reshape((-1,) + (1,) * (g.dim() - 1))


def _epilogue_partials(epilogue: str, f, n, param):
    """(dE/df or None, (dE/dn) / n) of the epilogue E(f, n), per sample, with the
    guards and special values of csrc/epilogue.h (dn/dg = g / n is 0 where n = 0, a NaN n
    stays NaN; GN's 0/0 is 0, the only redefined case; where an input is not finite, the
    plain formula's chain rule, docs/math.md section 10)."""
    nz = n != 0
    inv_n = nz.to(n.dtype) / torch.where(nz, n, torch.ones_like(n))
    if epilogue == "norm":
        return None, inv_n
    if epilogue == "gn":
        d = n + f.abs()
        dzero = d == 0
        d_safe = torch.where(dzero, torch.ones_like(d), d)
        dn = torch.where(dzero, torch.zeros_like(d), -((f / d_safe) / d_safe))
        df = torch.where(d.isfinite(), (n / d_safe) / d_safe, 1 / d_safe + dn * f.sgn())
        return torch.where(dzero, torch.zeros_like(d), df), dn * inv_n
    if epilogue == "gran":
        q = n * n + param
        r = n / q
        dn = torch.where(q.isfinite() & f.isfinite(), f * ((param - n * n) / q / q),
                         f / q - 2 * (f * (r / q)) * n)
        return r, dn * inv_n
    if epilogue == "gp":
        return None, 2 * (n - param) * inv_n
    if epilogue == "r1":
        return None, torch.full_like(n, 2.0)
    raise ValueError(f"unknown epilogue {epilogue!r}")


# ----------------------------------------------------------------- the reference's kernel object

class ReferenceKernels:
    """The reference backend's kernel object (lipkernels.backends.kernels): the
    per-sample entry points of the compiled backends' kernel objects, written with torch
    ops (no autograd of their own is needed: callers use them on tensors without a
    graph). No ``sn_forward`` / ``sn_backward``: every caller of those (the torch.func
    rules of lipkernels/ops/_func.py) runs the reference's own formulas for the
    reference. No public ops either: ``backends.implementation`` is None for the
    reference, whose ops are the formulas beside each op in lipkernels.ops."""

    @staticmethod
    def norm_epilogue(g, f, epilogue, param):
        acc = _layout.acc_dtype(g.dtype)
        n = torch.linalg.vector_norm(g.to(acc), dim=_dims(g))
        out = per_sample_reference(epilogue, f, g, param)
        return out.to(_layout.epilogue_out_dtype(epilogue, g.dtype)), n

    @staticmethod
    def norm_epilogue_backward(go, g, f, norm, epilogue, param):
        acc = norm.dtype
        a, c = _epilogue_partials(epilogue, f.to(acc) if f is not None else None, norm, param)
        goa = go.to(acc)
        grad_g = (_per_sample_view(goa * c, g) * g.to(acc)).to(g.dtype)
        grad_f = (goa * a).to(f.dtype) if f is not None else g.new_empty(0)
        return grad_f, grad_g


REFERENCE_KERNELS = ReferenceKernels()
