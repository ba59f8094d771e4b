"""The ops under torch's function transforms (``torch.func.vmap``, ``grad``, ``jacrev``,
``jacfwd``, ``functional_call``) and batched gradients (``is_grads_batched=True``).

Outside a transform the ops run as before: the compiled backends' public operators,
whose autograd is written in C++ (csrc/ops.cpp) or registered with ``torch.library``
(lipkernels/triton). Neither kind can run under a transform (functorch refuses C++
autograd Functions, and a custom op has no batching rule for its backward), nor under
forward-mode AD (no jvp). While a transform or forward AD is active (:func:`active`),
the ops of the compiled backends go through the
``torch.autograd.Function`` classes below instead, which call the raw kernels of the
same backend's kernel object (:func:`lipkernels.backends.kernels`, the object whose
public ops the plain path calls: ``norm_epilogue``, ``norm_epilogue_backward``,
``sn_forward``, ``sn_backward``, no autograd of their own; this module knows no backend)
and define what functorch needs:

* ``setup_context`` (so ``grad``/``vjp``/``jacrev`` lower them), a ``jvp`` (forward mode:
  ``jvp``/``jacfwd``) written with torch ops, and a ``backward`` that runs the fused
  backward kernel, or with torch ops when it is itself differentiated (create_graph,
  nested transforms), as the C++ autograd does;
* a ``vmap`` rule. The per-sample ops fold the vmapped dim into the batch dim
  (``(V, B, ...) -> (V * B, ...)``: they are per sample, so this is exact) and run the
  kernel once. Spectral normalization treats each vmapped slice of a layer as a layer of
  its own (``V * L`` layers in one kernel call); the power iteration's in-place update
  of ``u``/``v`` needs them batched wherever the weight is (the same rule as torch's:
  a batched result cannot be written into an unbatched buffer).

The in-place update of ``u``/``v`` happens inside an autograd.Function too
(:class:`_StoreVectors`), where functorch allows it, so a layer in training mode works
under ``grad``/``jacrev``/``jacfwd`` as torch's does (on every backend, the reference
included).

The kernel ops themselves get batching rules too (lipkernels/_batching.py, whose
helpers the rules here share: registered by lipkernels/ops/__init__.py for the compiled
namespaces and by the Triton kernel modules for theirs), for the usual autograd's
backward run under vmap. The legacy vmap of ``is_grads_batched=True`` and gradcheck's batched check cannot
use them and has no fallback for a ``Tensor[]`` op: there the spectral-norm backwards
(here, csrc/ops.cpp, lipkernels/triton/spectral_norm.py) use the torch-op formula.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad

from .. import _layout
from .._batching import _fold, _front, _unfold
from .._epilogue import _dims, _epilogue_partials, _per_sample_view


def active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running, or forward-mode
    AD (``torch.autograd.forward_ad.dual_level``, which the C++ autograd lacks too).
    False while torch.compile traces (the compiled ops are what a traced graph holds)."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or _forward_ad._current_level >= 0)


def transforming() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


# ----------------------------------------------------------------- per-sample ops

class _Epilogue(torch.autograd.Function):
    """(out, norm) = the epilogue of n = ||g_i|| per sample; norm is not differentiable."""

    @staticmethod
    def forward(kern, g, f, epilogue, param):
        return kern.norm_epilogue(g, f, epilogue, param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, g, f, epilogue, param = inputs
        norm = output[1]
        ctx.mark_non_differentiable(norm)
        ctx.save_for_backward(g, f, norm)
        ctx.save_for_forward(g, f, norm)
        ctx.kern, ctx.epilogue, ctx.param = inputs[0], epilogue, param

    @staticmethod
    def backward(ctx, go, _grad_norm):
        g, f, norm = ctx.saved_tensors
        if go is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():
            # Differentiated itself (create_graph, nested transforms): torch ops, n
            # recomputed from g so that d/dg of this backward sees n(g).
            acc = _layout.acc_dtype(g.dtype)
            n = torch.linalg.vector_norm(g, dim=_dims(g), dtype=acc)
            fa = f.to(acc) if f is not None else None
            a, c = _epilogue_partials(ctx.epilogue, fa, n, ctx.param)
            goa = go.to(acc)
            grad_g = (_per_sample_view(goa * c, g) * g).to(g.dtype)
            grad_f = (goa * a).to(f.dtype) if f is not None else None
        else:
            # The fused kernel; under vmap (jacrev, is_grads_batched) its batching rule.
            grad_f, grad_g = ctx.kern.norm_epilogue_backward(go, g, f, norm, ctx.epilogue,
                                                             ctx.param)
            grad_f = grad_f if f is not None else None
        return None, grad_g, grad_f, None, None

    @staticmethod
    def jvp(ctx, _k, g_t, f_t, _e, _p):
        g, f, norm = ctx.saved_tensors
        acc = norm.dtype
        fa = f.to(acc) if f is not None else None
        a, c = _epilogue_partials(ctx.epilogue, fa, norm, ctx.param)
        out_t = torch.zeros_like(norm)
        if g_t is not None:
            out_t = out_t + c * (g.to(acc) * g_t.to(acc)).sum(dim=_dims(g))
        if f_t is not None and a is not None:
            out_t = out_t + a * f_t.to(acc)
        return out_t.to(_layout.epilogue_out_dtype(ctx.epilogue, g.dtype)), None

    @staticmethod
    def vmap(info, in_dims, kern, g, f, epilogue, param):
        size = info.batch_size
        _, g_d, f_d, _, _ = in_dims
        batch = _front(g, g_d, size).shape[1]
        out, norm = _Epilogue.apply(kern, _fold(g, g_d, size), _fold(f, f_d, size), epilogue,
                                    param)
        return (_unfold(out, size, batch), _unfold(norm, size, batch)), (0, 0)


def per_sample(kern, epilogue: str, f: Optional[torch.Tensor], g: torch.Tensor,
               param: float) -> torch.Tensor:
    """The per-sample output of ``epilogue`` (before a penalty's batch mean) by the raw
    kernels of the kernel object ``kern`` (lipkernels.backends.kernels), usable under the
    function transforms."""
    return _Epilogue.apply(kern, g, f, epilogue, float(param))[0]


# ----------------------------------------------------------------- spectral normalization

def _split_uv(uv: torch.Tensor, ws: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    out, off = [], 0
    for w in ws:
        m = w.shape[0]
        k = w.numel() // m
        out.append((uv[off:off + m], uv[off + m:off + m + k]))
        off += m + k
    return out


def _sn_backward_torch(grads, ws, uv, eps: float) -> List[torch.Tensor]:
    """``(G - <G, W_sn> u v^T) / sigma`` with torch ops, sigma recomputed from W (u, v
    constants), as csrc/ops.cpp's differentiable backward."""
    out = []
    for w, g, (u, v) in zip(ws, grads, _split_uv(uv, ws)):
        m = w.shape[0]
        sigma = torch.dot(u, torch.mv(w.reshape(m, -1), v))
        clamped = sigma.abs() < eps
        s = torch.where(clamped, torch.full_like(sigma, eps), sigma)
        c = torch.where(clamped, torch.zeros_like(sigma), (g * (w / s)).sum())
        out.append((g - c * torch.outer(u, v).view_as(w)) / s)
    return out


def _layer_slices(tensors, dims, size):
    """Per vmapped index i, the tensors' slices (an unbatched tensor as it is)."""
    fronts = [_front(t, d, size) if d is not None else None for t, d in zip(tensors, dims)]
    return [[fr[i] if fr is not None else t for t, fr in zip(tensors, fronts)]
            for i in range(size)]


class _SNForward(torch.autograd.Function):
    """apply(kern, L, iters, eps, *weights, *us, *vs) -> (*W_sn, sigmas, uv): power
    iteration on copies of u, v (returned in uv), then W / sigma; differentiable in the
    weights with u, v constants. Functional: the caller stores uv (_StoreVectors)."""

    @staticmethod
    def forward(kern, n_layers, iters, eps, *tensors):
        ws, us, vs = (list(tensors[i * n_layers:(i + 1) * n_layers]) for i in range(3))
        w_sn, sigmas, uv = kern.sn_forward(ws, us, vs, iters, eps)
        return (*w_sn, sigmas, uv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kern, n_layers, iters, eps = inputs[:4]
        ws = inputs[4:4 + n_layers]
        sigmas, uv = output[-2], output[-1]
        ctx.mark_non_differentiable(sigmas, uv)
        ctx.save_for_backward(uv, sigmas, *ws)
        ctx.save_for_forward(uv, sigmas, *ws)
        ctx.kern, ctx.n_layers, ctx.eps = kern, n_layers, eps

    @staticmethod
    def backward(ctx, *grads):
        uv, sigmas, *ws = ctx.saved_tensors
        n = ctx.n_layers
        gs = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[:n], ws)]
        legacy_batched = any(torch._C._functorch.is_legacy_batchedtensor(g) for g in gs)
        if torch.is_grad_enabled() or legacy_batched:
            # Differentiated itself, or batched by the legacy vmap of is_grads_batched /
            # gradcheck (no rule for a Tensor[] op there): torch ops.
            out = _sn_backward_torch(gs, ws, uv, ctx.eps)
        else:
            # The fused kernel; under vmap (jacrev, is_grads_batched) its batching rule.
            out = ctx.kern.sn_backward(gs, ws, uv, sigmas, ctx.eps)
        return (None, None, None, None, *out) + (None,) * (2 * n)

    @staticmethod
    def jvp(ctx, _k, _n, _i, _e, *tangents):
        uv, sigmas, *ws = ctx.saved_tensors
        n = ctx.n_layers
        outs = []
        for l, (w, (u, v)) in enumerate(zip(ws, _split_uv(uv, ws))):
            w_t = tangents[l]
            if w_t is None:
                outs.append(torch.zeros_like(w))
                continue
            sigma = sigmas[l].to(w.dtype)
            clamped = sigma.abs() < ctx.eps
            s = torch.where(clamped, torch.full_like(sigma, ctx.eps), sigma)
            ds = torch.dot(u, torch.mv(w_t.reshape(w.shape[0], -1).to(u.dtype), v)).to(w.dtype)
            ds = torch.where(clamped, torch.zeros_like(ds), ds)
            outs.append((w_t - (ds / s) * w) / s)
        assert len(outs) == n
        return (*outs, None, None)

    @staticmethod
    def vmap(info, in_dims, kern, n_layers, iters, eps, *tensors):
        # Each vmapped slice of a layer is a layer: V * L layers in one call.
        size = info.batch_size
        dims = in_dims[4:]
        slices = _layer_slices(tensors, dims, size)
        ws, us, vs = [], [], []
        for per in slices:
            ws += per[:n_layers]
            us += [u.contiguous() for u in per[n_layers:2 * n_layers]]
            vs += [v.contiguous() for v in per[2 * n_layers:]]
        out = _SNForward.apply(kern, size * n_layers, iters, eps, *ws, *us, *vs)
        w_sn = [torch.stack(out[l:size * n_layers:n_layers]) for l in range(n_layers)]
        sigmas = out[-2].reshape(size, n_layers)
        uv = out[-1].reshape(size, -1)
        return (*w_sn, sigmas, uv), (0,) * (n_layers + 2)


