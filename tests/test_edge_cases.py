"""Special values and edge cases, the same on every backend (docs/math.md section 10).

* NaN and Inf in f or g propagate as the plain formula does (forward: the same values,
  NaN and Inf included; backward: autograd of the plain formula, so exactly the same
  elements are NaN or infinite); only GN's exact 0/0 is defined as 0.
* An empty batch (B = 0) gives empty outputs, the penalties torch's mean of nothing
  (NaN), and empty gradients.
* A parameter that overflows (or underflows to 0 in) the dtype the op computes in is
  the same clear error on every backend.
* Shapes and layouts at the edges (1 sample, 1 element, 0 elements per sample,
  expanded zero-stride g and f, float16 extremes) agree with the reference.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import lipkernels
from lipkernels import ops

from conftest import COMPILED_BACKENDS, GRAN_EPS, PER_SAMPLE_OPS, TOLERANCES, backend_context

ALL_BACKENDS = ["reference"] + COMPILED_BACKENDS
NAN, INF = float("nan"), float("inf")


def _grads(fn, f, g, uses_f, weight=None):
    f = f.detach().clone().requires_grad_(uses_f)
    g = g.detach().clone().requires_grad_(True)
    out = fn(f, g)
    if weight is None:
        weight = torch.ones_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (f, g) if uses_f else (g,))
    return (out,) + tuple(grads)


def _assert_same_special(actual, expected, what, exact_nonfinite=True):
    """Same NaN and (signed) Inf elements; finite elements close for the dtype."""
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(a.isfinite(), e.isfinite()), (
        f"{what}: non-finite elements differ:\n got      {a.flatten().tolist()}\n expected "
        f"{e.flatten().tolist()}")
    if exact_nonfinite:
        assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN elements differ: {a} vs {e}"
        inf = e.isinf()
        assert torch.equal(a[inf], e[inf]), f"{what}: Inf elements differ: {a} vs {e}"
    rtol, atol = TOLERANCES[actual.dtype]
    fin = e.isfinite()
    torch.testing.assert_close(a[fin], e[fin], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ NaN and Inf

#: f values crossed with rows of g: every combination of finite, zero, NaN, +-Inf, and
#: (for float32) a g whose sum of squares overflows to Inf from finite values.
F_VALUES = [0.0, 1.5, -2.0, NAN, INF, -INF]
G_ROWS = {
    "zero": [0.0, 0.0, 0.0],
    "finite": [3.0, -4.0, 0.0],
    "nan": [1.0, NAN, 0.0],
    "inf": [INF, 2.0, 0.0],
    "-inf": [0.0, -INF, 1.0],
    "nan+inf": [NAN, INF, 0.0],
    "overflowing": [3e38, 3e38, 1.0],  # finite in float32, ||g||^2 is not
}


def _special_batch(dtype):
    rows = list(itertools.product(F_VALUES, G_ROWS.values()))
    f = torch.tensor([r[0] for r in rows], dtype=torch.float64).to(dtype)
    g = torch.tensor([r[1] for r in rows], dtype=torch.float64).to(dtype).reshape(len(rows), 3, 1)
    return f, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("op", list(PER_SAMPLE_OPS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_special_values_match_the_reference(backend_name, op, dtype):
    """Every backend gives the reference's outputs and gradients, NaN and Inf included."""
    fn, ref, uses_f = PER_SAMPLE_OPS[op]
    f, g = _special_batch(dtype)
    with backend_context("reference"):
        expected = _grads(ref, f, g, uses_f)
    with backend_context(backend_name):
        actual = _grads(fn, f.to(torch.get_default_device()), g.to(torch.get_default_device()), uses_f)
    for name, a, e in zip(("out", "df", "dg") if uses_f else ("out", "dg"), actual, expected):
        # Forward: the same values; backward: the same elements non-finite (NaN against
        # Inf can differ where two forms of the same derivative meet an Inf).
        _assert_same_special(a, e, f"{op} {name}", exact_nonfinite=name == "out")


