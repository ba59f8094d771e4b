"""Every Triton kernel of the backend with the argument types and compile-time constants it
is launched with, for compiling it ahead of time without a GPU (Triton's compiler needs
no device): tests/test_triton_compile.py compiles each for sm_80 and sm_90, and
``lipkernels bench --gpu-model`` reads the registers, spills and shared memory of the
sm_90 cubins."""
from __future__ import annotations

from typing import Iterator, Tuple

import triton.language as tl

from . import sample_norm as tsn
from . import spectral_norm as tspec

# element type of the data, accumulation type
DTYPES = {"fp32": ("fp32", tl.float32), "fp16": ("fp16", tl.float32), "bf16": ("bf16", tl.float32),
          "fp64": ("fp64", tl.float64)}


def compile_kernel(fn, signature: dict, constexprs: dict, target):
    """triton.compile of one kernel variant for a target (a GPUTarget)."""
    import triton
    from triton.compiler import ASTSource
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)


def sample_norm_kernels(t, acc) -> Iterator[Tuple]:
    """(kernel, signature, constexprs) of every per-sample kernel variant for element type t."""
    a = "fp64" if acc == tl.float64 else "fp32"
    p, pa = f"*{t}", f"*{a}"
    for dot in (False, True):
        yield tsn._sumsq_kernel, dict(a_ptr=p, b_ptr=p, part_ptr=pa, N="i64", n_chunks="i32"), \
            dict(ACC=acc, DOT=dot, CHUNK=tsn.CHUNK, BLOCK=tsn.BLOCK)
    for epi in range(5):
        for has_f in (False, True):
            yield tsn._finish_kernel, dict(part_ptr=pa, a_ptr=p, N="i64", f_ptr=p, f_stride="i32", out_ptr=p, norm_ptr=pa,
                                           n_chunks="i32", param="fp32"), \
                dict(EPI=epi, HAS_F=has_f, SQRT=True, ACC=acc, BLOCK_C=16)
            yield tsn._scale_kernel, dict(g_ptr=p, out_ptr=p, coef_ptr=pa, go_ptr=pa, f_ptr=p, f_stride="i32",
                                          norm_ptr=pa, grad_f_ptr=p, N="i64", n_chunks="i32", param="fp32"), \
                dict(EPI=epi, FROM_EPILOGUE=True, HAS_F=has_f, ACC=acc, CHUNK=tsn.CHUNK, BLOCK=tsn.BLOCK)
    yield tsn._finish_kernel, dict(part_ptr=pa, a_ptr=p, N="i64", f_ptr=pa, f_stride="i32", out_ptr=p, norm_ptr=pa,
                                   n_chunks="i32", param="fp32"), \
        dict(EPI=0, HAS_F=False, SQRT=False, ACC=acc, BLOCK_C=16)
    yield tsn._scale_kernel, dict(g_ptr=p, out_ptr=p, coef_ptr=pa, go_ptr=pa, f_ptr=pa, f_stride="i32",
                                  norm_ptr=pa, grad_f_ptr=pa, N="i64", n_chunks="i32", param="fp32"), \
        dict(EPI=0, FROM_EPILOGUE=False, HAS_F=False, ACC=acc, CHUNK=tsn.CHUNK, BLOCK=tsn.BLOCK)


def spectral_norm_kernels(t, acc) -> Iterator[Tuple]:
    """(kernel, signature, constexprs) of every spectral-norm kernel for element type t."""
    a = "fp64" if acc == tl.float64 else "fp32"
    p, pa, tab = f"*{t}", f"*{a}", "*i64"
    tile = dict(ACC=acc, ROWS=tspec.ROWS, BLOCK_K=tspec.BLOCK_K)
    yield tspec._rows_kernel, dict(layers=tab, items=tab, uv=p, t_buf=pa, part_buf=pa, item_sum=pa), tile
    yield tspec._columns_kernel, dict(layers=tab, items=tab, col_blocks=tab, part_buf=pa, item_sum=pa,
                                      s_buf=pa, cb_sum=pa, eps="fp32"), dict(ACC=acc, BLOCK_C=tspec.BLOCK_C)
    yield tspec._finish_kernel, dict(layers=tab, uv=p, t_buf=pa, s_buf=pa, item_sum=pa, cb_sum=pa,
                                     sigmas=pa, eps="fp32"), dict(ACC=acc, BLOCK=1024)
    yield tspec._uwv_kernel, dict(layers=tab, items=tab, uv=p, item_sum=pa), tile
    yield tspec._sigma_kernel, dict(layers=tab, item_sum=pa, sigmas=pa), dict(ACC=acc)
    yield tspec._divide_kernel, dict(layers=tab, items=tab, uv=p, out=p, sigmas=pa, eps="fp32"), tile
    yield tspec._grad_dot_kernel, dict(layers=tab, items=tab, uv=p, grad=p, item_sum=pa), tile
    yield tspec._grad_kernel, dict(layers=tab, items=tab, uv=p, grad=p, out=p, sigmas=pa, item_sum=pa,
                                   eps="fp32"), tile
