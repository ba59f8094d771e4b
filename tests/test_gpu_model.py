"""The GPU cost model's pieces that need no emulation build: occupancy, the ptxas report
parser (and, where `make cuda-check` ran, the real reports: every CUDA kernel is there,
without spills), the trace of torch's eager spectral norm, and the tables."""
from __future__ import annotations

import os

import pytest
import torch

from lipkernels.benchmark import gpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_occupancy_closed_forms():
    # 256 threads, 32 registers: 8 blocks of 8 warps fill the 64 warps of an SM.
    assert gpu_model.occupancy(256, 32, 0) == dict(blocks_per_sm=8, occupancy=1.0, limiter="threads")
    # 128 registers: 4096 per warp, 16 warps of registers, 2 blocks of 8 warps: 25 %.
    occ = gpu_model.occupancy(256, 128, 0)
    assert occ["blocks_per_sm"] == 2 and occ["occupancy"] == 0.25 and occ["limiter"] == "registers"
    # 47 KiB of shared memory (+1 KiB reserved): 4 blocks in 228 KiB.
    occ = gpu_model.occupancy(256, 32, 47 * 1024)
    assert occ["blocks_per_sm"] == 4 and occ["limiter"] == "shared memory"
    # Registers are allocated per warp in units of 256: 33 registers cost 40 per thread.
    assert gpu_model.occupancy(32, 33, 0)["blocks_per_sm"] == min(32, 65536 // (40 * 32))


REPORT = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 96 bytes smem
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Used 10 registers, used 0 barriers
"""


def test_ptxas_report_parser():
    parsed = gpu_model.parse_ptxas(REPORT)
    assert parsed == {"_Z3fooPf": dict(regs=40, spill_stores=8, spill_loads=12, stack=16, smem=96),
                      "_Z3barv": dict(regs=10, spill_stores=0, spill_loads=0, stack=0, smem=0)}
    assert gpu_model.parse_ptxas(REPORT, arch=80)["_Z3fooPf"]["regs"] == 20


def test_cuda_kernels_compiled_without_spills():
    """make cuda-check keeps ptxas's report: every kernel of csrc/cuda/*.cu, every dtype,
    for sm_90, without register spills."""
    reports = [p for p in ("multi_tensor", "sample_norm", "spectral_norm")
               if os.path.exists(os.path.join(ROOT, "build", "nvcc", p + ".ptxas.txt"))]
    if len(reports) < 3:
        message = "ptxas reports missing (make cuda-check writes build/nvcc/*.ptxas.txt)"
        if os.environ.get("LIPKERNELS_REQUIRE_NVCC") == "1":
            pytest.fail(message)
        pytest.skip(message)
    res = gpu_model.cuda_resources()
    for kernel in ("sample_reduce_kernel", "sample_finish_kernel", "sample_scale_kernel", "sn_pass_kernel",
                   "sn_colreduce_kernel", "sn_finish0_kernel", "sn_divide_kernel", "sn_backward_dot_kernel",
                   "sn_backward_scale_kernel", "multi_tensor_kernel"):
        for dtype in ("float", "double", "__half", "__nv_bfloat16"):
            found = [name for name in res if name.startswith(f"{kernel}<{dtype}")]
            assert found, f"{kernel}<{dtype}...> not in the ptxas reports: {sorted(res)}"
    spilling = {name: r for name, r in res.items() if r["spill_stores"] or r["spill_loads"]}
    assert not spilling, f"register spills: {spilling}"


def test_torch_eager_spectral_norm_trace():
    """torch's eager spectral norm, traced: at least one kernel per layer for each of its two
    matrix-vector products and its sigma, and W read at least three times (the two
    products and u^T W v) and W_sn written once."""
    model = gpu_model.torch_eager_model("sngan_cnn")
    ws, _, _ = gpu_model._sn_weights("sngan_cnn")
    wbytes = sum(w.numel() * w.element_size() for w in ws)
    assert model["layers"] == len(ws) == 8
    assert model["ops"].get("mv", 0) >= 3 * len(ws)
    assert model["kernels"] >= 10 * len(ws)
    assert model["bytes"] >= 4 * wbytes


def test_tables_and_markdown_label_the_model():
    row = dict(backend="cuda", op="sample_norm", shape="64x3x32x32", mode="fwd", launches=1, kernels=["k"],
               minimum=1000, dynamic_smem={"k": 0}, load_bytes=1000, store_bytes=8, load_requests=4,
               load_unique_bytes=1000, load_sectors=32, dram_load_bytes=1024, dram_store_bytes=32,
               dram_scratch_bytes=0)
    report = dict(label="MODEL, not a measurement", lipkernels="0", torch=torch.__version__, date="d",
                  rows=[row], resources={"cuda": {"k": dict(regs=32, spill_stores=0, spill_loads=0, smem=0,
                                                            threads=256)}},
                  eager_torch={}, notes=[])
    t = gpu_model.tables(report)
    assert t["ops"][1][:6] == ["sample_norm", "64x3x32x32", "fwd", "cuda", "1", "1.06 kB"]
    assert t["ops"][1][6] == "1.06"  # (1024 + 32) / 1000
    md = gpu_model.markdown(report)
    assert "MODEL, not a measurement" in md and "| sample_norm |" in md
