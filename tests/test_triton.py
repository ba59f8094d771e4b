"""The Triton backend against the reference: every kernel, forward and backward.

On a machine without a GPU these run under the Triton interpreter on CPU tensors:
``TRITON_INTERPRET=1 pytest -m triton`` (the test command does this; the variable must
be set before lipkernels is imported). Shapes are small and chosen to cross every
block boundary: one sample, one row, one column, sizes just above a block or a chunk,
several work items per layer. On a GPU the same tests run on CUDA tensors, in float32,
float16 and bfloat16 too (the interpreter has no bfloat16 arithmetic).
"""
from __future__ import annotations

import pytest
import torch

import lipkernels
from lipkernels import ops

from conftest import (PER_SAMPLE_OPS, assert_close, backend_context, check_graph_release,
                      check_saved_tensor_hooks, float64_copies, run_per_sample, spectral_layers)

pytestmark = pytest.mark.triton

if "triton" not in lipkernels.available_backends():
    pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1] +
                " (the test command runs this file with TRITON_INTERPRET=1)", allow_module_level=True)

from lipkernels.triton import sample_norm as tsn  # noqa: E402
from lipkernels.triton import spectral_norm as tspec  # noqa: E402

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float64, torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture(autouse=True)
def triton_backend():
    with backend_context("triton"):
        yield


OPS = PER_SAMPLE_OPS
# CHUNK + 1 elements per sample: two programs per sample, the second with one element.
SHAPES = [(1, 7), (3, 1), (5, 3, 7, 9), (2, tsn.CHUNK + 1), (3, 2, 1100)]


_run = run_per_sample


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_sample_ops_match_reference(name, dtype, shape):
    op, ref, uses_f = OPS[name]
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    f = torch.randn(shape[0], dtype=torch.float64).to(dtype)
    actual = _run(op, f, g, uses_f)
    with lipkernels.use_backend("reference"):
        expected = _run(ref, f.double(), g.double(), uses_f)
    for a, e in zip(actual, expected):
        assert_close(a, e, dtype=dtype, what=f"{name} {shape} {dtype}")


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(name, layout):
    op, ref, uses_f = OPS[name]
    base = torch.randn(4, 5, 3, 6, dtype=torch.float64)
    g = base.to(memory_format=torch.channels_last) if layout == "channels_last" else base[:, 1:4, :, ::2]
    f = torch.randn(8, dtype=torch.float64)[::2]
    for a, e in zip(_run(op, f, g, uses_f), _run(ref, f, g.contiguous(), uses_f)):
        assert_close(a, e, what=f"{name} {layout}")


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_and_gradgradcheck(name):
    op, _, uses_f = OPS[name]
    g = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, dtype=torch.float64, requires_grad=uses_f)
    fn = (lambda f, g: op(f, g)) if uses_f else (lambda g: op(f, g))
    inputs = (f, g) if uses_f else (g,)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("name", list(OPS))
def test_zero_gradient_is_finite(name):
    op, ref, uses_f = OPS[name]
    g = torch.zeros(4, 3, 5, dtype=torch.float64)
    f = torch.tensor([0.0, 1.5, -2.0, 0.0], dtype=torch.float64)
    for a, e in zip(_run(op, f, g, uses_f), _run(ref, f, g, uses_f)):
        assert torch.isfinite(a).all()
        assert_close(a, e, what=f"{name} at g = 0")


@pytest.mark.parametrize("name", list(OPS))
def test_graph_release_and_in_place_checks_as_torch(name):
    check_graph_release(name)


@pytest.mark.parametrize("name", list(OPS))
def test_saved_tensor_hooks_checkpoint_and_anomaly_mode(name):
    check_saved_tensor_hooks(name)


def test_sample_scale_and_dot_and_their_derivatives():
    g = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert_close(tsn.sample_scale(g, c), c[:, None, None] * g, what="sample_scale")
    assert_close(tsn.sample_dot(g, h), (g * h).sum((1, 2)), what="sample_dot")
    assert torch.autograd.gradcheck(tsn.sample_scale, (g, c))
    assert torch.autograd.gradgradcheck(tsn.sample_scale, (g, c))
    assert torch.autograd.gradcheck(tsn.sample_dot, (g, h))


def test_per_sample_opcheck():
    g = torch.randn(4, 3, 5, requires_grad=True)
    f = torch.randn(4, requires_grad=True)
    _, norm = tsn.norm_epilogue(g.detach(), f.detach(), "gn", 0.0)
    for op, args in [
        (torch.ops.lipkernels_triton.norm_epilogue, (g, f, "gn", 0.0)),
        (torch.ops.lipkernels_triton.norm_epilogue, (g, None, "gp", 1.0)),
        (torch.ops.lipkernels_triton.norm_epilogue_backward, (torch.randn(4), g.detach(), f.detach(), norm, "gran", 0.5)),
        (torch.ops.lipkernels_triton.sample_scale, (g, f)),
        (torch.ops.lipkernels_triton.sample_dot, (g, torch.randn(4, 3, 5, requires_grad=True))),
    ]:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------ spectral norm

