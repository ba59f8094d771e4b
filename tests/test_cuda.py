"""The CUDA backend (csrc/cuda/).

Its kernels run here in one of two ways:

* on a GPU (torch.cuda.is_available() and the library compiled with CUDA kernels), on
  CUDA tensors;
* in an emulation build (LIPKERNELS_CUDA_EMULATION: the same kernel sources compiled for
  the host, csrc/cuda/emulation/), on CPU tensors: how CI runs them, plain and under
  AddressSanitizer + UndefinedBehaviorSanitizer and ThreadSanitizer.

Either way: every CUDA kernel against the float64 reference, forward and gradients, all
dtypes, odd shapes (one sample, sizes that are no multiple of any block or 16-byte pack,
a 1 x 8192 layer, 512 x 4608, many 16 KiB chunks per sample), unaligned (offset)
pointers, more layers than one launch's table holds, layers too wide for shared memory,
opcheck, determinism, and the launches per call that the README states. On a GPU only
(skipped in the emulation, with the reason): no host synchronisation, the current
stream, a second device, a CUDA-graph capture, and the Triton backend cross-checked.
Without either, these are skipped, with the reason.

Everywhere: the nvcc compile check's outputs (`make cuda-check`) are present for every
csrc/cuda/*.cu and both sm_80 and sm_90 (required when LIPKERNELS_REQUIRE_NVCC=1, as
in CI), and `lipkernels info` says why CUDA is unavailable, or that it is emulated.

LIPKERNELS_CUDA_TESTS_DEVICE=cpu runs the GPU tests' logic on the CPU backend instead:
a self-check of this file where no GPU is at hand (CUDA-only tests stay skipped).
"""
from __future__ import annotations

import glob
import os
import struct

import pytest
import torch
import torch.nn.functional as F

import lipkernels
from lipkernels import _extension, backends, cli, ops

from conftest import PER_SAMPLE_OPS, assert_close, run_per_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRY_RUN = os.environ.get("LIPKERNELS_CUDA_TESTS_DEVICE") == "cpu"
EMULATED = _extension.cuda_emulated() and not DRY_RUN
HAVE_GPU = (torch.cuda.is_available() and lipkernels.backend_status()["cuda"][0]
            and not _extension.cuda_emulated())
RUNS = HAVE_GPU or EMULATED or DRY_RUN
DEVICE = torch.device("cuda" if HAVE_GPU else "cpu")
BACKEND = "cpu" if DRY_RUN else "cuda"
WHY_NOT = ("no GPU here (torch.cuda.is_available() is False) and the library is not an emulation "
           "build (LIPKERNELS_CUDA_EMULATION)" if not torch.cuda.is_available()
           else "the cuda backend is unavailable: " + lipkernels.backend_status()["cuda"][1])

gpu = pytest.mark.skipif(not RUNS, reason=WHY_NOT)
cuda_only = pytest.mark.skipif(not HAVE_GPU, reason=(
    "needs a GPU (streams, CUDA graphs, sync debug mode)" + (": the kernels are emulated on the CPU here"
                                                              if EMULATED else "")))

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HALF = (torch.float16, torch.bfloat16)
#: The CUDA kernels' ops: torch.ops.lipkernels on CUDA tensors, or the emulation build's
#: own namespace on CPU tensors; cpu_lib: the CPU kernels, compared against.
lib = torch.ops.lipkernels_cuda_emu if EMULATED else torch.ops.lipkernels
cpu_lib = torch.ops.lipkernels
#: The large cases: what a GPU runs in milliseconds, scaled to what the emulation (2 CPU
#: cores, 256 threads per block as fibers) runs in seconds, keeping their structure
#: (many 16 KiB chunks per sample; a layer of many pass items).
LARGE_SAMPLE = (8, 3, 256, 256) if HAVE_GPU else (2, 3, 80, 81)


@pytest.fixture
def on_device():
    """The backend under test selected (cuda, or cpu in a dry run)."""
    with lipkernels.use_backend(BACKEND):
        yield


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def _offset(shape, dtype, offset: int) -> torch.Tensor:
    """A contiguous tensor whose data starts `offset` elements into its storage (so its
    pointer is not 16-byte aligned unless offset * itemsize is a multiple of 16)."""
    n = torch.Size(shape).numel()
    base = _dev(torch.randn(n + offset, dtype=torch.float64).to(dtype))
    return base[offset:].view(shape)


# ================================================================== per-sample norm family

SAMPLE_OPS = PER_SAMPLE_OPS

# One sample; sizes no multiple of any block (256 threads), pack (2 to 8 elements) or
# chunk (16 KiB); one chunk and many chunks per sample; (8, 3, 256, 256).
SAMPLE_SHAPES = [(1, 7), (3, 1), (5, 3, 7, 9), (2, 70001), (3, 4097), (1, 3, 256, 100),
                 LARGE_SAMPLE]


_run = run_per_sample


def _check_sample_op(name, f, g, dtype):
    op, ref, uses_f = SAMPLE_OPS[name]
    actual = _run(op, f, g, uses_f)
    with lipkernels.use_backend("reference"):
        expected = _run(ref, f.detach().cpu().double(), g.detach().cpu().double(), uses_f)
    for what, a, e in zip(("out", "grad_f" if uses_f else "grad_g", "grad_g"), actual, expected):
        assert a.device.type == DEVICE.type, f"{name} {what} on {a.device}"
        expected_dtype = dtype
        if what == "out" and name in ("gradient_penalty", "r1_penalty") and dtype in HALF:
            expected_dtype = torch.float32
        assert a.dtype == expected_dtype, f"{name}: {what} has dtype {a.dtype}, expected {expected_dtype}"
        assert_close(a, e, dtype=dtype, what=f"{name} {what} {tuple(g.shape)} {dtype}")