class _StoreVectors(torch.autograd.Function):
    """apply(L, uv, *us, *vs): write the iterated vectors into the buffers, in place.
    Inside an autograd.Function, where functorch allows the update of a buffer captured
    by a grad transform (torch's own spectral_norm writes it with an out= op)."""

    @staticmethod
    def forward(n_layers, uv, *vectors):
        us, vs = vectors[:n_layers], vectors[n_layers:]
        with torch.no_grad():
            for (u_new, v_new), u, v in zip(_split_uv_sizes(uv, us, vs), us, vs):
                u.copy_(u_new)
                v.copy_(v_new)
        return uv.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * (2 + len(grads))

    @staticmethod
    def vmap(info, in_dims, n_layers, uv, *vectors):
        size = info.batch_size
        uv_d, dims = in_dims[1], in_dims[2:]
        if uv_d is None:
            # The same vectors for every slice: each batched buffer gets them all.
            uvs = [uv] * size
        else:
            uvs = list(_front(uv, uv_d, size))
        for i, (x, d) in enumerate(zip(vectors, dims)):
            if d is None and uv_d is not None:
                which = "us" if i < n_layers else "vs"
                raise RuntimeError(
                    "lipkernels spectral norm (spectral_normalize, power_iteration) under "
                    f"vmap: {which}[{i % n_layers}] is not batched but the power iteration's "
                    "result is (the weights are batched); "
                    "in training mode the vectors are updated in place, so batch them too "
                    "(e.g. functional_call with stacked buffers), or use eval mode")
        fronts = [_front(x, d, size) if d is not None else x for x, d in zip(vectors, dims)]
        for i in range(size):
            slice_vectors = [fr[i] if d is not None else fr for fr, d in zip(fronts, dims)]
            _StoreVectors.apply(n_layers, uvs[i], *slice_vectors)
        return uv.new_empty(0), None