# A single row, a single column, odd sizes, k not a multiple of BLOCK_K or BLOCK_C, and a
# layer of several work items (more than ROWS rows).
SN_SHAPES = [(8, 3, 3, 3), (1, 40), (70, 5), (7, 1), (33, 2, 2, 2), (40, 300), (3, 1 + tspec.BLOCK_C)]


_layers = spectral_layers
_copies = float64_copies


@pytest.mark.parametrize("n_iter", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_power_iteration_matches_reference(n_iter, dtype):
    ws, us, vs = _layers(SN_SHAPES, dtype)
    us_ref, vs_ref = _copies(us), _copies(vs)
    sigmas = ops.power_iteration(ws, us, vs, n_iter)
    expected = ops.power_iteration_reference(_copies(ws), us_ref, vs_ref, n_iter)
    assert_close(sigmas, expected, dtype=dtype, what="sigmas")
    for i in range(len(ws)):
        assert_close(us[i], us_ref[i], dtype=dtype, what=f"u[{i}]")
        assert_close(vs[i], vs_ref[i], dtype=dtype, what=f"v[{i}]")


@pytest.mark.parametrize("training,n_iter", [(True, 1), (True, 2), (False, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_spectral_normalize_matches_reference(dtype, training, n_iter):
    ws, us, vs = _layers(SN_SHAPES, dtype, requires_grad=True)
    ws_ref = [w.detach().to(torch.float64, copy=True).requires_grad_(True) for w in ws]
    us_ref, vs_ref = _copies(us), _copies(vs)
    out = ops.spectral_normalize(ws, us, vs, n_iter, 1e-12, training)
    out_ref = ops.spectral_normalize_reference(ws_ref, us_ref, vs_ref, n_iter, 1e-12, training)
    seeds = [torch.randn(o.shape, dtype=torch.float64) for o in out]
    grads = torch.autograd.grad(out, ws, [s.to(dtype) for s in seeds])
    grads_ref = torch.autograd.grad(out_ref, ws_ref, seeds)
    for i in range(len(ws)):
        assert out[i].shape == ws[i].shape and out[i].dtype == dtype
        assert_close(out[i], out_ref[i], dtype=dtype, what=f"W_sn[{i}]")
        assert_close(grads[i], grads_ref[i], dtype=dtype, what=f"dW[{i}]")
        assert_close(us[i], us_ref[i], dtype=dtype, what=f"u[{i}]")


def test_spectral_normalize_gradcheck_eval_and_second_order():
    # (33, 1): two work items in one layer. fast_mode checks a random projection of the
    # Jacobian, which keeps the interpreter's many launches affordable.
    ws, us, vs = _layers([(3, 2), (2, 2, 1, 1), (1, 3), (33, 1)], torch.float64, requires_grad=True)
    fn = lambda *w: tuple(ops.spectral_normalize(list(w), us, vs, 1, 1e-12, False))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(ws), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, tuple(ws), fast_mode=True)


def test_two_forwards_then_backward_and_zero_weight():
    ws, us, vs = _layers([(8, 3, 2, 2), (5, 7), (3, 4)], torch.float64, requires_grad=True)
    with torch.no_grad():
        ws[2].zero_()
    ws_ref = [w.detach().clone().requires_grad_(True) for w in ws]
    u1, v1 = _copies(us), _copies(vs)
    out1 = ops.spectral_normalize(ws, us, vs)
    ops.spectral_normalize(ws, us, vs)  # a second forward updates u, v before the backward
    ref = ops.spectral_normalize_reference(ws_ref, u1, v1)
    G = [torch.randn_like(o) for o in out1]
    grads = torch.autograd.grad(out1, ws, G)
    grads_ref = torch.autograd.grad(ref, ws_ref, G)
    for a, e in zip(list(out1) + list(grads), list(ref) + list(grads_ref)):
        assert torch.isfinite(a).all()
        assert_close(a, e, what="first forward's W_sn and gradient")
    assert torch.equal(out1[2], torch.zeros_like(out1[2]))


def test_plan_is_built_once_per_model():
    ws, us, vs = _layers([(6, 4), (3, 5)], torch.float32)
    tspec._plans.clear()
    ops.spectral_normalize(ws, us, vs)
    ops.spectral_normalize(ws, us, vs, 1, 1e-12, False)
    ops.power_iteration(ws, us, vs, 2)
    assert len(tspec._plans) == 1


def test_spectral_opcheck():
    ws, us, vs = _layers([(6, 5), (3, 2, 2, 2), (40, 3)], torch.float32, requires_grad=True)
    wd = [w.detach() for w in ws]
    flat, sigmas, uv = tspec.sn_forward(wd, us, vs, 1, 1e-12)
    for op, args in [
        (torch.ops.lipkernels_triton.sn_forward, (ws, us, vs, 1, 1e-12)),
        (torch.ops.lipkernels_triton.sn_forward, (ws, us, vs, 0, 1e-12)),
        (torch.ops.lipkernels_triton.power_iteration, (wd, us, vs, 2, 1e-12)),
        (torch.ops.lipkernels_triton.sn_backward, (torch.randn_like(flat), wd, uv, sigmas, 1e-12)),
    ]:
        torch.library.opcheck(op, args)


def test_layers_and_group_match_reference():
    torch.manual_seed(0)
    D = lipkernels.models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm, channels=(4, 8, 8, 16))
    D_ref = lipkernels.models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm, channels=(4, 8, 8, 16))
    D_ref.load_state_dict(D.state_dict())
    lipkernels.nn.SpectralNormGroup(D)
    x = torch.randn(2, 3, 32, 32)
    out = D(x) + D(x.flip(0))  # two forwards before the backward
    grads = torch.autograd.grad(out.sum(), list(D.parameters()))
    with lipkernels.use_backend("reference"):
        out_ref = D_ref(x) + D_ref(x.flip(0))
        grads_ref = torch.autograd.grad(out_ref.sum(), list(D_ref.parameters()))
    assert_close(out, out_ref, what="D output")
    for a, e in zip(grads, grads_ref):
        assert_close(a, e, what="parameter gradient")
    for a, e in zip(D.state_dict().values(), D_ref.state_dict().values()):
        assert_close(a, e, what="state")


def test_gradnorm_module():
    D = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 1)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    out = lipkernels.nn.GradNorm(D)(x)
    grads = torch.autograd.grad(out.sum(), list(D.parameters()))
    with lipkernels.use_backend("reference"):
        out_ref = lipkernels.nn.GradNorm(D)(x)
        grads_ref = torch.autograd.grad(out_ref.sum(), list(D.parameters()))
    assert_close(out, out_ref, what="GN output")
    for a, e in zip(grads, grads_ref):
        assert_close(a, e, what="GN parameter gradient")