def test_reference_is_the_plain_formula():
    """The references are the formulas of docs/math.md evaluated as written: checked
    against the unguarded formulas in float64, everywhere except GN's 0/0."""
    f, g = _special_batch(torch.float64)
    n = g.flatten(1).square().sum(1).sqrt()
    with torch.no_grad():
        gn = ops.gn_normalize_reference(f, g)
        plain = f / (n + f.abs())
        zero = (f == 0) & (n == 0)
        assert torch.equal(gn[zero], torch.zeros_like(gn[zero]))
        torch.testing.assert_close(gn[~zero], plain[~zero], equal_nan=True, rtol=0, atol=0)
        gran = ops.gran_normalize_reference(f, g, GRAN_EPS)
        torch.testing.assert_close(gran, f * (n / (n * n + GRAN_EPS)), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_gn_special_values_closed_form(backend_name):
    """GN's rules (docs/math.md section 10) stated directly: NaN anywhere in a sample
    gives NaN there, and NaN gradients for its f and every element of its g; f = Inf
    with finite n is NaN (Inf/Inf); n = Inf with finite f is 0; 0/0 is 0 with zero
    gradients. Never masked to 0 (a diverged discriminator must be noticed)."""
    with backend_context(backend_name):
        f = torch.tensor([NAN, 1.0, INF, 2.0, 0.0, -1.0], dtype=torch.float64)
        g = torch.tensor([[1.0, 2.0], [NAN, 0.0], [3.0, 4.0], [INF, 1.0], [0.0, 0.0], [3.0, 4.0]],
                         dtype=torch.float64)
        out, df, dg = _grads(ops.gn_normalize, f, g, True)
    out, df, dg = out.cpu(), df.cpu(), dg.cpu()
    assert out[:3].isnan().all() and df[:3].isnan().all() and dg[:3].isnan().all()
    assert out[3] == 0 and df[3] == 0 and dg[3, 0].isnan() and dg[3, 1] == 0
    assert out[4] == 0 and df[4] == 0 and (dg[4] == 0).all()
    # A finite sample is the formula: -1 / (5 + 1), d/df = n / d^2 = 5 / 36.
    assert out[5].item() == pytest.approx(-1 / 6, rel=1e-12)
    assert df[5].item() == pytest.approx(5 / 36, rel=1e-12)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_nan_in_one_sample_stays_in_that_sample(backend_name):
    with backend_context(backend_name):
        g = torch.randn(4, 3, 5)
        f = torch.randn(4)
        g[2, 1, 3] = NAN
        for op, (fn, _, uses_f) in PER_SAMPLE_OPS.items():
            if op in ("gradient_penalty", "r1_penalty"):
                continue
            out, *grads = _grads(fn, f, g, uses_f)
            assert out[2].isnan() and out[[0, 1, 3]].isfinite().all(), op
            dg = grads[-1]
            assert dg[[0, 1, 3]].isfinite().all(), op
            assert dg[2].isnan().any(), op


# ------------------------------------------------------------------ empty batch

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_empty_batch(backend_name, dtype):
    """B = 0: empty outputs, penalties NaN (torch's mean of nothing), empty gradients."""
    with backend_context(backend_name):
        for shape, f_shape in (((0, 3, 4), (0,)), ((0, 5), (0, 1)), ((0, 2, 3, 4), (0,))):
            g = torch.randn(shape).to(dtype)
            f = torch.randn(f_shape).to(dtype)
            for op, (fn, _, uses_f) in PER_SAMPLE_OPS.items():
                out, *grads = _grads(fn, f, g, uses_f)
                if op in ("gradient_penalty", "r1_penalty"):
                    assert out.shape == () and out.isnan(), op
                    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                elif op == "sample_norm":
                    assert out.shape == (0,) and out.dtype == dtype, op
                else:
                    assert out.shape == f.shape and out.dtype == dtype, op
                assert grads[-1].shape == g.shape and grads[-1].dtype == dtype, op
                if uses_f:
                    assert grads[0].shape == f.shape, op
            # Without autograd, and under torch.no_grad(), too.
            with torch.no_grad():
                assert ops.sample_norm(g).shape == (0,)
                assert ops.r1_penalty(g).isnan()


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_empty_last_batch_does_not_crash_training(backend_name):
    """The layers and penalties that take a model, on an empty batch, forward and
    backward into the weights (which get zero gradients from the layers)."""
    with backend_context(backend_name):
        d = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.LeakyReLU(0.1),
                                torch.nn.Linear(8, 1))
        x = torch.randn(0, 3, 2, 2)
        for layer in (lipkernels.nn.GradNorm(d), lipkernels.nn.GraN(d)):
            out = layer(x)
            assert out.shape == (0, 1)
            out.sum().backward()
        gp = lipkernels.gradient_penalty(d, x, x)
        r1 = lipkernels.r1_penalty(d, x, gamma=1.0)
        assert gp.isnan() and r1.isnan()


