"""Per-sample norm and its GN / GraN / GP / R1 epilogues: every compiled backend
against the plain-PyTorch reference, forward and gradients, all CPU dtypes, odd
shapes and layouts; gradcheck / gradgradcheck in float64; opcheck; bad input; the
documented edge cases."""
from __future__ import annotations

import pytest
import torch

import lipkernels
from lipkernels import ops

from conftest import (CPU_DTYPES, COMPILED_BACKENDS, PER_SAMPLE_OPS, assert_close,
                      check_graph_release, check_saved_tensor_hooks, run_per_sample)

HALF = (torch.float16, torch.bfloat16)
OPS = PER_SAMPLE_OPS

# Odd shapes: one sample, sizes that are no multiple of any block (16 lanes, 32768-element
# chunks), several chunks per sample, rank 2 to 5.
SHAPES = [(1, 7), (3, 1), (5, 3, 7, 9), (64, 3, 32, 32), (2, 70001), (4, 2, 3, 5, 7), (1, 3, 256, 100)]


def _inputs(shape, dtype, f_shape=None):
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    f = torch.randn(f_shape or (shape[0],), dtype=torch.float64).to(dtype)
    return f, g


_run = run_per_sample


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, name, dtype, shape):
    op, ref, uses_f = OPS[name]
    f, g = _inputs(shape, dtype)
    actual = _run(op, f, g, uses_f)
    # The reference in float64 on the same rounded inputs: the exact answer to compare with.
    with lipkernels.use_backend("reference"):
        expected = _run(ref, f.double(), g.double(), uses_f)
    for what, a, e in zip(("out", "grad_f" if uses_f else "grad_g", "grad_g"), actual, expected):
        expected_dtype = dtype
        if what == "out" and name in ("gradient_penalty", "r1_penalty") and dtype in HALF:
            expected_dtype = torch.float32  # losses are float32 for half inputs
        assert a.dtype == expected_dtype, f"{name}: {what} has dtype {a.dtype}, expected {expected_dtype}"
        assert_close(a, e, dtype=dtype, what=f"{name} {what} {tuple(shape)} {dtype}")


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
def test_layouts(backend, name, layout):
    op, ref, uses_f = OPS[name]
    base = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    if layout == "channels_last":
        g = base.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        g = base.transpose(2, 3)
    elif layout == "sliced":
        g = base[:, 1:4, :, ::2]
    else:
        g = torch.randn(6, 1, 4, 7, dtype=torch.float64).expand(6, 5, 4, 7)
    f = torch.randn(12, dtype=torch.float64)[::2]  # non-contiguous f
    actual = _run(op, f, g, uses_f)
    expected = _run(ref, f, g.contiguous(), uses_f)
    for a, e in zip(actual, expected):
        assert_close(a, e, what=f"{name} {layout}")
    assert actual[-1].shape == g.shape


@pytest.mark.parametrize("name", ["gn_normalize", "gran_normalize"])
def test_scores_shape_b1(backend, name):
    op, ref, _ = OPS[name]
    f, g = _inputs((5, 3, 4), torch.float64, f_shape=(5, 1))
    out = op(f, g)
    assert out.shape == (5, 1)
    assert_close(out, ref(f, g), what=name)


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_and_gradgradcheck(backend, name):
    op, _, uses_f = OPS[name]
    g = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, dtype=torch.float64, requires_grad=uses_f)
    inputs = (f, g) if uses_f else (g,)
    fn = (lambda f, g: op(f, g)) if uses_f else (lambda g: op(f, g))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_third_derivative_of_gn(backend):
    # Backward of backward of backward: the differentiable backward closes under
    # differentiation (sample_norm / sample_scale / sample_dot).
    g = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def third(op):
        out = op(f, g).pow(2).sum()
        (dg,) = torch.autograd.grad(out, g, create_graph=True)
        (ddg,) = torch.autograd.grad(dg.pow(2).sum(), g, create_graph=True)
        return torch.autograd.grad(ddg.sum(), (f, g))

    actual = third(ops.gn_normalize)
    expected = third(ops.gn_normalize_reference)
    for a, e in zip(actual, expected):
        assert_close(a, e, what="third derivative")


