"""vmap batching rules of the backends' kernel ops, and the helpers that fold a vmapped
dim into a kernel's batch.

The compiled backends' autograd (C++, torch.library) calls their kernel ops in its
backward; when that backward runs under vmap (``is_grads_batched=True``, gradcheck's
batched-gradient check, jacrev of a function computed outside the transform) they get
batched gradients. Their rules fold the vmapped dim into the batch (per-sample ops:
``(V, B, ...) -> (V * B, ...)``, exact since they are per sample) or into more layers
(spectral norm: each vmapped slice of a layer a layer of its own), and run the kernel
once.

This module sits below the ops and the backends, so each backend registers its own
rules (lipkernels/ops/__init__.py for the compiled namespaces, lipkernels/triton for
its custom ops) and the torch.func rules of lipkernels/ops/_func.py share the helpers,
without either importing the other.
"""
from __future__ import annotations

from typing import Optional

import torch


def _front(t: Optional[torch.Tensor], d: Optional[int], size: int) -> Optional[torch.Tensor]:
    """t with its vmapped dim first (an unbatched t expanded to ``size`` there)."""
    if t is None:
        return None
    if d is None:
        return t.expand((size,) + tuple(t.shape))
    return t.movedim(d, 0)


def _fold(t: Optional[torch.Tensor], d: Optional[int], size: int) -> Optional[torch.Tensor]:
    """(V, B, ...) -> (V * B, ...) (explicit sizes: B may be 0)."""
    t = _front(t, d, size)
    return None if t is None else t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def _unfold(t: torch.Tensor, size: int, batch: int) -> torch.Tensor:
    """(V * B, ...) -> (V, B, ...); a kernel's empty placeholder output (dL/df without
    f: 0 elements whatever B is) -> (V, 0)."""
    rows = batch if t.shape[0] == size * batch else 0
    return t.reshape((size, rows) + tuple(t.shape[1:]))


def _dims_of(d, n):
    """in_dims of a list argument: one per element (torch gives a list; an int/None
    applies to all)."""
    return list(d) if isinstance(d, (list, tuple)) else [d] * n


def _rule_per_sample(op, n_tensors: int, n_out: int):
    """A per-sample kernel op: its first ``n_tensors`` arguments are (B, ...) tensors (or
    None), its ``n_out`` outputs (B, ...) (an output of 0 elements stays empty)."""
    def rule(info, in_dims, *args):
        size = info.batch_size
        folded = [_fold(t, d, size) for t, d in zip(args[:n_tensors], in_dims[:n_tensors])]
        batch = next(t.shape[0] for t in folded if t is not None) // size if size else 0
        out = op(*folded, *args[n_tensors:])
        if n_out == 1:
            return _unfold(out, size, batch), 0
        return tuple(_unfold(o, size, batch) for o in out), (0,) * n_out
    return rule


def _slices(t, d, size):
    return list(_front(t, d, size)) if d is not None else [t] * size


def _rule_sn_backward_lists(op):
    """``_sn_backward(grads[], weights[], uv, sigmas, eps) -> Tensor[]``: V * L layers."""
    def rule(info, in_dims, grads, weights, uv, sigmas, eps):
        size, n = info.batch_size, len(weights)
        g_d, w_d = _dims_of(in_dims[0], n), _dims_of(in_dims[1], n)
        gs = [_slices(g, d, size) for g, d in zip(grads, g_d)]
        ws = [_slices(w, d, size) for w, d in zip(weights, w_d)]
        out = op([gs[l][i] for i in range(size) for l in range(n)],
                 [ws[l][i] for i in range(size) for l in range(n)],
                 torch.cat(_slices(uv, in_dims[2], size)),
                 torch.cat(_slices(sigmas, in_dims[3], size)), eps)
        return [torch.stack(list(out[l::n])) for l in range(n)], [0] * n
    return rule


def _rule_sn_backward_flat(op):
    """Triton's ``sn_backward(grad_flat, weights[], uv, sigmas, eps) -> flat``."""
    def rule(info, in_dims, grad, weights, uv, sigmas, eps):
        size, n = info.batch_size, len(weights)
        w_d = _dims_of(in_dims[1], n)
        ws = [_slices(w, d, size) for w, d in zip(weights, w_d)]
        out = op(torch.cat(_slices(grad, in_dims[0], size)),
                 [ws[l][i] for i in range(size) for l in range(n)],
                 torch.cat(_slices(uv, in_dims[2], size)),
                 torch.cat(_slices(sigmas, in_dims[3], size)), eps)
        return out.reshape(size, -1), 0
    return rule


def register(ns: str) -> None:
    """The batching rules of the compiled operator namespace ``ns`` (lipkernels,
    lipkernels_cuda_emu)."""
    ops = getattr(torch.ops, ns)
    rules = {
        "_norm_epilogue": _rule_per_sample(ops._norm_epilogue, 2, 2),
        "_norm_epilogue_backward": _rule_per_sample(ops._norm_epilogue_backward, 4, 2),
        "sample_scale": _rule_per_sample(ops.sample_scale, 2, 1),
        "sample_dot": _rule_per_sample(ops.sample_dot, 2, 1),
        "_sn_backward": _rule_sn_backward_lists(ops._sn_backward),
    }
    for name, rule in rules.items():
        torch.library.register_vmap(f"{ns}::{name}", rule)


def register_triton(sample_norm=None, spectral_norm=None) -> None:
    """The batching rules of the Triton backend's custom ops (lipkernels_triton::), each
    kernel module registering its own on import."""
    if sample_norm is not None:
        sample_norm.norm_epilogue.register_vmap(_rule_per_sample(sample_norm.norm_epilogue, 2, 2))
        sample_norm.norm_epilogue_backward.register_vmap(
            _rule_per_sample(sample_norm.norm_epilogue_backward, 4, 2))
        sample_norm.sample_scale.register_vmap(_rule_per_sample(sample_norm.sample_scale, 2, 1))
        sample_norm.sample_dot.register_vmap(_rule_per_sample(sample_norm.sample_dot, 2, 1))
    if spectral_norm is not None:
        spectral_norm.sn_backward.register_vmap(_rule_sn_backward_flat(spectral_norm.sn_backward))