def _split_uv_sizes(uv, us, vs):
    out, off = [], 0
    for u, v in zip(us, vs):
        m, k = u.numel(), v.numel()
        out.append((uv[off:off + m].view_as(u), uv[off + m:off + m + k].view_as(v)))
        off += m + k
    return out


def store_vectors(us, vs, uv) -> None:
    _StoreVectors.apply(len(us), uv, *us, *vs)


def spectral_normalize(kern, weights, us, vs, n_power_iterations: int, eps: float,
                       training: bool) -> List[torch.Tensor]:
    """spectral_normalize by the raw kernels of the kernel object ``kern`` under the
    transforms."""
    n = len(weights)
    iters = n_power_iterations if training else 0
    out = _SNForward.apply(kern, n, iters, float(eps), *weights, *us, *vs)
    if iters > 0:
        store_vectors(us, vs, out[-1])
    return list(out[:n])


def power_iteration(kern, weights, us, vs, n_power_iterations: int, eps: float) -> torch.Tensor:
    """power_iteration by the raw kernels of the kernel object ``kern`` under the
    transforms."""
    n = len(weights)
    with torch.no_grad():
        out = _SNForward.apply(kern, n, n_power_iterations, float(eps),
                               *[w.detach() for w in weights], *us, *vs)
        if n_power_iterations > 0:
            store_vectors(us, vs, out[-1])
    return out[-2]