@pytest.mark.parametrize("name", list(OPS))
def test_zero_gradient_is_finite(backend, name):
    """g = 0 (and f = 0 for GN: 0/0) gives the documented finite values, never NaN."""
    op, ref, uses_f = OPS[name]
    g = torch.zeros(4, 3, 5, dtype=torch.float64)
    f = torch.tensor([0.0, 1.5, -2.0, 0.0], dtype=torch.float64)
    actual = _run(op, f, g, uses_f)
    expected = _run(ref, f, g, uses_f)
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        assert_close(a, e, what=f"{name} at g = 0")
    if name == "gn_normalize":
        # Closed form: f / |f| where f != 0, and the defined 0 at f = 0, n = 0.
        assert actual[0].tolist() == [0.0, 1.0, -1.0, 0.0]
        # d out / d f = n / (n + |f|)^2 = 0 at n = 0.
        assert actual[1].abs().max() == 0


def test_gn_closed_form():
    # f / (n + |f|) for a 3-4-5 triangle: n = 5.
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    f = torch.tensor([5.0, -2.0], dtype=torch.float64)
    for name in ["reference"] + COMPILED_BACKENDS:
        with lipkernels.use_backend(name):
            assert ops.gn_normalize(f, g).tolist() == [0.5, -1.0]
            assert ops.sample_norm(g).tolist() == [5.0, 0.0]
            assert ops.gradient_penalty(g, 1.0).item() == pytest.approx((16.0 + 1.0) / 2)
            assert ops.r1_penalty(g).item() == pytest.approx(25.0 / 2)
            assert ops.gran_normalize(f, g, 1.0).tolist() == pytest.approx([5.0 * 5 / 26, 0.0])


