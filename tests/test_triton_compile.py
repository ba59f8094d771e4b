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

from triton.backends.compiler import GPUTarget  # noqa: E402

from lipkernels.triton.kernel_specs import (DTYPES, compile_kernel, sample_norm_kernels,  # noqa: E402
                                            spectral_norm_kernels)

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}


# Every dtype for sm_90; float32 for sm_80 (the dtype paths are shared).
CASES = [(family, dtype, target) for family in ("sample_norm", "spectral_norm")
         for dtype in DTYPES for target in TARGETS if target == "sm_90" or dtype == "fp32"]


@pytest.mark.parametrize("family,dtype,target", CASES)
def test_kernels_compile(family, dtype, target):
    t, acc = DTYPES[dtype]
    kernels = sample_norm_kernels(t, acc) if family == "sample_norm" else spectral_norm_kernels(t, acc)
    for fn, signature, constexprs in kernels:
        assert len(compile_kernel(fn, signature, constexprs, TARGETS[target]).asm["cubin"]) > 0
