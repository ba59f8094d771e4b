"""Triton kernels of batched spectral normalization (docs/math.md section 1): all layers of a
model in a fixed number of launches, whatever their number.

A *plan* is built once per list of weights (cached by data pointers and shapes) and
kept on the device: a layer table (pointer to W, m, k, offsets into the flat buffers),
a table of work items (at most ``ROWS`` consecutive rows of one layer) and a table of
column blocks, in the spirit of Triton's grouped-GEMM tutorial and apex's
multi_tensor_apply. Per power iteration:

1. ``_rows_kernel``, one program per item: ``t = W v`` for its rows (kept in registers)
   and ``W^T t`` over the same rows (a second pass over the item's tile, served from
   cache): one read of W from memory. Writes t, a partial ``W^T t`` and ``||t||^2``.
2. ``_columns_kernel``, one program per column block: adds the items' partials in
   order (deterministic): ``s = W^T u = (W^T t) / max(||t||, eps)``.
3. ``_finish_kernel``, one program per layer: ``u = t / max(||t||, eps)``,
   ``v = s / max(||s||, eps)``, ``sigma = ||s||^2 / max(||s||, eps)`` (no third pass).

then ``_divide_kernel`` writes every ``W_sn`` into one flat buffer. The backward is two
launches: ``<G, W>`` per item, then ``(G - <G, W_sn> u v^T) / sigma``. No host
synchronisation: sizes come from the cached plan, values stay on the device.

The ops are functional (``uv`` holds the updated vectors; the caller copies them into
its buffers), registered as ``torch.library`` custom ops with fake kernels and autograd.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _batching, _layout

ROWS = 32          # rows per work item (t of an item lives in registers)
BLOCK_K = 128      # columns per step inside an item
BLOCK_C = 256      # columns per program of the column reduction

# Layer table: one row of NL int64 fields per layer (offsets are into the flat buffers).
L_W = tl.constexpr(0)      # address of W (m, k), row-major
L_M = tl.constexpr(1)
L_K = tl.constexpr(2)
L_OUT = tl.constexpr(3)    # W_sn / G / dW in the flat (sum of numel,) buffers
L_U = tl.constexpr(4)      # u and v in uv (u_0, v_0, u_1, v_1, ...)
L_V = tl.constexpr(5)
L_T = tl.constexpr(6)      # t in the (sum of m,) buffer
L_S = tl.constexpr(7)      # s in the (sum of k,) buffer
L_ITEM0 = tl.constexpr(8)  # the layer's items and column blocks: [ITEM0, ITEM1), [CB0, CB1)
L_ITEM1 = tl.constexpr(9)
L_CB0 = tl.constexpr(10)
L_CB1 = tl.constexpr(11)
NL = tl.constexpr(12)
# Item table: layer, first row, end row, offset of the item's partial W^T t.
I_LAYER = tl.constexpr(0)
I_ROW0 = tl.constexpr(1)
I_ROW1 = tl.constexpr(2)
I_PART = tl.constexpr(3)
NI = tl.constexpr(4)


@triton.jit
def _item(items, layers, uv, ROWS: tl.constexpr):
    """This program's work item: (layer, its table row, W, k, the item's rows, their mask)."""
    pid = tl.program_id(0)
    layer = tl.load(items + pid * NI + I_LAYER)
    rows = tl.load(items + pid * NI + I_ROW0) + tl.arange(0, ROWS)
    rmask = rows < tl.load(items + pid * NI + I_ROW1)
    lt = layers + layer * NL
    w = tl.load(lt + L_W).to(tl.pointer_type(uv.dtype.element_ty))
    return layer, lt, w, tl.load(lt + L_K), rows, rmask


@triton.jit
def _load_tile(w, rows, rmask, cols, cmask, k, ACC: tl.constexpr):
    return tl.load(w + rows[:, None].to(tl.int64) * k + cols[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)


@triton.jit
def _rows_kernel(layers, items, uv, t_buf, part_buf, item_sum, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    layer, lt, w, k, rows, rmask = _item(items, layers, uv, ROWS)
    part = tl.load(items + tl.program_id(0) * NI + I_PART)
    v_off = tl.load(lt + L_V)
    t_off = tl.load(lt + L_T)
    # t = W v for the item's rows.
    t = tl.zeros((ROWS,), dtype=ACC)
    for kb in range(0, k, BLOCK_K):
        cols = kb + tl.arange(0, BLOCK_K)
        cmask = cols < k
        v = tl.load(uv + v_off + cols, mask=cmask, other=0.0).to(ACC)
        t += tl.sum(_load_tile(w, rows, rmask, cols, cmask, k, ACC) * v[None, :], axis=1)
    tl.store(t_buf + t_off + rows, t, mask=rmask)
    tl.store(item_sum + tl.program_id(0), tl.sum(t * t, axis=0))
    # W^T t over the same rows.
    for kb in range(0, k, BLOCK_K):
        cols = kb + tl.arange(0, BLOCK_K)
        cmask = cols < k
        p = tl.sum(_load_tile(w, rows, rmask, cols, cmask, k, ACC) * t[:, None], axis=0)
        tl.store(part_buf + part + cols, p, mask=cmask)


@triton.jit
def _layer_sum(item_sum, i0, i1, ACC: tl.constexpr):
    """Sum of partials [i0, i1), added in order."""
    total = tl.zeros((1,), dtype=ACC)
    for i in range(i0, i1):
        total += tl.load(item_sum + i + tl.arange(0, 1))
    return tl.sum(total, axis=0)


@triton.jit
def _layer_norm(item_sum, i0, i1, ACC: tl.constexpr):
    return tl.sqrt(_layer_sum(item_sum, i0, i1, ACC))


@triton.jit
def _columns_kernel(layers, items, col_blocks, part_buf, item_sum, s_buf, cb_sum, eps,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    cb = tl.program_id(0)
    layer = tl.load(col_blocks + cb * 2)
    c0 = tl.load(col_blocks + cb * 2 + 1)
    lt = layers + layer * NL
    k = tl.load(lt + L_K)
    s_off = tl.load(lt + L_S)
    i0 = tl.load(lt + L_ITEM0)
    i1 = tl.load(lt + L_ITEM1)
    tden = tl.maximum(_layer_norm(item_sum, i0, i1, ACC), eps)
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < k
    acc = tl.zeros((BLOCK_C,), dtype=ACC)
    for i in range(i0, i1):
        part = tl.load(items + i * NI + I_PART)
        acc += tl.load(part_buf + part + cols, mask=cmask, other=0.0)
    s = acc / tden
    tl.store(s_buf + s_off + cols, s, mask=cmask)
    tl.store(cb_sum + cb, tl.sum(s * s, axis=0))


@triton.jit
def _finish_kernel(layers, uv, t_buf, s_buf, item_sum, cb_sum, sigmas, eps, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    lt = layers + layer * NL
    m = tl.load(lt + L_M)
    k = tl.load(lt + L_K)
    u_off = tl.load(lt + L_U)
    v_off = tl.load(lt + L_V)
    t_off = tl.load(lt + L_T)
    s_off = tl.load(lt + L_S)
    tden = tl.maximum(_layer_norm(item_sum, tl.load(lt + L_ITEM0), tl.load(lt + L_ITEM1), ACC), eps)
    snorm = _layer_norm(cb_sum, tl.load(lt + L_CB0), tl.load(lt + L_CB1), ACC)
    sden = tl.maximum(snorm, eps)
    for r in range(0, m, BLOCK):
        offs = r + tl.arange(0, BLOCK)
        mask = offs < m
        t = tl.load(t_buf + t_off + offs, mask=mask, other=0.0)
        tl.store(uv + u_off + offs, (t / tden).to(uv.dtype.element_ty), mask=mask)
    for c in range(0, k, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        mask = offs < k
        s = tl.load(s_buf + s_off + offs, mask=mask, other=0.0)
        tl.store(uv + v_off + offs, (s / sden).to(uv.dtype.element_ty), mask=mask)
    tl.store(sigmas + layer, tl.where(snorm >= eps, snorm, snorm * snorm / eps))


@triton.jit
def _uwv_kernel(layers, items, uv, item_sum, ACC: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Per item: sum over its rows of u_r (W_r . v), for sigma = u^T W v."""
    layer, lt, w, k, rows, rmask = _item(items, layers, uv, ROWS)
    t = tl.zeros((ROWS,), dtype=ACC)
    for kb in range(0, k, BLOCK_K):
        cols = kb + tl.arange(0, BLOCK_K)
        cmask = cols < k
        v = tl.load(uv + tl.load(lt + L_V) + cols, mask=cmask, other=0.0).to(ACC)
        t += tl.sum(_load_tile(w, rows, rmask, cols, cmask, k, ACC) * v[None, :], axis=1)
    u = tl.load(uv + tl.load(lt + L_U) + rows, mask=rmask, other=0.0).to(ACC)
    tl.store(item_sum + tl.program_id(0), tl.sum(u * t, axis=0))