@pytest.mark.parametrize("name", list(OPS))
def test_deterministic_across_thread_counts(backend, name):
    op, _, uses_f = OPS[name]
    f, g = _inputs((3, 100000), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(op, f, g, uses_f)
        torch.set_num_threads(max(2, threads))
        many = _run(op, f, g, uses_f)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_opcheck(backend):
    lib = torch.ops.lipkernels
    g = torch.randn(4, 3, 5, requires_grad=True)
    f = torch.randn(4, requires_grad=True)
    gd, fd = g.detach(), f.detach()
    _, norm = lib._norm_epilogue(gd, fd, "gn", 0.0)
    cases = [
        (lib.sample_norm, (g,)),
        (lib.gn_normalize, (f, g)),
        (lib.gran_normalize, (f, g, 0.1)),
        (lib.gradient_penalty, (g, 1.0)),
        (lib.r1_penalty, (g,)),
        (lib.sample_scale, (g, f)),
        (lib.sample_dot, (g, torch.randn(4, 3, 5, requires_grad=True))),
        (lib._norm_epilogue, (gd, fd, "gran", 0.5)),
        (lib._norm_epilogue, (gd, None, "gp", 1.0)),
        (lib._norm_epilogue_backward, (torch.randn(4), gd, fd, norm, "gn", 0.0)),
        (lib._norm_epilogue_backward, (torch.randn(4), gd, None, norm, "r1", 0.0)),
        (lib.sample_norm, (torch.randn(4, 3, 5, 2).to(memory_format=torch.channels_last),)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", list(OPS))
def test_graph_release_and_in_place_checks_as_torch(backend, name):
    check_graph_release(name)


@pytest.mark.parametrize("name", list(OPS))
def test_saved_tensor_hooks_checkpoint_and_anomaly_mode(backend, name):
    check_saved_tensor_hooks(name)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("how", ["sum", "stacked column"])
def test_output_gradient_of_any_stride(backend, name, how):
    """The backward kernels read dL/dout in place with its stride: 0 from a sum's backward,
    2 from one column of a stacked pair; the gradients are the reference's."""
    op, ref, uses_f = OPS[name]

    def grads(fn):
        torch.manual_seed(0)
        g = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
        f = torch.randn(5, dtype=torch.float64, requires_grad=uses_f)
        out = fn(f, g)
        if how == "sum":
            loss = out.sum()
        else:
            pair = torch.stack([out, torch.ones_like(out)], dim=-1)
            loss = (pair * torch.linspace(-1.0, 2.0, pair.numel(), dtype=torch.float64).view(pair.shape)).sum()
        return torch.autograd.grad(loss, (f, g) if uses_f else (g,))

    ours = grads(op)
    with lipkernels.use_backend("reference"):
        theirs = grads(ref)
    for a, e in zip(ours, theirs):
        assert_close(a, e, dtype=torch.float64, what=f"{name} gradient, dL/dout from a {how}")


@pytest.mark.parametrize("name", list(OPS))
def test_floor_is_the_op_with_empty_kernels(name):
    """torch.ops.lipkernels_floor (the benchmark's per-call floor, docs/math.md section 12):
    the same schema, dispatch and autograd node as the op, outputs and gradients of the
    same shapes and dtypes, and kernels that compute nothing."""
    lib, floor = torch.ops.lipkernels, torch.ops.lipkernels_floor
    g = torch.randn(4, 3, 5, requires_grad=True)
    f = torch.randn(4, requires_grad=True)
    args = {"sample_norm": (g,), "gn_normalize": (f, g), "gran_normalize": (f, g, 0.1),
            "gradient_penalty": (g, 1.0), "r1_penalty": (g,)}[name]
    inputs = (f, g) if OPS[name][2] else (g,)
    real, empty = getattr(lib, name)(*args), getattr(floor, name)(*args)
    assert str(getattr(floor, name).default._schema).split("::")[1] == \
        str(getattr(lib, name).default._schema).split("::")[1]
    assert type(empty.grad_fn) is type(real.grad_fn) and empty.grad_fn.name() == real.grad_fn.name()
    for a, b in zip(torch.autograd.grad(real.sum(), inputs), torch.autograd.grad(empty.sum(), inputs)):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
    assert (real.shape, real.dtype) == (empty.shape, empty.dtype)
    with pytest.raises(RuntimeError, match="floor op takes a contiguous g"):
        floor._norm_epilogue(g.detach().transpose(1, 2), None, "norm", 0.0)


def test_compile_fullgraph(backend):
    def penalty(f, g):
        return ops.gn_normalize(f, g).sum() + ops.gradient_penalty(g) + ops.r1_penalty(g)

    f = torch.randn(4)
    g = torch.randn(4, 3, 5)
    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    assert_close(compiled(f, g), penalty(f, g), what="compiled")


# ------------------------------------------------------------------ bad input

BAD = [
    ("g rank 1", lambda: ops.gn_normalize(torch.randn(3), torch.randn(3)), ValueError, "rank"),
    ("batch mismatch", lambda: ops.gn_normalize(torch.randn(4), torch.randn(3, 5)), ValueError, "f must have shape"),
    ("f rank 3", lambda: ops.gn_normalize(torch.randn(3, 1, 1), torch.randn(3, 5)), ValueError, "f must have shape"),
    ("integer g", lambda: ops.sample_norm(torch.ones(3, 4, dtype=torch.int64)), TypeError, "floating-point"),
    ("integer f", lambda: ops.gn_normalize(torch.ones(3, dtype=torch.int32), torch.randn(3, 4)), TypeError, "f must be"),
    # Different f and g dtypes are computed in the wider one (tests/test_dtypes.py).
    ("complex f", lambda: ops.gn_normalize(torch.randn(3, dtype=torch.complex64), torch.randn(3, 4)), TypeError, "f must be a floating-point"),
    ("not a tensor", lambda: ops.sample_norm([[1.0, 2.0]]), TypeError, "torch.Tensor"),
    ("gran eps 0", lambda: ops.gran_normalize(torch.randn(3), torch.randn(3, 4), 0.0), ValueError, "eps"),
    ("gran eps < 0", lambda: ops.gran_normalize(torch.randn(3), torch.randn(3, 4), -1.0), ValueError, "eps"),
    ("gran eps nan", lambda: ops.gran_normalize(torch.randn(3), torch.randn(3, 4), float("nan")), ValueError, "eps"),
    ("gp center inf", lambda: ops.gradient_penalty(torch.randn(3, 4), float("inf")), ValueError, "center"),
    ("mixed devices", lambda: ops.gn_normalize(torch.randn(3, device="meta"), torch.randn(3, 4)), ValueError, "device"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("backend_name", ["reference"] + COMPILED_BACKENDS)
def test_bad_input(case, backend_name):
    _, call, error, words = case
    with lipkernels.use_backend(backend_name):
        with pytest.raises(error, match=words):
            call()


def test_kernel_checks_name_the_argument(backend):
    """The compiled ops check their arguments too (for callers of torch.ops directly)."""
    lib = torch.ops.lipkernels
    with pytest.raises(RuntimeError, match="g must have shape"):
        lib.sample_norm(torch.randn(5))
    with pytest.raises(RuntimeError, match="f must have shape"):
        lib.gn_normalize(torch.randn(4), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="floating-point"):
        lib.sample_norm(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        lib.gran_normalize(torch.randn(3), torch.randn(3, 2), 0.0)