@gpu
@pytest.mark.parametrize("shape", SAMPLE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SAMPLE_OPS))
def test_sample_ops_match_reference(on_device, name, dtype, shape):
    g = _dev(torch.randn(shape, dtype=torch.float64).to(dtype))
    f = _dev(torch.randn(shape[0], dtype=torch.float64).to(dtype))
    _check_sample_op(name, f, g, dtype)


@gpu
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SAMPLE_OPS))
def test_sample_ops_unaligned_pointers(on_device, name, dtype, offset):
    """g starting off a 16-byte boundary, with samples that are no whole packs (every
    sample's head and tail are scalar) and with samples that are (N = 4096)."""
    for shape in [(3, 5001), (2, 4096), (1, 40000)]:
        g = _offset(shape, dtype, offset)
        assert g.is_contiguous() and g.data_ptr() % 16 != 0
        f = _dev(torch.randn(shape[0], dtype=torch.float64).to(dtype))
        _check_sample_op(name, f, g, dtype)


@gpu
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_sample_ops_layouts(on_device, layout):
    base = _dev(torch.randn(6, 5, 4, 7, dtype=torch.float64))
    g = {"channels_last": base.to(memory_format=torch.channels_last),
         "transposed": base.transpose(2, 3), "sliced": base[:, 1:4, :, ::2]}[layout]
    f = _dev(torch.randn(6, dtype=torch.float64))
    for name in SAMPLE_OPS:
        _check_sample_op(name, f, g, torch.float64)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (4, 3, 5), (2, 70001), (3, 4097)], ids=str)
def test_sample_scale_and_dot(dtype, shape):
    g = _dev(torch.randn(shape, dtype=torch.float64).to(dtype))
    h = _dev(torch.randn(shape, dtype=torch.float64).to(dtype))
    c = _dev(torch.randn(shape[0], dtype=torch.float64))
    view = (-1,) + (1,) * (len(shape) - 1)
    out = lib.sample_scale(g, c)
    assert out.dtype == dtype and out.shape == g.shape and out.stride() == g.stride()
    assert_close(out, g.double() * c.view(view), dtype=dtype, what="sample_scale")
    dot = lib.sample_dot(g, h)
    assert dot.dtype == dtype and dot.shape == (shape[0],)
    assert_close(dot, (g.double() * h.double()).flatten(1).sum(1), dtype=dtype, what="sample_dot")
    # Differently aligned operands: a offset by one element, b aligned.
    a = _offset(shape, dtype, 1)
    assert_close(lib.sample_dot(a, h), (a.double() * h.double()).flatten(1).sum(1), dtype=dtype,
                 what="sample_dot, a unaligned")
    assert_close(lib.sample_scale(a, c), a.double() * c.view(view), dtype=dtype,
                 what="sample_scale, g unaligned")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", ["norm", "gn", "gran", "gp", "r1"])
def test_norm_epilogue_kernels_match_cpu_kernels(dtype, epilogue):
    """The kernel ops directly: the CUDA outputs equal the CPU kernels' (dtypes, shapes,
    strides, values) for the same inputs."""
    if DRY_RUN:
        pytest.skip("compares CUDA with CPU")
    uses_f = epilogue in ("gn", "gran")
    param = {"gran": 0.5, "gp": 1.0}.get(epilogue, 0.0)
    g = _dev(torch.randn(5, 3, 70, 71, dtype=torch.float64).to(dtype))
    f = _dev(torch.randn(5, dtype=torch.float64).to(dtype)) if uses_f else None
    out, norm = lib._norm_epilogue(g, f, epilogue, param)
    out_c, norm_c = cpu_lib._norm_epilogue(g.cpu(), f.cpu() if uses_f else None, epilogue, param)
    for a, e, what in ((out, out_c, "out"), (norm, norm_c, "norm")):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        assert_close(a, e, dtype=dtype, what=what)
    go = _dev(torch.randn(5, dtype=torch.float64).to(out.dtype))
    grad_f, grad_g = lib._norm_epilogue_backward(go, g, f, norm, epilogue, param)
    grad_f_c, grad_g_c = cpu_lib._norm_epilogue_backward(go.cpu(), g.cpu(), f.cpu() if uses_f else None,
                                                         norm.cpu(), epilogue, param)
    assert grad_g.dtype == dtype and grad_g.stride() == grad_g_c.stride()
    assert grad_f.shape == grad_f_c.shape and grad_f.dtype == grad_f_c.dtype
    assert_close(grad_g, grad_g_c, dtype=dtype, what="grad_g")
    if uses_f:
        assert_close(grad_f, grad_f_c, dtype=dtype, what="grad_f")


@gpu
@pytest.mark.parametrize("name", list(SAMPLE_OPS))
def test_zero_gradient_is_finite(on_device, name):
    op, _, uses_f = SAMPLE_OPS[name]
    g = _dev(torch.zeros(3, 5000))
    f = _dev(torch.tensor([0.0, 1.0, -2.0]))
    for x in _run(op, f, g, uses_f):
        assert torch.isfinite(x).all(), name