def test_empty_batch_kernel_ops(backend):
    """The kernel ops themselves (torch.ops, as the compiled backends call them)."""
    lib = torch.ops.lipkernels_cuda_emu if backend == "cuda" and not torch.cuda.is_available() \
        else torch.ops.lipkernels
    if backend == "triton":
        pytest.skip("the triton backend has no torch.ops.lipkernels kernels (tested above)")
    g = torch.randn(0, 3)
    out, norm = lib._norm_epilogue(g, torch.randn(0), "gn", 0.0)
    assert out.shape == (0,) and norm.shape == (0,)
    gf, gg = lib._norm_epilogue_backward(torch.randn(0), g, torch.randn(0), norm, "gn", 0.0)
    assert gf.shape == (0,) and gg.shape == (0, 3)
    assert lib.sample_scale(g, torch.randn(0)).shape == (0, 3)
    assert lib.sample_dot(g, g).shape == (0,)


# ------------------------------------------------------------------ parameters

OVERFLOW_CASES = [
    ("gran eps 1e300", lambda d: ops.gran_normalize(torch.randn(3, dtype=d), torch.randn(3, 4, dtype=d), 1e300),
     "eps = 1e\\+300 overflows float32"),
    ("gran eps 1e-300", lambda d: ops.gran_normalize(torch.randn(3, dtype=d), torch.randn(3, 4, dtype=d), 1e-300),
     "eps = 1e-300 underflows to 0 in float32"),
    ("gp center 1e300", lambda d: ops.gradient_penalty(torch.randn(3, 4, dtype=d), 1e300),
     "center = 1e\\+300 overflows float32"),
    ("gp center -1e39", lambda d: ops.gradient_penalty(torch.randn(3, 4, dtype=d), -1e39),
     "center = -1e\\+39 overflows float32"),
    ("power_iteration eps 1e300",
     lambda d: ops.power_iteration([torch.randn(3, 4, dtype=d)], [torch.ones(3, dtype=d)],
                                   [torch.ones(4, dtype=d)], 1, 1e300),
     "eps = 1e\\+300 overflows float32"),
    ("spectral_normalize eps 1e-320",
     lambda d: ops.spectral_normalize([torch.randn(3, 4, dtype=d)], [torch.ones(3, dtype=d)],
                                      [torch.ones(4, dtype=d)], 1, 1e-320),
     "eps = 9.99989e-321 underflows to 0 in float32"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_parameter_overflowing_the_dtype_is_the_same_error(backend_name, case, dtype):
    """Half-precision inputs compute in float32, so float32's range is the limit."""
    _, call, words = case
    with backend_context(backend_name):
        with pytest.raises(ValueError, match=words):
            call(dtype)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_parameters_within_the_computation_dtype_are_accepted(backend_name):
    """float64 inputs take any finite parameter; half-precision inputs take float32's
    range (eps = 1e5 is beyond float16's but the op computes in float32)."""
    with backend_context(backend_name):
        f64, g64 = torch.randn(3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        out = ops.gran_normalize(f64, g64, 1e300)
        n = g64.cpu().flatten(1).norm(dim=1)
        torch.testing.assert_close(out.cpu(), f64.cpu() * (n / (n * n + 1e300)), rtol=1e-12, atol=0)
        assert ops.gradient_penalty(g64, 1e100).cpu().item() == pytest.approx(1e200, rel=1e-12)
        g16 = g64.half()
        out16 = ops.gran_normalize(f64.half(), g16, 1e5)
        n16 = g16.cpu().float().flatten(1).norm(dim=1)
        torch.testing.assert_close(out16.cpu().float(), f64.cpu().half().float() * n16 / (n16 * n16 + 1e5),
                                   rtol=4e-3, atol=1e-7)


def test_kernel_ops_check_the_parameter(backend):
    """Callers of the kernel ops directly get the check too (RuntimeError from C++)."""
    if backend == "triton":
        pytest.skip("the triton kernels are reached through the checked Python ops only")
    lib = torch.ops.lipkernels_cuda_emu if backend == "cuda" and not torch.cuda.is_available() \
        else torch.ops.lipkernels
    g, f = torch.randn(3, 4), torch.randn(3)
    with pytest.raises(RuntimeError, match="eps = 1e\\+300 overflows float32"):
        lib._norm_epilogue(g, f, "gran", 1e300)
    with pytest.raises(RuntimeError, match="center = .* overflows float32"):
        lib._norm_epilogue(g.half(), None, "gp", -1e39)
    with pytest.raises(RuntimeError, match="eps = .* underflows to 0 in float32"):
        lib.power_iteration([torch.randn(3, 4)], [torch.ones(3)], [torch.ones(4)], 1, 1e-300)
    # The largest float32 is fine; float64 inputs take any finite value.
    lib._norm_epilogue(g, f, "gran", 3.4028234663852886e38)
    lib._norm_epilogue(g.double(), f.double(), "gran", 1e300)


# ------------------------------------------------------------------ shapes and layouts

def _all_results(fn, f, g, uses_f):
    out = _grads(fn, f, g, uses_f, weight=None)
    return out


EDGE_SHAPES = {
    "1 sample": (1, 7),
    "1 element": (5, 1),
    "1 sample 1 element": (1, 1),
    "0 elements per sample": (3, 0),
    "rank 9": (2, 1, 2, 1, 3, 1, 1, 2, 1),
}


@pytest.mark.parametrize("shape", list(EDGE_SHAPES.values()), ids=list(EDGE_SHAPES))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_edge_shapes(backend_name, shape):
    torch.manual_seed(1)
    g = torch.randn(shape, dtype=torch.float64)
    f = torch.randn(shape[0], dtype=torch.float64)
    f[0] = 0.0  # with N = 0 this is GN's 0/0
    _every_op_as_the_reference(backend_name, f, g, str(shape))


def _every_op_as_the_reference(backend_name, f, g, what):
    """Every per-sample op's outputs and gradients on the backend, against the reference's
    on the same inputs (the same special values)."""
    for op, (fn, ref, uses_f) in PER_SAMPLE_OPS.items():
        with backend_context("reference"):
            expected = _all_results(ref, f, g, uses_f)
        with backend_context(backend_name):
            actual = _all_results(fn, f, g, uses_f)
        for a, e in zip(actual, expected):
            _assert_same_special(a, e, f"{op} {what}")


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_expanded_zero_stride_inputs(backend_name):
    """g expanded along the batch (all samples share memory) and along a sample's
    elements, f expanded: read correctly, gradients of the expanded shape."""
    base = torch.randn(1, 3, 1, dtype=torch.float64)
    cases = [base.expand(4, 3, 5), base[:, :1].expand(4, 6, 2), torch.randn(4, 1, dtype=torch.float64).expand(4, 7)]
    f = torch.tensor([0.5], dtype=torch.float64).expand(4)
    for g in cases:
        _every_op_as_the_reference(backend_name, f, g, f"stride {g.stride()}")


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_float16_extremes(backend_name):
    """Largest float16 values (the norm overflows float16: sample_norm is Inf like the
    reference, GN/GraN and the penalties, computed in float32, are finite) and
    subnormal float16 values (squares underflow in neither float32 path)."""
    g = torch.full((3, 4, 2), 65504.0, dtype=torch.float16)
    g[1] = 6e-8  # the least float16 subnormal
    g[2, 0] = -65504.0
    f = torch.tensor([65504.0, 6e-8, -1.0], dtype=torch.float16)
    for op, (fn, ref, uses_f) in PER_SAMPLE_OPS.items():
        with backend_context("reference"):
            expected = _all_results(ref, f, g, uses_f)
        with backend_context(backend_name):
            actual = _all_results(fn, f, g, uses_f)
        for name, a, e in zip(("out", "df", "dg") if uses_f else ("out", "dg"), actual, expected):
            _assert_same_special(a, e, f"{op} {name}")
        if op in ("gn_normalize", "gran_normalize", "gradient_penalty", "r1_penalty"):
            assert actual[0].isfinite().all(), op


# ------------------------------------------------------------------ triton (interpreter)

def _triton_or_skip():
    if "triton" not in lipkernels.available_backends():
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1] +
                    " (the test command runs the triton tests with TRITON_INTERPRET=1)")


@pytest.mark.triton
@pytest.mark.parametrize("op", list(PER_SAMPLE_OPS))
def test_triton_special_values_and_empty_batch(op):
    """The Triton kernels under the same rules (small: the interpreter is slow)."""
    _triton_or_skip()
    fn, ref, uses_f = PER_SAMPLE_OPS[op]
    for dtype in (torch.float64, torch.float32):
        f, g = _special_batch(dtype)
        with backend_context("reference"):
            expected = _grads(ref, f, g, uses_f)
        with backend_context("triton"):
            dev = torch.get_default_device()
            actual = _grads(fn, f.to(dev), g.to(dev), uses_f)
        for name, a, e in zip(("out", "df", "dg") if uses_f else ("out", "dg"), actual, expected):
            _assert_same_special(a, e, f"triton {op} {name}", exact_nonfinite=name == "out")
    with backend_context("triton"):
        g, f = torch.randn(0, 3, 2), torch.randn(0, 1)
        out, *grads = _grads(fn, f, g, uses_f)
        assert out.shape == (() if "penalty" in op else (0,) if op == "sample_norm" else (0, 1))
        assert grads[-1].shape == g.shape
        if "penalty" in op:
            assert out.isnan()


@pytest.mark.triton
@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
def test_triton_parameter_overflow(case):
    _triton_or_skip()
    _, call, words = case
    with backend_context("triton"):
        with pytest.raises(ValueError, match=words):
            call(torch.float32)


# ------------------------------------------------------------------ spectral norm

@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_spectral_norm_special_values(backend_name):
    """A NaN or Inf weight: NaN u, v, sigma and W_sn, as in the reference (torch's
    power iteration); an all-zero weight: W_sn = 0 (divided by eps); the others of the
    same call are untouched."""
    torch.manual_seed(2)
    weights = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    weights[0][1, 2] = NAN
    weights[1][0, 0] = INF
    weights[2].zero_()
    us = [torch.nn.functional.normalize(torch.randn(3, dtype=torch.float64), dim=0) for _ in weights]
    vs = [torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0) for _ in weights]
    results = {}
    for name in ("reference", backend_name):
        with backend_context(name):
            dev = torch.get_default_device()
            ws = [w.to(dev).requires_grad_(True) for w in weights]
            u, v = [x.to(dev, copy=True) for x in us], [x.to(dev, copy=True) for x in vs]
            outs = ops.spectral_normalize(ws, u, v, 1, 1e-12, True)
            grads = torch.autograd.grad(sum(o.sum() for o in outs), ws)
            results[name] = [o.detach().cpu() for o in outs] + [x.cpu() for x in grads + tuple(u) + tuple(v)]
    for i, (a, e) in enumerate(zip(results[backend_name], results["reference"])):
        _assert_same_special(a, e, f"spectral result {i}", exact_nonfinite=False)
    assert results[backend_name][0].isnan().all() and results[backend_name][1].isnan().all()
    assert torch.equal(results[backend_name][2], torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_special_values_under_function_transforms(backend_name):
    """torch.func.grad and vmap (the ops' transform path, lipkernels/ops/_func.py) keep
    the same special values as the reference."""
    f, g = _special_batch(torch.float64)

    def total(f, g):
        return ops.gn_normalize(f, g).sum() + ops.gran_normalize(f, g, GRAN_EPS).sum()

    results = {}
    for name in ("reference", backend_name):
        with backend_context(name):
            dev = torch.get_default_device()
            fd, gd = f.to(dev), g.to(dev)
            df, dg = torch.func.grad(total, argnums=(0, 1))(fd, gd)
            out = torch.func.vmap(ops.gn_normalize)(fd.view(6, 7), gd.view(6, 7, 3, 1))
            results[name] = (df, dg, out)
    for what, a, e in zip(("grad f", "grad g", "vmap out"), results[backend_name], results["reference"]):
        _assert_same_special(a, e, what, exact_nonfinite=what == "vmap out")