@triton.jit
def _sigma_kernel(layers, item_sum, sigmas, ACC: tl.constexpr):
    """sigma = u^T W v of a layer: its items' partial sums, added in order."""
    layer = tl.program_id(0)
    lt = layers + layer * NL
    tl.store(sigmas + layer, _layer_sum(item_sum, tl.load(lt + L_ITEM0), tl.load(lt + L_ITEM1), ACC))


@triton.jit
def _divide_kernel(layers, items, uv, out, sigmas, eps, ACC: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """W_sn = W / sigma_eff for the item's rows (sigma_eff = eps where |sigma| < eps)."""
    layer, lt, w, k, rows, rmask = _item(items, layers, uv, ROWS)
    o_off = tl.load(lt + L_OUT)
    sigma = tl.load(sigmas + layer)
    inv = 1.0 / tl.where(tl.abs(sigma) < eps, eps, sigma)
    for kb in range(0, k, BLOCK_K):
        cols = kb + tl.arange(0, BLOCK_K)
        cmask = cols < k
        x = _load_tile(w, rows, rmask, cols, cmask, k, ACC)
        tl.store(out + o_off + rows[:, None].to(tl.int64) * k + cols[None, :],
                 (x * inv).to(out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grad_dot_kernel(layers, items, uv, grad, item_sum, ACC: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Per item: <G, W> over its rows."""
    _, lt, w, k, rows, rmask = _item(items, layers, uv, ROWS)
    g = grad + tl.load(lt + L_OUT)
    acc = tl.zeros((ROWS, BLOCK_K), dtype=ACC)
    for kb in range(0, k, BLOCK_K):
        cols = kb + tl.arange(0, BLOCK_K)
        cmask = cols < k
        acc += _load_tile(w, rows, rmask, cols, cmask, k, ACC) * _load_tile(g, rows, rmask, cols, cmask, k, ACC)
    tl.store(item_sum + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _grad_kernel(layers, items, uv, grad, out, sigmas, item_sum, eps, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW = G / sigma - (<G, W> / sigma^2) u v^T for the item's rows (G / eps where
    sigma was clamped)."""
    layer, lt, _, k, rows, rmask = _item(items, layers, uv, ROWS)
    o_off = tl.load(lt + L_OUT)
    sigma = tl.load(sigmas + layer)
    clamped = tl.abs(sigma) < eps
    s = tl.where(clamped, eps, sigma)
    gw = _layer_sum(item_sum, tl.load(lt + L_ITEM0), tl.load(lt + L_ITEM1), ACC)
    corr = tl.where(clamped, 0.0, gw / (s * s))
    inv = 1.0 / s
    u = tl.load(uv + tl.load(lt + L_U) + rows, mask=rmask, other=0.0).to(ACC)
    for kb in range(0, k, BLOCK_K):
        cols = kb + tl.arange(0, BLOCK_K)
        cmask = cols < k
        v = tl.load(uv + tl.load(lt + L_V) + cols, mask=cmask, other=0.0).to(ACC)
        g = _load_tile(grad + o_off, rows, rmask, cols, cmask, k, ACC)
        d = g * inv - (corr * u)[:, None] * v[None, :]
        tl.store(out + o_off + rows[:, None].to(tl.int64) * k + cols[None, :],
                 d.to(out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------- plans

_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}


class _Plan:
    """The device tables of one list of weights (contiguous, one dtype and device)."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        device = weights[0].device
        layers, items, col_blocks = [], [], []
        out_off = uv_off = t_off = s_off = part_off = 0
        self.numels, self.ms, self.ks = [], [], []
        for layer, w in enumerate(weights):
            m = w.shape[0]
            k = w.numel() // m
            first_item, first_cb = len(items), len(col_blocks)
            for r in range(0, m, ROWS):
                items.append([layer, r, min(m, r + ROWS), part_off])
                part_off += k
            for c in range(0, k, BLOCK_C):
                col_blocks.append([layer, c])
            layers.append([w.data_ptr(), m, k, out_off, uv_off, uv_off + m, t_off, s_off,
                           first_item, len(items), first_cb, len(col_blocks)])
            self.numels.append(w.numel())
            self.ms.append(m)
            self.ks.append(k)
            out_off += w.numel()
            uv_off += m + k
            t_off += m
            s_off += k
        self.layers = torch.tensor(layers, dtype=torch.int64, device=device)
        self.items = torch.tensor(items, dtype=torch.int64, device=device)
        self.col_blocks = torch.tensor(col_blocks, dtype=torch.int64, device=device)
        self.n_layers, self.n_items, self.n_col_blocks = len(layers), len(items), len(col_blocks)
        self.total, self.uv_size, self.t_size, self.s_size, self.part_size = (
            out_off, uv_off, t_off, s_off, part_off)


_plans: "OrderedDict[tuple, _Plan]" = OrderedDict()
_MAX_PLANS = 16


def _plan(weights: Sequence[torch.Tensor]) -> _Plan:
    key = tuple((w.data_ptr(), tuple(w.shape), w.dtype, w.device) for w in weights)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(weights)
        while len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def _uv(us, vs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for pair in zip(us, vs) for x in pair])


def _run_forward(weights, us, vs, n_power_iterations: int, eps: float, write_out: bool):
    """(flat W_sn or an empty tensor, sigmas, uv) with uv the updated u_0, v_0, u_1, ..."""
    weights = [w.contiguous() for w in weights]
    plan = _plan(weights)
    dtype, device = weights[0].dtype, weights[0].device
    acc = _layout.acc_dtype(dtype)
    ACC = _TL_ACC[acc]
    uv = _uv(us, vs)
    sigmas = torch.empty(plan.n_layers, device=device, dtype=acc)
    item_sum = torch.empty(plan.n_items, device=device, dtype=acc)
    if n_power_iterations > 0:
        t_buf = torch.empty(plan.t_size, device=device, dtype=acc)
        part_buf = torch.empty(plan.part_size, device=device, dtype=acc)
        s_buf = torch.empty(plan.s_size, device=device, dtype=acc)
        cb_sum = torch.empty(plan.n_col_blocks, device=device, dtype=acc)
        for _ in range(n_power_iterations):
            _rows_kernel[(plan.n_items,)](plan.layers, plan.items, uv, t_buf, part_buf, item_sum,
                                          ACC=ACC, ROWS=ROWS, BLOCK_K=BLOCK_K)
            _columns_kernel[(plan.n_col_blocks,)](plan.layers, plan.items, plan.col_blocks, part_buf,
                                                  item_sum, s_buf, cb_sum, eps, ACC=ACC,
                                                  BLOCK_C=BLOCK_C)
            _finish_kernel[(plan.n_layers,)](plan.layers, uv, t_buf, s_buf, item_sum, cb_sum,
                                             sigmas, eps, ACC=ACC, BLOCK=1024)
    else:
        _uwv_kernel[(plan.n_items,)](plan.layers, plan.items, uv, item_sum, ACC=ACC, ROWS=ROWS,
                                     BLOCK_K=BLOCK_K)
        _sigma_kernel[(plan.n_layers,)](plan.layers, item_sum, sigmas, ACC=ACC)
    out = torch.empty(plan.total if write_out else 0, device=device, dtype=dtype)
    if write_out:
        _divide_kernel[(plan.n_items,)](plan.layers, plan.items, uv, out, sigmas, eps, ACC=ACC,
                                        ROWS=ROWS, BLOCK_K=BLOCK_K)
    return out, sigmas, uv


def _run_backward(grad: torch.Tensor, weights, uv: torch.Tensor, sigmas: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """Flat dL/dW for the flat dL/dW_sn."""
    weights = [w.contiguous() for w in weights]
    plan = _plan(weights)
    ACC = _TL_ACC[_layout.acc_dtype(weights[0].dtype)]
    grad = grad.contiguous()
    item_sum = torch.empty(plan.n_items, device=grad.device, dtype=sigmas.dtype)
    out = torch.empty(plan.total, device=grad.device, dtype=weights[0].dtype)
    _grad_dot_kernel[(plan.n_items,)](plan.layers, plan.items, uv, grad, item_sum, ACC=ACC,
                                      ROWS=ROWS, BLOCK_K=BLOCK_K)
    _grad_kernel[(plan.n_items,)](plan.layers, plan.items, uv, grad, out, sigmas, item_sum, eps,
                                  ACC=ACC, ROWS=ROWS, BLOCK_K=BLOCK_K)
    return out


# --------------------------------------------------------------------- custom ops

def _acc_empty(weights, n):
    return weights[0].new_empty(n, dtype=_layout.acc_dtype(weights[0].dtype))


@torch.library.custom_op("lipkernels_triton::power_iteration", mutates_args=())
def power_iteration_op(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                       n_power_iterations: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, uv): the iteration on copies of the vectors, returned flat in uv."""
    _, sigmas, uv = _run_forward(weights, us, vs, n_power_iterations, eps, write_out=False)
    return sigmas, uv


@power_iteration_op.register_fake
def _(weights, us, vs, n_power_iterations, eps):
    return (_acc_empty(weights, len(weights)),
            weights[0].new_empty(sum(u.numel() + v.numel() for u, v in zip(us, vs))))


@torch.library.custom_op("lipkernels_triton::sn_forward", mutates_args=())
def sn_forward(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
               n_power_iterations: int, eps: float
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat W_sn, sigmas, uv); differentiable in the weights (u, v constants)."""
    return _run_forward(weights, us, vs, n_power_iterations, eps, write_out=True)


@sn_forward.register_fake
def _(weights, us, vs, n_power_iterations, eps):
    return (weights[0].new_empty(sum(w.numel() for w in weights)),
            _acc_empty(weights, len(weights)),
            weights[0].new_empty(sum(u.numel() + v.numel() for u, v in zip(us, vs))))


@torch.library.custom_op("lipkernels_triton::sn_backward", mutates_args=())
def sn_backward(grad: torch.Tensor, weights: List[torch.Tensor], uv: torch.Tensor,
                sigmas: torch.Tensor, eps: float) -> torch.Tensor:
    """Flat (G - <G, W_sn> u v^T) / sigma for the flat G."""
    return _run_backward(grad, weights, uv, sigmas, eps)


@sn_backward.register_fake
def _(grad, weights, uv, sigmas, eps):
    return torch.empty_like(grad)


def _split(flat: torch.Tensor, weights) -> List[torch.Tensor]:
    return [t.view(w.shape) for t, w in zip(flat.split([w.numel() for w in weights]), weights)]


def _setup_forward(ctx, inputs, output):
    weights, us, vs, n_power_iterations, eps = inputs
    _, sigmas, uv = output
    ctx.save_for_backward(uv, sigmas, *weights)
    ctx.eps = eps


def _backward_forward(ctx, grad_flat, _grad_sigmas, _grad_uv):
    uv, sigmas, *weights = ctx.saved_tensors
    none = [None] * len(weights)  # the backward returns the inputs' structure (lists for lists)
    if grad_flat is None:
        return none, none, none, None, None
    if torch.is_grad_enabled() or torch._C._functorch.is_legacy_batchedtensor(grad_flat):
        # create_graph: the formula with torch ops, sigma recomputed from W (u, v constant).
        # Also for gradients batched by the legacy vmap (gradcheck's check_batched_grad,
        # is_grads_batched), which has no rule for an op taking Tensor[]: torch ops batch.
        grads, off = [], 0
        for w, g in zip(weights, _split(grad_flat, weights)):
            m = w.shape[0]
            k = w.numel() // m
            u, v = uv[off:off + m], uv[off + m:off + m + k]
            off += m + k
            sigma = torch.dot(u, torch.mv(w.reshape(m, k), v))
            clamped = sigma.abs() < ctx.eps
            s = torch.where(clamped, torch.full_like(sigma, ctx.eps), sigma)
            c = torch.where(clamped, torch.zeros_like(sigma), (g * (w / s)).sum())
            grads.append((g - c * torch.outer(u, v).view_as(w)) / s)
        return grads, none, none, None, None
    return _split(sn_backward(grad_flat, weights, uv, sigmas, ctx.eps), weights), none, none, None, None


sn_forward.register_autograd(_backward_forward, setup_context=_setup_forward)


# --------------------------------------------------------------------- entry points

@torch.no_grad()
def _store(us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], uv: torch.Tensor) -> None:
    sizes = [x.numel() for pair in zip(us, vs) for x in pair]
    torch._foreach_copy_([x for pair in zip(us, vs) for x in pair], list(uv.split(sizes)))


def power_iteration(weights, us, vs, n_power_iterations: int, eps: float) -> torch.Tensor:
    sigmas, uv = power_iteration_op([w.detach() for w in weights], list(us), list(vs),
                                    n_power_iterations, eps)
    if n_power_iterations > 0:
        _store(us, vs, uv)
    return sigmas


def spectral_normalize(weights, us, vs, n_power_iterations: int, eps: float,
                       training: bool) -> List[torch.Tensor]:
    iters = n_power_iterations if training else 0
    flat, _, uv = sn_forward(list(weights), list(us), list(vs), iters, eps)
    if iters > 0:
        _store(us, vs, uv)
    return _split(flat, weights)


# Batching rules (torch.func.vmap, is_grads_batched): lipkernels/_batching.py.
def _register_vmap() -> None:
    import sys
    _batching.register_triton(spectral_norm=sys.modules[__name__])


_register_vmap()