@gpu
@pytest.mark.parametrize("name", list(SAMPLE_OPS))
def test_sample_ops_deterministic(on_device, name):
    op, _, uses_f = SAMPLE_OPS[name]
    g = _dev(torch.randn(4, 3, 128, 129))
    f = _dev(torch.randn(4))
    first = _run(op, f, g, uses_f)
    for _ in range(3):
        for a, b in zip(first, _run(op, f, g, uses_f)):
            assert torch.equal(a, b), f"{name}: results differ between runs"


# ================================================================== spectral normalization

SNGAN = [(64, 3, 3, 3), (64, 64, 4, 4), (128, 64, 3, 3), (128, 128, 4, 4), (256, 128, 3, 3),
         (256, 256, 4, 4), (512, 256, 3, 3), (1, 8192)]
ODD = [(1, 5), (7, 1), (3, 17), (33, 5, 3), (1, 8192), (512, 4608), (1000, 3)]
# Wider than shared memory holds for the pass (float32 k > 12032, float64 k > 6016).
WIDE = [(3, 20000), (2, 12289), (5, 6017)]
# More layers than one launch's table (24).
MANY = [(3 + i % 5, 2 + (i * 7) % 11) for i in range(30)]
SHAPE_SETS = {"sngan": SNGAN, "odd": ODD, "wide": WIDE, "many": MANY}


def _layers(shapes, dtype, requires_grad=False, warmup=5, offset=0):
    """Weights and unit vectors on the device under test, after `warmup` reference
    iterations in float64 (as a registered layer's u, v are: see test_spectral_norm_ops).
    offset > 0: weights whose data start `offset` elements into their storage."""
    w64 = [torch.randn(s, dtype=torch.float64) for s in shapes]
    us = [F.normalize(torch.randn(s[0], dtype=torch.float64), dim=0) for s in shapes]
    vs = [F.normalize(torch.randn(torch.Size(s[1:]).numel(), dtype=torch.float64), dim=0)
          for s in shapes]
    ops.power_iteration_reference(w64, us, vs, warmup)
    ws = []
    for w in w64:
        if offset:
            base = torch.empty(w.numel() + offset, dtype=dtype, device=DEVICE)
            base[offset:].copy_(w.flatten())
            w_dev = base[offset:].view(w.shape).detach()
        else:
            w_dev = _dev(w.to(dtype))
        ws.append(w_dev.requires_grad_(requires_grad))
    return ws, [_dev(u.to(dtype)) for u in us], [_dev(v.to(dtype)) for v in vs]


def _clone(ts):
    return [t.detach().clone() for t in ts]


def _cpu64(ts):
    return [t.detach().to("cpu", torch.float64, copy=True) for t in ts]


@gpu
@pytest.mark.parametrize("n_iter", [0, 1, 3])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_power_iteration_matches_reference(on_device, shapes, n_iter, dtype):
    ws, us, vs = _layers(SHAPE_SETS[shapes], dtype)
    us_ref, vs_ref = _cpu64(us), _cpu64(vs)
    sigmas = ops.power_iteration(ws, us, vs, n_iter)
    with lipkernels.use_backend("reference"):
        sig_ref = ops.power_iteration(_cpu64(ws), us_ref, vs_ref, n_iter)
    assert sigmas.device.type == DEVICE.type
    assert sigmas.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(sigmas, sig_ref, dtype=dtype, what="sigmas")
    for i, (u, v, ur, vr) in enumerate(zip(us, vs, us_ref, vs_ref)):
        assert u.dtype == dtype and v.dtype == dtype
        assert_close(u, ur, dtype=dtype, what=f"u[{i}]")
        assert_close(v, vr, dtype=dtype, what=f"v[{i}]")


@gpu
@pytest.mark.parametrize("training,n_iter", [(True, 1), (True, 2), (False, 1)])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spectral_normalize_matches_reference(on_device, shapes, dtype, training, n_iter):
    _check_spectral_normalize(SHAPE_SETS[shapes], dtype, training, n_iter)


def _check_spectral_normalize(shapes, dtype, training, n_iter, offset=0):
    ws, us, vs = _layers(shapes, dtype, requires_grad=True, offset=offset)
    ws_ref = [w.detach().to("cpu", torch.float64, copy=True).requires_grad_(True) for w in ws]
    us_ref, vs_ref = _cpu64(us), _cpu64(vs)
    out = ops.spectral_normalize(ws, us, vs, n_iter, 1e-12, training)
    with lipkernels.use_backend("reference"):
        out_ref = ops.spectral_normalize(ws_ref, us_ref, vs_ref, n_iter, 1e-12, training)
    seeds = [torch.randn(o.shape, dtype=torch.float64) for o in out]
    grads = torch.autograd.grad(out, ws, [_dev(s.to(dtype)) for s in seeds])
    grads_ref = torch.autograd.grad(out_ref, ws_ref, seeds)
    for i in range(len(shapes)):
        assert out[i].shape == ws[i].shape and out[i].dtype == dtype and out[i].device.type == DEVICE.type
        assert_close(out[i], out_ref[i], dtype=dtype, what=f"W_sn[{i}] {shapes[i]}")
        assert_close(grads[i], grads_ref[i], dtype=dtype, what=f"dW[{i}] {shapes[i]}")
        assert_close(us[i], us_ref[i], dtype=dtype, what=f"u[{i}]")
        assert_close(vs[i], vs_ref[i], dtype=dtype, what=f"v[{i}]")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spectral_normalize_unaligned_weights(on_device, dtype):
    """Weights off a 16-byte boundary: the pass's scalar path, and spans whose input and
    output alignments differ (W_sn and dL/dW are freshly allocated, aligned)."""
    _check_spectral_normalize([(64, 3, 3, 3), (7, 64), (1, 8192), (5, 12289)], dtype, True, 2, offset=1)


