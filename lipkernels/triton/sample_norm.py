"""Triton kernels of the per-sample norm family (docs/math.md sections 2-5), registered as
``torch.library`` custom ops (opaque to ``torch.compile``, with fake kernels and
autograd).

* forward: ``_sumsq_kernel`` splits every sample into chunks of ``CHUNK`` elements,
  one program per (sample, chunk), each writing a partial sum of squares; then
  ``_finish_kernel`` adds a sample's partials in order (deterministic), takes the
  square root and applies the epilogue. One read of g, two launches.
* backward: ``_scale_kernel``, one program per (sample, chunk), computes its sample's
  coefficient c from (dL/dout, f, n) and writes dL/dg = c g (and dL/df): one read of
  g, one write, one launch.
* ``sample_scale`` / ``sample_dot``: the same two kernels with c given, and a dot
  instead of a sum of squares.

Accumulation in float32 (float64 for float64 inputs). With ``create_graph=True`` the
backward is the reference formula differentiated by autograd, so every order of
derivative exists.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _batching, _layout
from .._epilogue import per_sample_reference

EPILOGUES = {"norm": 0, "gn": 1, "gran": 2, "gp": 3, "r1": 4}
CHUNK = 8192   # elements of one sample per program
BLOCK = 1024   # elements per vector step inside a program


@triton.jit
def _finite(x):
    # Neither NaN nor infinite (x - x is NaN for both).
    return x - x == 0.0


@triton.jit
def _epilogue_forward(f, n, param, EPI: tl.constexpr):
    # Same formulas and special values as csrc/epilogue.h (only GN's 0/0 is redefined).
    if EPI == 0:
        out = n
    elif EPI == 1:
        d = n + tl.abs(f)
        out = tl.where(d == 0, 0.0, f / tl.where(d == 0, 1.0, d))
    elif EPI == 2:
        out = f * (n / (n * n + param))
    elif EPI == 3:
        out = (n - param) * (n - param)
    else:
        out = n * n
    return out


@triton.jit
def _epilogue_backward(go, f, n, param, EPI: tl.constexpr):
    """(dL/df, c, dL/dn) with dL/dg = c g; dn/dg = g / n is 0 where n = 0 (a NaN n stays
    NaN). As csrc/epilogue.h: where an input is not finite, autograd of the plain formula."""
    inv_n = tl.where(n == 0, 0.0, 1.0 / tl.where(n == 0, 1.0, n))
    if EPI == 0:
        grad_f = go * 0.0
        dn = go
        coef = dn * inv_n
    elif EPI == 1:
        d = n + tl.abs(f)
        dzero = d == 0
        d_safe = tl.where(dzero, 1.0, d)
        dn = tl.where(dzero, 0.0, -go * ((f / d_safe) / d_safe))
        sgn = tl.where(f > 0, 1.0, tl.where(f < 0, -1.0, f * 0.0))
        grad_f = tl.where(_finite(d), (go * (n / d_safe)) / d_safe, go / d_safe + dn * sgn)
        grad_f = tl.where(dzero, 0.0, grad_f)
        coef = dn * inv_n
    elif EPI == 2:
        q = n * n + param
        r = n / q
        grad_r = go * f
        grad_f = go * r
        dn = tl.where(_finite(q) & _finite(grad_r), grad_r * (((param - n * n) / q) / q),
                      grad_r / q - 2.0 * (grad_r * (r / q)) * n)
        coef = dn * inv_n
    elif EPI == 3:
        grad_f = go * 0.0
        dn = go * 2.0 * (n - param)
        coef = dn * inv_n
    else:
        grad_f = go * 0.0
        dn = go * 2.0 * n
        coef = go * 2.0
    return grad_f, coef, dn


@triton.jit
def _sumsq_kernel(a_ptr, b_ptr, part_ptr, N, n_chunks, ACC: tl.constexpr, DOT: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """part[s * n_chunks + c] = sum over chunk c of sample s of a*a (or a*b when DOT)."""
    pid = tl.program_id(0)
    sample = pid // n_chunks
    chunk = pid % n_chunks
    start = sample.to(tl.int64) * N + chunk.to(tl.int64) * CHUNK
    stop = tl.minimum(N - chunk.to(tl.int64) * CHUNK, CHUNK)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for j in range(0, CHUNK, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        mask = offs < stop
        a = tl.load(a_ptr + start + offs, mask=mask, other=0.0).to(ACC)
        if DOT:
            b = tl.load(b_ptr + start + offs, mask=mask, other=0.0).to(ACC)
            acc += a * b
        else:
            acc += a * a
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _finish_kernel(part_ptr, a_ptr, N, f_ptr, f_stride, out_ptr, norm_ptr, n_chunks, param,
                   EPI: tl.constexpr, HAS_F: tl.constexpr, SQRT: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per sample: add the chunk partials in order; n = sqrt (|g_b| for a one-element
    sample, exactly, as torch); out = epilogue(f, n)."""
    sample = tl.program_id(0)
    total = tl.zeros((BLOCK_C,), dtype=ACC)
    for c in range(0, n_chunks, BLOCK_C):
        offs = c + tl.arange(0, BLOCK_C)
        total += tl.load(part_ptr + sample * n_chunks + offs, mask=offs < n_chunks, other=0.0)
    s = tl.sum(total, axis=0)
    if SQRT:
        single = tl.load(a_ptr + sample.to(tl.int64) * N, mask=N == 1, other=0.0).to(ACC)
        n = tl.where(N == 1, tl.abs(single), tl.sqrt(s))
        if HAS_F:
            f = tl.load(f_ptr + sample * f_stride).to(ACC)
        else:
            f = n * 0.0
        tl.store(norm_ptr + sample, n)
        tl.store(out_ptr + sample, _epilogue_forward(f, n, param, EPI).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + sample, s.to(out_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(g_ptr, out_ptr, coef_ptr, go_ptr, f_ptr, f_stride, norm_ptr, grad_f_ptr, N,
                  n_chunks, param, EPI: tl.constexpr, FROM_EPILOGUE: tl.constexpr,
                  HAS_F: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = c_s * g over chunk c of sample s; c_s given, or from the epilogue's backward."""
    pid = tl.program_id(0)
    sample = pid // n_chunks
    chunk = pid % n_chunks
    if FROM_EPILOGUE:
        go = tl.load(go_ptr + sample).to(ACC)
        n = tl.load(norm_ptr + sample)
        if HAS_F:
            f = tl.load(f_ptr + sample * f_stride).to(ACC)
        else:
            f = n * 0.0
        grad_f, coef, dn = _epilogue_backward(go, f, n, param, EPI)
        if HAS_F:
            if chunk == 0:
                tl.store(grad_f_ptr + sample, grad_f.to(grad_f_ptr.dtype.element_ty))
    else:
        coef = tl.load(coef_ptr + sample).to(ACC)
    start = sample.to(tl.int64) * N + chunk.to(tl.int64) * CHUNK
    stop = tl.minimum(N - chunk.to(tl.int64) * CHUNK, CHUNK)
    for j in range(0, CHUNK, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        mask = offs < stop
        x = tl.load(g_ptr + start + offs, mask=mask, other=0.0).to(ACC)
        y = coef * x
        if FROM_EPILOGUE:
            if EPI != 4:
                # (g / n) * dL/dn: g / n is at most 1, so this overflows only where the
                # result does (coef = dL/dn / n can). One element per sample: g / n
                # itself, as 1 / n can overflow (csrc/epilogue.h).
                inv_n = tl.where(n == 0, 0.0, 1.0 / tl.where(n == 0, 1.0, n))
                unit = tl.where(N == 1, tl.where(n == 0, 0.0, x / tl.where(n == 0, 1.0, n)),
                                x * inv_n)
                y = unit * dn
        tl.store(out_ptr + start + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------- launchers

_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


def _acc(dtype: torch.dtype):
    return _TL_ACC[_layout.acc_dtype(dtype)]


def _geometry(g: torch.Tensor) -> Tuple[int, int, int]:
    batch = g.shape[0]
    n = 1
    for size in g.shape[1:]:  # elements per sample, also for an empty batch
        n *= size
    return batch, n, max(1, triton.cdiv(n, CHUNK))


def _reduce(a: torch.Tensor, b: Optional[torch.Tensor], f: Optional[torch.Tensor],
            epilogue: str, param: float, out_dtype: torch.dtype, sqrt: bool):
    batch, n, n_chunks = _geometry(a)
    acc = _layout.acc_dtype(a.dtype)
    part = torch.empty(batch * n_chunks, device=a.device, dtype=acc)
    out = torch.empty(batch, device=a.device, dtype=out_dtype)
    norm = torch.empty(batch, device=a.device, dtype=acc)
    if batch == 0:  # an empty batch: empty outputs, no launch (a grid of 0 programs)
        return out, norm
    _sumsq_kernel[(batch * n_chunks,)](a, b if b is not None else a, part, n, n_chunks,
                                       ACC=_acc(a.dtype), DOT=b is not None, CHUNK=CHUNK,
                                       BLOCK=BLOCK)
    _finish_kernel[(batch,)](part, a, n, f if f is not None else part, f.stride(0) if f is not None else 0,
                             out, norm, n_chunks, float(param), EPI=EPILOGUES[epilogue],
                             HAS_F=f is not None, SQRT=sqrt, ACC=_acc(a.dtype),
                             BLOCK_C=max(2, min(1024, triton.next_power_of_2(n_chunks))))
    return out, norm


def _scale(g: torch.Tensor, coef: Optional[torch.Tensor], go=None, f=None, norm=None,
           epilogue: str = "norm", param: float = 0.0):
    batch, n, n_chunks = _geometry(g)
    out = _layout.empty_like_sample_blocks(g)
    grad_f = torch.empty(batch if f is not None else 0, device=g.device, dtype=g.dtype)
    if batch == 0:
        return grad_f, out
    dummy = norm if norm is not None else coef
    _scale_kernel[(batch * n_chunks,)](
        g, out, coef if coef is not None else dummy, go if go is not None else dummy,
        f if f is not None else dummy, f.stride(0) if f is not None else 0, dummy,
        grad_f if f is not None else dummy, n, n_chunks, float(param),
        EPI=EPILOGUES[epilogue], FROM_EPILOGUE=coef is None, HAS_F=f is not None,
        ACC=_acc(g.dtype), CHUNK=CHUNK, BLOCK=BLOCK)
    return grad_f, out


# --------------------------------------------------------------------- custom ops

@torch.library.custom_op("lipkernels_triton::norm_epilogue", mutates_args=())
def norm_epilogue(g: torch.Tensor, f: Optional[torch.Tensor], epilogue: str,
                  param: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, norm): per-sample epilogue of n = ||g_i|| (out in g's dtype, or float32/64
    for the penalties' squared norms); norm in the accumulation dtype."""
    g = _layout.as_sample_blocks(g)
    return _reduce(g, None, f, epilogue, param, _layout.epilogue_out_dtype(epilogue, g.dtype), True)


@norm_epilogue.register_fake
def _(g, f, epilogue, param):
    batch = g.shape[0]
    return (g.new_empty(batch, dtype=_layout.epilogue_out_dtype(epilogue, g.dtype)),
            g.new_empty(batch, dtype=_layout.acc_dtype(g.dtype)))


@torch.library.custom_op("lipkernels_triton::norm_epilogue_backward", mutates_args=())
def norm_epilogue_backward(grad_out: torch.Tensor, g: torch.Tensor, f: Optional[torch.Tensor],
                           norm: torch.Tensor, epilogue: str,
                           param: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dL/df or an empty tensor, dL/dg) for dL/dout = grad_out."""
    g = _layout.as_sample_blocks(g)
    go = grad_out.to(_layout.acc_dtype(g.dtype)).contiguous()
    return _scale(g, None, go, f, norm, epilogue, param)


@norm_epilogue_backward.register_fake
def _(grad_out, g, f, norm, epilogue, param):
    return g.new_empty(g.shape[0] if f is not None else 0), _layout.empty_like_sample_blocks(g)


@torch.library.custom_op("lipkernels_triton::sample_scale", mutates_args=())
def sample_scale(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """out_ij = c_i g_ij."""
    g = _layout.as_sample_blocks(g)
    return _scale(g, c.to(_layout.acc_dtype(g.dtype)).contiguous())[1]


@sample_scale.register_fake
def _(g, c):
    return _layout.empty_like_sample_blocks(g)


@torch.library.custom_op("lipkernels_triton::sample_dot", mutates_args=())
def sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d_i = sum_j a_ij b_ij."""
    a, b = _layout.matching_sample_blocks(a, b)
    return _reduce(a, b, None, "norm", 0.0, a.dtype, False)[0]


@sample_dot.register_fake
def _(a, b):
    return a.new_empty(a.shape[0])


# --------------------------------------------------------------------- autograd

def _setup_epilogue(ctx, inputs, output):
    g, f, epilogue, param = inputs
    ctx.save_for_backward(g, f, output[1])
    ctx.epilogue, ctx.param = epilogue, param


def _backward_epilogue(ctx, grad_out, _grad_norm):
    # The norm output is a by-product kept for this backward, not a differentiable result.
    g, f, norm = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph: differentiate the reference formula, so that every order exists.
        wanted = [t for t in (g, f) if t is not None and t.requires_grad]
        with torch.enable_grad():
            out = per_sample_reference(ctx.epilogue, f, g, ctx.param)
            grads = dict(zip(map(id, wanted), torch.autograd.grad(
                out, wanted, grad_out.to(out.dtype), create_graph=True)))
        return grads.get(id(g)), (grads.get(id(f)) if f is not None else None), None, None
    grad_f, grad_g = norm_epilogue_backward(grad_out, g, f, norm, ctx.epilogue, ctx.param)
    return grad_g, (grad_f if f is not None else None), None, None


norm_epilogue.register_autograd(_backward_epilogue, setup_context=_setup_epilogue)


def _setup_scale(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_scale(ctx, grad):
    g, c = ctx.saved_tensors
    return sample_scale(grad, c), sample_dot(grad, g).to(c.dtype)


sample_scale.register_autograd(_backward_scale, setup_context=_setup_scale)


def _setup_dot(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_dot(ctx, grad):
    a, b = ctx.saved_tensors
    return sample_scale(b, grad), sample_scale(a, grad)


sample_dot.register_autograd(_backward_dot, setup_context=_setup_dot)


# --------------------------------------------------------------------- entry points

def sample_norm(g: torch.Tensor) -> torch.Tensor:
    return norm_epilogue(g, None, "norm", 0.0)[0]


def gn_normalize(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return norm_epilogue(g, f, "gn", 0.0)[0]


def gran_normalize(f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return norm_epilogue(g, f, "gran", eps)[0]


def gradient_penalty(g: torch.Tensor, center: float) -> torch.Tensor:
    return norm_epilogue(g, None, "gp", center)[0].mean()


def r1_penalty(g: torch.Tensor) -> torch.Tensor:
    return norm_epilogue(g, None, "r1", 0.0)[0].mean()


# Batching rules (torch.func.vmap, is_grads_batched): lipkernels/_batching.py.
def _register_vmap() -> None:
    import sys
    _batching.register_triton(sample_norm=sys.modules[__name__])


_register_vmap()