# ----------------------------------------------------------------- the reference

@torch.no_grad()
def _power_iteration_torch(weights, us, vs, n_power_iterations: int, eps: float) -> torch.Tensor:
    """The reference power iteration, functional: the new u_0, v_0, u_1, ... flat."""
    parts = []
    for w, u, v in zip(weights, us, vs):
        mat = w.flatten(1)
        for _ in range(n_power_iterations):
            u = F.normalize(torch.mv(mat, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(mat.mH, u), dim=0, eps=eps)  # W^T for real weights
        parts += [u.reshape(-1), v.reshape(-1)]
    return torch.cat(parts)


def spectral_normalize_reference(weights, us, vs, n_power_iterations: int, eps: float,
                                 training: bool) -> List[torch.Tensor]:
    """The reference's spectral_normalize under the transforms: the same formulas, the
    vectors stored through _StoreVectors."""
    if training and n_power_iterations > 0:
        uv = _power_iteration_torch([w.detach() for w in weights], us, vs, n_power_iterations, eps)
        store_vectors(us, vs, uv)
    out = []
    for w, u, v in zip(weights, us, vs):
        sigma = torch.vdot(u.clone(), torch.mv(w.flatten(1), v.clone()))
        sigma = torch.where(sigma.abs() < eps, torch.full_like(sigma, eps), sigma)
        out.append(w / sigma)
    return out


def power_iteration_reference(weights, us, vs, n_power_iterations: int, eps: float) -> torch.Tensor:
    if n_power_iterations > 0:
        uv = _power_iteration_torch([w.detach() for w in weights], us, vs, n_power_iterations, eps)
        store_vectors(us, vs, uv)
    with torch.no_grad():
        sigmas = [torch.vdot(u, torch.mv(w.detach().flatten(1), v)) for w, u, v in zip(weights, us, vs)]
        sigmas = [s if w.is_complex() else s.to(_layout.acc_dtype(w.dtype))
                  for s, w in zip(sigmas, weights)]
    return torch.stack(sigmas)
