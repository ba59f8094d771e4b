"""Fake (meta) kernels of the compiled operators, so ``torch.compile``, FakeTensor and
``torch.library.opcheck`` can trace them. Shapes and dtypes only; the schemas are
declared once, in csrc/ops.cpp."""
from __future__ import annotations

import torch

from .. import _extension
from .._layout import acc_dtype as _acc
from .._layout import empty_like_sample_blocks as _like_sample_blocks
from .._layout import epilogue_out_dtype


def _per_sample(g: torch.Tensor) -> torch.Tensor:
    return g.new_empty((g.shape[0],))


def namespaces():
    """The compiled operator namespaces: ``lipkernels``, and in an emulation build
    ``lipkernels_cuda_emu`` (the same schemas; the CUDA kernels run on CPU tensors)."""
    if not _extension.loaded():
        return []
    return ["lipkernels"] + (["lipkernels_cuda_emu"] if _extension.cuda_emulated() else [])


def register() -> None:
    for ns in namespaces():
        _register(ns + "::")


def _register(lib: str) -> None:
    fake = torch.library.register_fake

    @fake(lib + "_norm_epilogue")
    def _(g, f, epilogue, param):
        return (g.new_empty((g.shape[0],), dtype=epilogue_out_dtype(epilogue, g.dtype)),
                g.new_empty((g.shape[0],), dtype=_acc(g.dtype)))

    @fake(lib + "_norm_epilogue_backward")
    def _(grad_out, g, f, norm, epilogue, param):
        grad_f = g.new_empty((g.shape[0],) if f is not None else (0,))
        return grad_f, _like_sample_blocks(g)

    @fake(lib + "sample_norm")
    def _(g):
        return _per_sample(g)

    @fake(lib + "gn_normalize")
    def _(f, g):
        return torch.empty_like(f)

    @fake(lib + "gran_normalize")
    def _(f, g, eps):
        return torch.empty_like(f)

    @fake(lib + "gradient_penalty")
    def _(g, center):
        return g.new_empty((), dtype=_acc(g.dtype))

    @fake(lib + "r1_penalty")
    def _(g):
        return g.new_empty((), dtype=_acc(g.dtype))

    @fake(lib + "sample_scale")
    def _(g, c):
        return _like_sample_blocks(g)

    @fake(lib + "sample_dot")
    def _(a, b):
        return _per_sample(a)

    @fake(lib + "power_iteration")
    def _(weights, us, vs, n_power_iterations, eps):
        if not weights:
            return torch.empty(0)
        return weights[0].new_empty((len(weights),), dtype=_acc(weights[0].dtype))

    @fake(lib + "spectral_normalize")
    def _(weights, us, vs, n_power_iterations, eps, training):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]

    @fake(lib + "_sn_forward")
    def _(weights, us, vs, n_power_iterations, eps):
        dtype = weights[0].dtype if weights else torch.float32
        like = weights[0] if weights else torch.empty(0)
        outs = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
        sigmas = like.new_empty((len(weights),), dtype=_acc(dtype))
        uv = like.new_empty((sum(u.shape[0] + v.shape[0] for u, v in zip(us, vs)),), dtype=dtype)
        return outs, sigmas, uv

    @fake(lib + "_sn_store_vectors_")
    def _(us, vs, uv):
        return None

    @fake(lib + "_sn_backward")
    def _(grads, weights, uv, sigmas, eps):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]

    @fake(lib + "clip_")
    def _(tensors, c):
        return None