def test_compile_fullgraph_spectral_norm_discriminator():
    """torch.compile(fullgraph=True) of a spectral-norm discriminator's forward, with the
    Triton ops inside, does not break the graph and gives the eager numbers."""
    torch.manual_seed(0)
    D = lipkernels.models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm, channels=(4, 8, 8, 16))
    D_eager = lipkernels.models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm, channels=(4, 8, 8, 16))
    D_eager.load_state_dict(D.state_dict())
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(D, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out = compiled(x)
    out_eager = D_eager(x)
    assert_close(out, out_eager, what="compiled D(x)")
    for a, e in zip(D.state_dict().values(), D_eager.state_dict().values()):
        assert_close(a, e, what="compiled state update")
    grads = torch.autograd.grad(out.sum(), list(D.parameters()))
    grads_eager = torch.autograd.grad(out_eager.sum(), list(D_eager.parameters()))
    for a, e in zip(grads, grads_eager):
        assert_close(a, e, what="compiled gradient")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_of_a_spectral_norm_step():
    """A training-mode forward + backward captured in a CUDA graph (no host
    synchronisation inside) and replayed gives the reference's numbers."""
    ws, us, vs = _layers([(64, 27), (128, 576), (1, 8192)], torch.float32, requires_grad=True)
    G = [torch.randn_like(w) for w in ws]
    step = lambda: torch.autograd.grad(ops.spectral_normalize(ws, us, vs), ws, G)  # noqa: E731
    step()  # warm-up: compiles the kernels and builds the plan
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    u0, v0 = _copies(us), _copies(vs)
    graph.replay()
    torch.cuda.synchronize()
    ws_ref = [w.detach().double().requires_grad_(True) for w in ws]
    ref = ops.spectral_normalize_reference(ws_ref, u0, v0)
    grads_ref = torch.autograd.grad(ref, ws_ref, [g.double() for g in G])
    for a, e in zip(grads, grads_ref):
        assert_close(a, e, dtype=torch.float32, what="replayed gradient")
    for a, e in zip(us + vs, u0 + v0):
        assert_close(a, e, dtype=torch.float32, what="replayed u, v update")


# ------------------------------------------------------------------ launches per call

interpreted_only = pytest.mark.skipif(ON_GPU, reason=(
    "launches are counted under the interpreter (on a GPU, `lipkernels bench` counts them "
    "with the profiler)"))


def _names(fn):
    from lipkernels.benchmark import counting
    with counting.record("triton") as rec:
        fn()
    return rec.names()


@interpreted_only
def test_launches_per_call_match_the_readme():
    """README: per-sample ops 2 launches forward, 1 backward; spectral norm of a whole list
    of layers 3 per power iteration + 1 for W_sn (evaluation: 2 + 1), backward 2,
    independent of the number of layers (the updated u, v are stored by one
    torch._foreach_copy_, a torch kernel the interpreter does not see)."""
    g = torch.randn(4, 3, 8, 8, requires_grad=True)
    f = torch.randn(4, requires_grad=True)
    for name, (op, _, uses_f) in OPS.items():
        out = []
        assert _names(lambda: out.append(op(f, g))) == ["_sumsq_kernel", "_finish_kernel"], name
        assert _names(lambda: torch.autograd.grad(out[0].sum(), g)) == ["_scale_kernel"], name
    for n_layers in (2, 5):
        shapes = [(8 + i, 3 + 2 * i) for i in range(n_layers)]
        ws, us, vs = spectral_layers(shapes, torch.float32, requires_grad=True)
        for n in (0, 1, 3):
            expected = ["_uwv_kernel", "_sigma_kernel"] if n == 0 else \
                n * ["_rows_kernel", "_columns_kernel", "_finish_kernel"]
            assert _names(lambda: ops.power_iteration(ws, us, vs, n)) == expected
        out = []
        assert _names(lambda: out.extend(ops.spectral_normalize(ws, us, vs, 2))) == \
            2 * ["_rows_kernel", "_columns_kernel", "_finish_kernel"] + ["_divide_kernel"]
        assert _names(lambda: torch.autograd.grad(out, ws, [torch.ones_like(o) for o in out])) == \
            ["_grad_dot_kernel", "_grad_kernel"]
        assert _names(lambda: ops.spectral_normalize(ws, us, vs, 1, training=False)) == \
            ["_uwv_kernel", "_sigma_kernel", "_divide_kernel"]


#: Every Triton kernel of the backend (kernel function names; two modules have a
#: _finish_kernel).
ALL_TRITON_KERNELS = {"_sumsq_kernel", "_finish_kernel", "_scale_kernel", "_rows_kernel", "_columns_kernel",
                      "_uwv_kernel", "_sigma_kernel", "_divide_kernel", "_grad_dot_kernel", "_grad_kernel"}


@pytest.mark.sanitizer_subset
def test_every_kernel_once():
    """Every Triton kernel at least once, float32, against the reference: the subset that
    `make gpu-check` runs under compute-sanitizer (memcheck, racecheck). Under the
    interpreter the launch records show that each kernel ran."""
    g = torch.randn(3, 2, 1100)
    f = torch.randn(3)
    ws, us, vs = spectral_layers([(9, 5), (40, 3, 3)], torch.float32, requires_grad=True)

    def run():
        for name, (op, ref, uses_f) in OPS.items():
            actual = _run(op, f, g, uses_f)
            with lipkernels.use_backend("reference"):
                expected = _run(ref, f.double(), g.double(), uses_f)
            for a, e in zip(actual, expected):
                assert_close(a, e, dtype=torch.float32, what=name)
        u0, v0 = float64_copies(us), float64_copies(vs)
        w64 = [w.detach().double().requires_grad_(True) for w in ws]
        out = ops.spectral_normalize(ws, us, vs, 1)
        ref = ops.spectral_normalize_reference(w64, u0, v0, 1)
        seeds = [torch.randn_like(o) for o in out]
        grads = torch.autograd.grad(out, ws, seeds)
        grads_ref = torch.autograd.grad(ref, w64, [s.double() for s in seeds])
        for a, e in zip(list(out) + list(grads) + us + vs, list(ref) + list(grads_ref) + u0 + v0):
            assert_close(a, e, dtype=torch.float32, what="spectral_normalize (training)")
        evaluated = ops.spectral_normalize(ws, us, vs, 1, training=False)
        with lipkernels.use_backend("reference"):
            expected = ops.spectral_normalize_reference([w.detach().double() for w in ws], float64_copies(us),
                                                        float64_copies(vs), 1, training=False)
        for a, e in zip(evaluated, expected):
            assert_close(a, e, dtype=torch.float32, what="spectral_normalize (evaluation)")

    if ON_GPU:
        run()
        return
    names = set(_names(run))
    assert ALL_TRITON_KERNELS <= names, f"kernels that did not run: {sorted(ALL_TRITON_KERNELS - names)}"