@gpu
def test_spectral_zero_weight_is_finite(on_device):
    ws, us, vs = _layers([(4, 3), (3, 2, 2), (2, 20000)], torch.float32, requires_grad=True)
    with torch.no_grad():
        ws[0].zero_()
        ws[2].zero_()
    out = ops.spectral_normalize(ws, us, vs)
    grads = torch.autograd.grad(sum(o.sum() for o in out), ws)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    for x in list(out) + list(grads) + us + vs:
        assert torch.isfinite(x).all()


@gpu
def test_spectral_deterministic(on_device):
    ws, us, vs = _layers(SNGAN, torch.float32, requires_grad=True)
    seeds = [torch.randn_like(w) for w in ws]

    def run():
        u, v = _clone(us), _clone(vs)
        out = ops.spectral_normalize(ws, u, v, 2, 1e-12, True)
        return list(out) + list(torch.autograd.grad(out, ws, seeds)) + u + v

    first = run()
    for _ in range(3):
        for a, b in zip(first, run()):
            assert torch.equal(a, b), "spectral norm results differ between runs"


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_iter", [0, 2])
def test_sn_kernel_ops_match_cpu_kernels(dtype, n_iter):
    """_sn_forward (functional), _sn_store_vectors_ and _sn_backward directly against the
    CPU kernels on the same inputs."""
    if DRY_RUN:
        pytest.skip("compares CUDA with CPU")
    shapes = [(64, 3, 3, 3), (33, 5, 3), (1, 8192), (3, 20000)]
    ws, us, vs = _layers(shapes, dtype)
    u0, v0 = _clone(us), _clone(vs)
    w_sn, sigmas, uv = lib._sn_forward(ws, us, vs, n_iter, 1e-12)
    w_sn_c, sigmas_c, uv_c = cpu_lib._sn_forward([w.cpu() for w in ws], [u.cpu() for u in us],
                                                 [v.cpu() for v in vs], n_iter, 1e-12)
    for a, b in zip(us + vs, u0 + v0):
        assert torch.equal(a, b), "_sn_forward must not modify its inputs"
    assert sigmas.dtype == sigmas_c.dtype and uv.dtype == uv_c.dtype and uv.shape == uv_c.shape
    assert_close(sigmas, sigmas_c, dtype=dtype, what="sigmas")
    assert_close(uv, uv_c, dtype=dtype, what="uv")
    for i, (a, b) in enumerate(zip(w_sn, w_sn_c)):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert_close(a, b, dtype=dtype, what=f"W_sn[{i}]")
    lib._sn_store_vectors_(us, vs, uv)
    off = 0
    for u, v in zip(us, vs):
        assert torch.equal(u, uv[off:off + u.numel()])
        off += u.numel()
        assert torch.equal(v, uv[off:off + v.numel()])
        off += v.numel()
    grads = [_dev(torch.randn(w.shape, dtype=torch.float64).to(dtype)) for w in ws]
    dws = lib._sn_backward(grads, ws, uv, sigmas, 1e-12)
    dws_c = cpu_lib._sn_backward([g.cpu() for g in grads], [w.cpu() for w in ws], uv.cpu(), sigmas.cpu(),
                                 1e-12)
    for i, (a, b) in enumerate(zip(dws, dws_c)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, dtype=dtype, what=f"dW[{i}]")


# ================================================================== clip_

@gpu
def test_clip_many_tensors_mixed_dtypes_and_offsets():
    """More tensors than one launch's table (64), four dtypes, offset pointers, empty
    tensors, NaN kept."""
    tensors = []
    for i in range(100):
        dtype = DTYPES[i % 4]
        shape = [(3, 5), (7,), (1, 8192), (0, 3), (33, 17), (4099,)][i % 6]
        t = _offset(shape, dtype, i % 3)
        t.mul_(0.5)
        tensors.append(t)
    tensors[5].view(-1)[0] = float("nan")
    expected = [t.double().clamp(-0.3, 0.3).to(t.dtype) for t in tensors]
    lib.clip_(tensors, 0.3)
    for i, (t, e) in enumerate(zip(tensors, expected)):
        assert torch.equal(t.isnan(), e.isnan()), f"tensors[{i}]: NaN pattern changed"
        assert torch.equal(t.nan_to_num(), e.nan_to_num()), f"tensors[{i}] not clamped like torch"


# ================================================================== opcheck, syncs, streams

