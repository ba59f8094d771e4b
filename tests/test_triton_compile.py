"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, for every dtype, without
a GPU (Triton's compiler needs no device). The interpreter runs the kernels' logic in
numpy and does not see what only the GPU compiler checks (types of pointer casts, loop
bounds, layouts); this does. Compiled in the process that runs the test suite, not under
TRITON_INTERPRET."""
from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles GPU code: runs without TRITON_INTERPRET", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lipkernels.triton import sample_norm as tsn  # noqa: E402
from lipkernels.triton import spectral_norm as tspec  # noqa: E402

# element type of the data, accumulation type
DTYPES = {"fp32": ("fp32", tl.float32), "fp16": ("fp16", tl.float32), "bf16": ("bf16", tl.float32),
          "fp64": ("fp64", tl.float64)}
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}


def _compile(fn, signature: dict, constexprs: dict, target) -> None:
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
    assert len(kernel.asm["cubin"]) > 0


def _sample_norm_kernels(t, acc):
    a = "fp64" if acc == tl.float64 else "fp32"
    p, pa = f"*{t}", f"*{a}"
    for dot in (False, True):
        yield tsn._sumsq_kernel, dict(a_ptr=p, b_ptr=p, part_ptr=pa, N="i64", n_chunks="i32"), \
            dict(ACC=acc, DOT=dot, CHUNK=tsn.CHUNK, BLOCK=tsn.BLOCK)
    for epi in range(5):
        for has_f in (False, True):
            yield tsn._finish_kernel, dict(part_ptr=pa, f_ptr=p, f_stride="i32", out_ptr=p, norm_ptr=pa,
                                           n_chunks="i32", param="fp32"), \
                dict(EPI=epi, HAS_F=has_f, SQRT=True, ACC=acc, BLOCK_C=16)
            yield tsn._scale_kernel, dict(g_ptr=p, out_ptr=p, coef_ptr=pa, go_ptr=pa, f_ptr=p, f_stride="i32",
                                          norm_ptr=pa, grad_f_ptr=p, N="i64", n_chunks="i32", param="fp32"), \
                dict(EPI=epi, FROM_EPILOGUE=True, HAS_F=has_f, ACC=acc, CHUNK=tsn.CHUNK, BLOCK=tsn.BLOCK)
    yield tsn._finish_kernel, dict(part_ptr=pa, f_ptr=pa, f_stride="i32", out_ptr=p, norm_ptr=pa,
                                   n_chunks="i32", param="fp32"), \
        dict(EPI=0, HAS_F=False, SQRT=False, ACC=acc, BLOCK_C=16)
    yield tsn._scale_kernel, dict(g_ptr=p, out_ptr=p, coef_ptr=pa, go_ptr=pa, f_ptr=pa, f_stride="i32",
                                  norm_ptr=pa, grad_f_ptr=pa, N="i64", n_chunks="i32", param="fp32"), \
        dict(EPI=0, FROM_EPILOGUE=False, HAS_F=False, ACC=acc, CHUNK=tsn.CHUNK, BLOCK=tsn.BLOCK)


def _spectral_kernels(t, acc):
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


# Every dtype for sm_90; float32 for sm_80 (the dtype paths are shared).
CASES = [(family, dtype, target) for family in ("sample_norm", "spectral_norm")
         for dtype in DTYPES for target in TARGETS if target == "sm_90" or dtype == "fp32"]


@pytest.mark.parametrize("family,dtype,target", CASES)
def test_kernels_compile(family, dtype, target):
    t, acc = DTYPES[dtype]
    kernels = _sample_norm_kernels(t, acc) if family == "sample_norm" else _spectral_kernels(t, acc)
    for fn, signature, constexprs in kernels:
        _compile(fn, signature, constexprs, TARGETS[target])