@gpu
def test_opcheck_on_device():
    g = _dev(torch.randn(4, 3, 5)).requires_grad_(True)
    f = _dev(torch.randn(4)).requires_grad_(True)
    gd, fd = g.detach(), f.detach()
    _, norm = lib._norm_epilogue(gd, fd, "gn", 0.0)
    ws, us, vs = _layers([(6, 5), (3, 2, 2, 2)], torch.float32, requires_grad=True)
    wd = [w.detach() for w in ws]
    w_sn, sigmas, uv = lib._sn_forward(wd, us, vs, 1, 1e-12)
    cases = [
        (lib.sample_norm, (g,)),
        (lib.gn_normalize, (f, g)),
        (lib.gran_normalize, (f, g, 0.1)),
        (lib.gradient_penalty, (g, 1.0)),
        (lib.r1_penalty, (g,)),
        (lib.sample_scale, (g, f)),
        (lib.sample_dot, (g, _dev(torch.randn(4, 3, 5)).requires_grad_(True))),
        (lib._norm_epilogue, (gd, fd, "gran", 0.5)),
        (lib._norm_epilogue, (gd, None, "gp", 1.0)),
        (lib._norm_epilogue_backward, (_dev(torch.randn(4)), gd, fd, norm, "gn", 0.0)),
        (lib._norm_epilogue_backward, (_dev(torch.randn(4)), gd, None, norm, "r1", 0.0)),
        (lib.sample_norm, (_dev(torch.randn(4, 3, 5, 2)).to(memory_format=torch.channels_last),)),
        (lib.spectral_normalize, (ws, us, vs, 1, 1e-12, True)),
        (lib.spectral_normalize, (ws, us, vs, 1, 1e-12, False)),
        (lib.power_iteration, (wd, us, vs, 2, 1e-12)),
        (lib._sn_forward, (wd, us, vs, 1, 1e-12)),
        (lib._sn_store_vectors_, (_clone(us), _clone(vs), uv)),
        (lib._sn_backward, ([torch.randn_like(w) for w in wd], wd, uv, sigmas, 1e-12)),
        (lib.clip_, ([_dev(torch.randn(5)), _dev(torch.randn(3, 3))], 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@cuda_only
def test_kernel_ops_do_not_synchronize():
    """No op of the CUDA backend synchronises with the host (torch's sync debug mode
    raises on any synchronising call made through torch)."""
    g = _dev(torch.randn(8, 3, 64, 64))
    f = _dev(torch.randn(8))
    ws, us, vs = _layers(SNGAN, torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for e, ff in (("norm", None), ("gn", f), ("gran", f), ("gp", None), ("r1", None)):
            out, norm = lib._norm_epilogue(g, ff, e, 0.5)
            lib._norm_epilogue_backward(torch.ones_like(out), g, ff, norm, e, 0.5)
        lib.sample_scale(g, f)
        lib.sample_dot(g, g)
        lib.power_iteration(ws, us, vs, 2, 1e-12)
        lib.power_iteration(ws, us, vs, 0, 1e-12)
        w_sn, sigmas, uv = lib._sn_forward(ws, us, vs, 1, 1e-12)
        lib._sn_store_vectors_(us, vs, uv)
        lib._sn_backward([torch.ones_like(w) for w in ws], ws, uv, sigmas, 1e-12)
        lib.clip_(ws, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@cuda_only
def test_runs_on_the_current_stream():
    """Work goes to the current stream: results on a side stream are right once that
    stream is waited for."""
    g = _dev(torch.randn(8, 3, 256, 256))
    ws, us, vs = _layers(SNGAN, torch.float32)
    expected_norm = g.double().flatten(1).norm(dim=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        norm = lib.sample_norm(g)
        sig = lib.power_iteration(ws, us, vs, 0, 1e-12)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(norm, expected_norm, dtype=torch.float32, what="norm on a side stream")
    with lipkernels.use_backend("reference"):
        sig_ref = ops.power_iteration(_cpu64(ws), _cpu64(us), _cpu64(vs), 0)
    assert_close(sig, sig_ref, dtype=torch.float32, what="sigmas on a side stream")


@cuda_only
def test_tensors_on_another_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    g = torch.randn(4, 3, 100, device="cuda:1")
    with torch.cuda.device(0):
        assert_close(lib.sample_norm(g), g.double().flatten(1).norm(dim=1), dtype=torch.float32,
                     what="norm on cuda:1")


@cuda_only
def test_cuda_graph_capture_spectral_norm():
    """A spectral-norm forward + backward captured in a CUDA graph and replayed gives
    exactly the eager results (the kernels allocate through torch and never synchronise)."""
    shapes = [(64, 3, 3, 3), (128, 64, 4, 4), (1, 8192), (3, 20000)]
    ws, us, vs = _layers(shapes, torch.float32, requires_grad=True)
    seeds = [torch.randn_like(w) for w in ws]
    u0, v0 = _clone(us), _clone(vs)

    def reset():
        for t, t0 in zip(us + vs, u0 + v0):
            t.copy_(t0)

    def step():
        out = ops.spectral_normalize(ws, us, vs, 1, 1e-12, True)
        grads = torch.autograd.grad(out, ws, seeds)
        return [o.detach() for o in out], list(grads)

    with lipkernels.use_backend("cuda"):
        eager_out, eager_grads = step()
        eager_uv = _clone(us) + _clone(vs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                reset()
                step()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_grads = step()
        for _ in range(2):
            reset()
            graph.replay()
        torch.cuda.synchronize()
    for a, b in zip(static_out + static_grads + us + vs, eager_out + eager_grads + eager_uv):
        assert torch.equal(a, b), "graph replay differs from the eager run"


# ================================================================== against Triton

@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_triton_backend(dtype):
    if not lipkernels.backend_status()["triton"][0]:
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1])
    g = _dev(torch.randn(8, 3, 64, 65, dtype=torch.float64).to(dtype))
    f = _dev(torch.randn(8, dtype=torch.float64).to(dtype))
    results = {}
    for backend in ("cuda", "triton"):
        torch.manual_seed(1)  # the same layers for both backends
        ws, us, vs = _layers(SNGAN, dtype, requires_grad=True)
        with lipkernels.use_backend(backend):
            per_sample = [x for name, (op, _, uses_f) in SAMPLE_OPS.items() for x in _run(op, f, g, uses_f)]
            out = ops.spectral_normalize(ws, us, vs, 1, 1e-12, True)
            grads = torch.autograd.grad(out, ws, [torch.ones_like(o) for o in out])
        results[backend] = per_sample + list(out) + list(grads) + us + vs
    for i, (a, b) in enumerate(zip(results["cuda"], results["triton"])):
        assert_close(a, b.to(a.dtype), dtype=dtype, what=f"cuda vs triton, output {i}")


# ================================================================== every kernel; launches per call

def _recorded(fn):
    """fn() and, in the emulation build, the names of the kernels it launched, in order."""
    if not EMULATED:
        fn()
        return None
    from lipkernels.benchmark import counting
    with counting.record("cuda") as rec:
        fn()
    return rec


#: Every kernel of csrc/cuda/*.cu (float32 instances) and the backward's memset.
ALL_KERNELS = {
    "sample_reduce_kernel<float, false>", "sample_reduce_kernel<float, true>", "sample_finish_kernel<float>",
    "sample_scale_kernel<float>", "sn_pass_kernel<float, false>", "sn_pass_kernel<float, true>",
    "sn_colreduce_kernel<float>", "sn_finish0_kernel<float>", "sn_divide_kernel<float>",
    "sn_backward_dot_kernel<float>", "sn_backward_scale_kernel<float>", "multi_tensor_kernel<float, false>",
    "multi_tensor_kernel<float, true>", "cudaMemsetAsync",
}


@gpu
@pytest.mark.tsan_subset
@pytest.mark.sanitizer_subset
def test_every_kernel_with_several_blocks_and_a_partial_last_block(on_device):
    """Every kernel, with grids of several blocks whose last block has a partial chunk,
    span, item or warp, against the reference: the subset that CI runs under
    ThreadSanitizer (make sanitize-tsan); in the emulation build the launch records
    show that every kernel ran, on more than one block."""
    # Samples of 5000 float32: 2 chunks of 16 KiB each, the second partial; 9 samples:
    # the finishing kernel's second block has one warp's sample of 8.
    g = _dev(torch.randn(9, 5000, dtype=torch.float64).to(torch.float32))
    f = _dev(torch.randn(9, dtype=torch.float64).to(torch.float32))
    # A layer of several pass items (82 rows each, the last 54) and 8 spans (the last
    # partial), and one too wide for shared memory (79 column blocks).
    shapes = [(300, 100), (3, 20000)]

    def run():
        for name in SAMPLE_OPS:
            _check_sample_op(name, f, g, torch.float32)
        h = _dev(torch.randn(9, 5000))
        assert_close(lib.sample_dot(g, h), (g.double() * h.double()).sum(1), dtype=torch.float32,
                     what="sample_dot")
        _check_spectral_normalize(shapes, torch.float32, True, 2)
        _check_spectral_normalize(shapes, torch.float32, False, 1)
        tensors = [_dev(torch.randn(5000)), _dev(torch.randn(37, 3))]
        expected = [t.clamp(-0.5, 0.5) for t in tensors]
        lib.clip_(tensors, 0.5)
        for t, e in zip(tensors, expected):
            assert torch.equal(t, e)

    rec = _recorded(run)
    if rec is None:
        return
    names = set(rec.names())
    assert ALL_KERNELS <= names, f"kernels that did not run: {sorted(ALL_KERNELS - names)}"
    for call in rec.calls:
        if not call.is_memset:
            assert call.grid[0] * call.grid[1] * call.grid[2] > 1, f"{call.name} ran on a single block"


def _launches(fn) -> list:
    rec = _recorded(fn)
    return rec.names()


emulated = pytest.mark.skipif(not EMULATED, reason=(
    "launches are counted by the emulation build's launch records (on a GPU, `lipkernels bench` "
    "counts kernel launches with the profiler)"))


@emulated
def test_launches_per_call_of_the_per_sample_ops(on_device):
    """README: forward one launch (a sample of up to 16 KiB) or two (more: the partial sums
    are added by a finishing kernel); backward one launch."""
    for shape, forward in (((64, 3, 32, 32), 1), ((64, 4096), 1), ((3, 5000), 2), ((2, 3, 80, 81), 2)):
        for name, (op, _, uses_f) in SAMPLE_OPS.items():
            gg = _dev(torch.randn(shape)).requires_grad_(True)
            ff = _dev(torch.randn(shape[0])).requires_grad_(uses_f)
            out = []
            assert len(_launches(lambda: out.append(op(ff, gg)))) == forward, (name, shape)
            back = _launches(lambda: torch.autograd.grad(out[0].sum(), gg))
            assert back == ["sample_scale_kernel<float>"], (name, shape, back)


@emulated
@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_launches_per_call_of_spectral_norm(on_device, n_iter):
    """README: a whole list of layers (up to 24 per launch's table) in 2 launches per power
    iteration, + 1 for W_sn, + 1 copying the updated u, v into the layers' buffers;
    evaluation 3; the backward 2 launches and a memset; independent of the number of layers."""
    for shapes, groups in ((SNGAN, 1), (MANY, 2)):
        ws, us, vs = _layers(shapes, torch.float32, requires_grad=True)
        pi = _launches(lambda: ops.power_iteration(ws, us, vs, n_iter))
        assert len(pi) == groups * (2 * n_iter if n_iter else 2), pi
        if n_iter == 0:
            continue
        out = []
        fwd = _launches(lambda: out.extend(ops.spectral_normalize(ws, us, vs, n_iter, 1e-12, True)))
        assert len(fwd) == groups * (2 * n_iter + 1) + 1, fwd
        assert fwd[-1] == "multi_tensor_kernel<float, false>"  # u, v stored
        back = _launches(lambda: torch.autograd.grad(out, ws, [torch.ones_like(o) for o in out]))
        assert back == groups * ["cudaMemsetAsync", "sn_backward_dot_kernel<float>",
                                 "sn_backward_scale_kernel<float>"], back
        assert len(_launches(lambda: ops.spectral_normalize(ws, us, vs, n_iter, 1e-12, False))) == 3 * groups


@emulated
def test_launches_per_call_of_clip(on_device):
    """README: weight clipping in one launch per dtype (per 64 tensors)."""
    tensors = [_dev(torch.randn(7, 3).to(DTYPES[i % 2])) for i in range(70)]
    names = _launches(lambda: lipkernels.clip_weights_(tensors, 0.1))
    assert sorted(names) == sorted(["multi_tensor_kernel<float, true>",
                                    "multi_tensor_kernel<__nv_bfloat16, true>"]), names


# ================================================================== traffic, counted by the emulation

def _traffic_counted() -> bool:
    if not EMULATED:
        return False
    from lipkernels.benchmark import counting
    return counting.cuda_traffic_counted()


traffic = pytest.mark.skipif(not _traffic_counted(), reason=(
    "traffic is counted by the traffic-counting emulation build (build/emu; the sanitizer builds "
    "and real GPUs do not count it)"))


@traffic
@pytest.mark.parametrize("shape,offset,efficiency", [((8, 3, 32, 32), 0, 0.999), ((8, 3, 33, 35), 1, 0.9)])
def test_traffic_of_the_per_sample_ops(on_device, shape, offset, efficiency):
    """The counters against closed forms: the forward loads g once (every byte, no more)
    and stores a norm and an output per sample; the backward loads g once and stores dL/dg
    once; 16-byte loads fill their sectors (samples off a 16-byte boundary: all but each
    sample's scalar head and tail)."""
    from lipkernels.benchmark import counting
    g = _offset(shape, torch.float32, offset).requires_grad_(True)
    gbytes = g.numel() * 4
    with counting.record("cuda") as fwd:
        out = ops.gradient_penalty(g)
    (call,) = fwd.calls
    assert call.load_bytes == call.load_unique_bytes == gbytes
    assert gbytes <= call.dram_load_bytes <= gbytes + 2 * 32 * shape[0]
    assert call.store_bytes == shape[0] * (4 + 4)  # norm and (n - 1)^2, float32
    assert call.load_efficiency >= efficiency
    with counting.record("cuda") as bwd:
        torch.autograd.grad(out, g)
    (call,) = bwd.calls
    # per block: the sample's partial first and last sectors, and its grad_out, f, norm
    assert call.store_bytes == gbytes and gbytes <= call.dram_load_bytes <= gbytes + 5 * 32 * shape[0]


@traffic
def test_traffic_of_spectral_norm(on_device):
    """By the DRAM model: one power iteration reads W once (plus the partial sums passed
    between its two kernels, counted as scratch); the backward reads G twice and W once and
    writes dL/dW (docs/math.md section 8)."""
    from lipkernels.benchmark import counting
    ws, us, vs = _layers(SNGAN, torch.float32, requires_grad=True)
    wbytes = sum(w.numel() * 4 for w in ws)
    with counting.record("cuda") as rec:
        ops.power_iteration(ws, us, vs, 1)
    dram = rec.total("dram_load_bytes") + rec.total("dram_store_bytes")
    scratch = rec.total("dram_scratch_bytes")
    assert wbytes <= dram - scratch <= 1.1 * wbytes, (dram, scratch, wbytes)
    out = ops.spectral_normalize(ws, us, vs, 1, 1e-12, True)
    with counting.record("cuda") as rec:
        torch.autograd.grad(out, ws, [torch.ones_like(o) for o in out])
    dram = rec.total("dram_load_bytes") + rec.total("dram_store_bytes")
    assert 4 * wbytes <= dram <= 4.05 * wbytes, dram / wbytes


@traffic
def test_spectral_norm_pass_reads_in_full_sectors(on_device):
    """The pass kernel reads W and v in 16-byte packs: in spectral_normalize's one power
    iteration every layer's v_in is read in packs even where the packed (u, v) outputs
    leave the layer's v off a 16-byte boundary (the first layer's m + k = 64 + 27); a
    scalar v read would use a quarter of each sector (0.5 over the pass)."""
    from lipkernels.benchmark import counting
    ws, us, vs = _layers(SNGAN, torch.float32)
    with counting.record("cuda") as rec:
        ops.spectral_normalize(ws, us, vs, 1, 1e-12, True)
    (call,) = [c for c in rec.calls if c.name.startswith("sn_pass_kernel")]
    assert call.load_efficiency >= 0.95, call.load_efficiency


# ================================================================== everywhere: build and info

CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
CHECK_ARCHS = (80, 90)
EM_CUDA = 190


def _cubin_arch(path: str) -> int:
    """The SM version in a cubin's ELF header (e_flags bits 8-15; bits 0-7 in older ABIs)."""
    with open(path, "rb") as f:
        head = f.read(64)
    assert head[:4] == b"\x7fELF" and head[4] == 2, f"{path} is not a 64-bit ELF file"
    machine = struct.unpack_from("<H", head, 18)[0]
    assert machine == EM_CUDA, f"{path}: e_machine {machine}, expected EM_CUDA ({EM_CUDA})"
    flags = struct.unpack_from("<I", head, 48)[0]
    return (flags >> 8) & 0xFF if (flags >> 8) & 0xFF in CHECK_ARCHS else flags & 0xFF


def test_nvcc_compile_check_outputs():
    """`make cuda-check` compiled every csrc/cuda/*.cu for sm_80 and sm_90 (after the
    last change of the sources) and syntax-checked the binding."""
    assert CUDA_SOURCES, "no csrc/cuda/*.cu"
    out_dir = os.path.join(ROOT, "build", "nvcc")
    # The object's prerequisites in the Makefile: its .cu and the shared headers.
    headers = (glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h"))
               + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
               + [os.path.join(ROOT, "csrc", "epilogue.h")])
    problems = []
    for src in CUDA_SOURCES:
        stem = os.path.splitext(os.path.basename(src))[0]
        obj = os.path.join(out_dir, stem + ".o")
        if not os.path.exists(obj):
            problems.append(f"{obj} missing")
            continue
        if os.path.getmtime(obj) < max(os.path.getmtime(p) for p in [src] + headers):
            problems.append(f"{obj} is older than {os.path.basename(src)} or the headers it includes")
        for arch in CHECK_ARCHS:
            cubin = os.path.join(out_dir, f"{stem}.sm_{arch}.cubin")
            if not os.path.exists(cubin):
                problems.append(f"{cubin} missing")
            elif _cubin_arch(cubin) != arch:
                problems.append(f"{cubin} holds code for sm_{_cubin_arch(cubin)}, not sm_{arch}")
    stamp = os.path.join(out_dir, "bindings.syntax-ok")
    binding_sources = [os.path.join(ROOT, "csrc", *p) for p in
                       (("cuda", "bindings.cpp"), ("cuda", "kernels.h"), ("bindings_common.h",),
                        ("binding_utils.h",), ("epilogue.h",))]
    if not os.path.exists(stamp):
        problems.append("the syntax check of csrc/cuda/bindings.cpp did not pass")
    elif os.path.getmtime(stamp) < max(os.path.getmtime(p) for p in binding_sources):
        problems.append("the syntax check of csrc/cuda/bindings.cpp is older than its sources")
    if problems:
        message = "nvcc compile check (`make cuda-check`): " + "; ".join(problems)
        if os.environ.get("LIPKERNELS_REQUIRE_NVCC") == "1":
            pytest.fail(message)
        pytest.skip(message + " (LIPKERNELS_REQUIRE_NVCC=1 makes this a failure)")


def test_info_says_why_cuda_is_unavailable(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = _extension.build_info()
    ok, why = lipkernels.backend_status()["cuda"]
    cuda_line = next(line for line in out.splitlines() if line.strip().startswith("cuda "))
    if info.get("cuda"):
        assert "CUDA kernels for sm_" in out
        assert info["cuda_archs"]
    elif info.get("cuda_emulation"):
        assert ok and "emulated on the CPU" in cuda_line
        assert "CUDA kernels emulated on the CPU" in out
    else:
        reason = _extension.cuda_reason()
        assert reason and "unknown" not in reason
        assert info.get("cuda_reason") in ("disabled_by_env", "torch_without_cuda", "nvcc_not_found",
                                           "cmake_option_off")
        assert f"no CUDA        {reason}" in out
        assert reason in why
    if ok:
        assert cuda_line.split()[1] == "available"
    else:
        assert "unavailable: " + why in cuda_line
        if info.get("cuda") and not torch.cuda.is_available():
            assert "is_available() is False" in why


def test_arch_compatibility_rules(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: {"cuda": True, "cuda_archs": "sm_80.sm_90"})
    assert _extension.cuda_archs() == ["sm_80", "sm_90"]
    for cap in [(8, 0), (8, 6), (8, 9), (9, 0)]:
        assert _extension.cuda_arch_mismatch(cap) is None, cap
    for cap in [(7, 5), (10, 0), (12, 0)]:
        assert "sm_80.sm_90" in _extension.cuda_arch_mismatch(cap), cap
    monkeypatch.setattr(_extension, "build_info", lambda: {"cuda": True, "cuda_archs": "sm_80.sm_90+PTX"})
    assert _extension.cuda_arch_mismatch((10, 0)) is None
    monkeypatch.setattr(_extension, "build_info", lambda: {"cuda": True, "cuda_archs": "sm_90a"})
    assert _extension.cuda_arch_mismatch((9, 0)) is None
    assert _extension.cuda_arch_mismatch((10, 0)) is not None
    monkeypatch.setattr(_extension, "build_info", lambda: {"cuda": True, "cuda_archs": "compute_x"})
    assert _extension.cuda_arch_mismatch((7, 0)) is None  # not understood: not second-guessed


def test_cuda_backend_status_is_consistent():
    ok, why = backends.backend("cuda").probe()
    if ok:
        assert HAVE_GPU or _extension.cuda_emulated()
    else:
        assert why
        if not _extension.build_info().get("cuda"):
            assert "no CUDA kernels" in why
