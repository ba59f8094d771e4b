"""Property-based tests (hypothesis): every op x backend x dtype x shape x layout x
values against the reference, forward and backward.

Each generated case draws a dtype, a shape (1 sample, 1 element, empty batches, sizes
around the kernels' vector widths, blocks and chunks, ranks up to 9), a memory layout
(contiguous, non-contiguous, storage offset, channels_last, expanded zero-stride,
transposed) and values (normal, zeros, huge, tiny, subnormal, mixed per sample, a few
NaN/Inf), then compares the backend with

* the closed forms of docs/math.md in float64 on the same (rounded) inputs (for spectral
  norm: the reference in float64), within the per-dtype tolerances of
  conftest.TOLERANCES, or, element by element,
* the reference evaluated in the input's dtype (the plain formula, docs/math.md section
  10): where an intermediate over- or underflows the dtype (a sum of squares beyond
  float32's range, say), the backend must give what the plain formula gives there,
  NaN and Inf included.

CI runs a fixed, derandomized profile (``derandomize=True``, ``deadline=None``): the
same cases every run, at least 10,000 of them on the cpu backend; the count is printed
at the end of the module. ``LIPKERNELS_FUZZ_SCALE`` multiplies the number of cases (e.g.
0.1 for a quick local run, 10 for a long one). The emulated CUDA backend
(``LIPKERNELS_TEST_BACKENDS=cuda``) runs a tenth of the cases, the Triton interpreter
a small share in its own ``-m triton`` test.

Values whose squares are subnormal in the accumulation dtype (about 1e-20 in float32)
are not drawn: there every float32 sum of squares, torch's included, keeps only a few
digits. Failing cases found by the fuzzer are kept below as explicit regression tests
(@example).
"""
from __future__ import annotations

import collections
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency (make install)")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lipkernels  # noqa: E402
from lipkernels import ops  # noqa: E402

from conftest import COMPILED_BACKENDS, INTERPRETING, TOLERANCES, backend_context  # noqa: E402

SCALE = float(os.environ.get("LIPKERNELS_FUZZ_SCALE", "1"))
#: The Triton interpreter has no bfloat16 arithmetic (tests/test_triton.py): bfloat16
#: only on a GPU. The explicit @example cases in bfloat16 are skipped there.
TRITON_DTYPES = tuple(DTYPES) if torch.cuda.is_available() else (torch.float64, torch.float32, torch.float16)
#: Share of the cases per backend: the emulated CUDA kernels and the Triton interpreter
#: are much slower than the CPU kernels.
BACKEND_SHARE = {"cpu": 1.0, "cuda": 1.0 if torch.cuda.is_available() else 0.1, "triton": 1.0}

COUNTS: collections.Counter = collections.Counter()


def _settings(examples: int, backend: str = "cpu") -> settings:
    n = max(1, int(examples * SCALE * BACKEND_SHARE.get(backend, 1.0)))
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    print_blob=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the cases are small, and on a loaded machine OpenMP's
    spinning threads cost more than they give (the kernels' results do not depend on
    the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def summary_lines():
    """The case counts, printed at the end of the run (conftest.pytest_terminal_summary)."""
    if not COUNTS:
        return []
    return [f"test_fuzz: {sum(COUNTS.values())} generated cases"] + [
        f"  {name}: {count}" for name, count in sorted(COUNTS.items())]


# ------------------------------------------------------------------ generation

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
#: Elements per sample around the CPU kernels' 64 lanes, the CUDA kernels' 256 threads
#: and 16 KiB chunks (4096 float32, 2048 float64, 8192 half), the Triton kernels' 1024
#: blocks and 8192 chunks, and the CPU kernels' 32768-element chunks.
SIZES = [1, 2, 3, 5, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025,
         2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193, 16385, 32767, 32768, 32769]
SMALL_SIZES = [1, 2, 3, 7, 64, 65, 129, 1025]
BATCHES = [1, 2, 3, 0, 4, 5, 8]
LAYOUTS = ["contiguous", "noncontiguous", "offset", "channels_last", "expanded_batch",
           "expanded_inner", "transposed"]
VALUES = ["normal", "zeros", "huge", "tiny", "subnormal", "mixed", "special", "zero_rows"]

#: Magnitudes per dtype: huge (sums of squares may overflow the accumulation dtype),
#: tiny (squares still normal there), subnormal (values below the dtype's least normal:
#: their squares are 0 in the accumulation dtype, or exact for float16).
MAGNITUDES = {
    torch.float64: {"huge": 1e152, "tiny": 1e-150, "subnormal": 1e-315},
    torch.float32: {"huge": 1e18, "tiny": 1e-18, "subnormal": 1e-41},
    torch.bfloat16: {"huge": 1e18, "tiny": 1e-18, "subnormal": 1e-39},
    torch.float16: {"huge": 3e3, "tiny": 1e-3, "subnormal": 1e-6},
}


def _values(kind: str, shape, dtype, gen: torch.Generator, subnormal: bool = True) -> torch.Tensor:
    """float64 values of the given kind (rounded to dtype by the caller). f is drawn
    without subnormal values: GN's derivatives at a subnormal f over a g whose squares
    underflow are beyond every dtype's precision (n / d^2 with both tiny)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mags = MAGNITUDES[dtype]
    if kind == "normal":
        return x
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    if kind in mags:
        return x * mags[kind]
    if not shape or shape[0] == 0:
        return x
    per_sample = (shape[0],) + (1,) * (len(shape) - 1)
    if kind == "zero_rows":
        keep = torch.randint(0, 2, per_sample, generator=gen).to(torch.float64)
        return x * keep
    if kind == "mixed":
        choice = torch.randint(0, 5 if subnormal else 4, per_sample, generator=gen)
        scale = torch.tensor([1.0, 0.0, mags["huge"], mags["tiny"], mags["subnormal"]],
                             dtype=torch.float64)[choice]
        return x * scale
    if kind == "special":
        flat = x.flatten()
        if flat.numel():
            idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
            pick = torch.randint(0, 3, idx.shape, generator=gen)
            flat[idx] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[pick]
        return flat.reshape(shape)
    raise AssertionError(kind)


def _layout(values: torch.Tensor, layout: str, dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of values' shape and dtype in the given memory layout, holding the same
    values except for the expanded layouts (which repeat one slice)."""
    shape = tuple(values.shape)
    v = values.to(dtype)
    if layout == "noncontiguous":
        base = torch.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        out = base[..., ::2]
        out.copy_(v)
        return out
    if layout == "offset":
        off = int(torch.randint(1, 9, (1,), generator=gen))
        base = torch.empty(v.numel() + off, dtype=dtype)
        out = base[off:].view(shape)
        out.copy_(v)
        return out
    if layout == "channels_last" and len(shape) == 4:
        return v.contiguous(memory_format=torch.channels_last)
    if layout == "expanded_batch" and shape[0] > 0:
        return v[:1].expand(shape)
    if layout == "expanded_inner" and len(shape) >= 2:
        return v[..., :1].expand(shape)
    if layout in ("transposed", "channels_last"):
        # Batch dim last in memory: the kernels must not assume sample blocks.
        perm = list(range(1, len(shape))) + [0]
        base = v.permute(*perm).contiguous()
        inv = [0] * len(shape)
        for i, p in enumerate(perm):
            inv[p] = i
        return base.permute(*inv)
    return v.contiguous()


@st.composite
def per_sample_case(draw, sizes=SIZES, max_elements=70_000, dtypes=tuple(DTYPES)):
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.sampled_from(BATCHES))
    form = draw(st.sampled_from(["flat", "image", "high_rank"]))
    if form == "flat":
        n = draw(st.sampled_from(sizes))
        sample = (n,)
    elif form == "image":
        sample = (draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 5, 8])),
                  draw(st.sampled_from([1, 3, 4, 9])))
    else:
        rank = draw(st.integers(2, 8))
        sample = [draw(st.sampled_from([1, 1, 2, 3])) for _ in range(rank)]
        sample[draw(st.integers(0, rank - 1))] = draw(st.sampled_from(SMALL_SIZES))
        sample = tuple(sample)
    while batch * math.prod(sample) > max_elements:
        batch //= 2
    layout = draw(st.sampled_from(LAYOUTS))
    g_values = draw(st.sampled_from(VALUES))
    f_values = draw(st.sampled_from(["normal", "zeros", "huge", "tiny", "mixed", "special"]))
    f_layout = draw(st.sampled_from(["(B,)", "(B, 1)", "strided", "expanded"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, (batch,) + sample, layout, g_values, f_values, f_layout, seed


def _make_per_sample(case):
    dtype, shape, layout, g_values, f_values, f_layout, seed = case
    gen = torch.Generator().manual_seed(seed)
    g = _layout(_values(g_values, shape, dtype, gen), layout, dtype, gen)
    batch = shape[0]
    f64 = _values(f_values, (batch,), dtype, gen, subnormal=False)
    if f_layout == "(B, 1)":
        f = f64.to(dtype).reshape(batch, 1)
    elif f_layout == "strided":
        f = torch.empty(2 * batch, dtype=dtype)[::2]
        f.copy_(f64)
    elif f_layout == "expanded" and batch > 0:
        f = f64[:1].to(dtype).expand(batch)
    else:
        f = f64.to(dtype)
    return f, g


# ------------------------------------------------------------------ comparison

def _check(actual: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype, what: str,
           exact_acc: torch.Tensor | None = None, floor: float = 0.1, term_scale: float = 0.0):
    """Each element close to the float64 reference (or, given exact_acc, to the closed
    form evaluated with the norms as the accumulation dtype computes them: squares that
    underflow there count as 0), or to the reference in the input's dtype (NaN where it
    is NaN, the same Inf where it is infinite)."""
    a = actual.detach().cpu().to(torch.float64)
    e = exact.detach().cpu().to(torch.float64)
    p = plain.detach().cpu().to(torch.float64)
    assert a.shape == e.shape == p.shape, f"{what}: shapes {a.shape}, {e.shape}, {p.shape}"
    if a.numel() == 0:
        return
    rtol, atol = TOLERANCES[dtype]

    def scale_of(y):
        fin = y.isfinite()
        return y[fin].abs().max() if bool(fin.any()) else torch.tensor(0.0, dtype=torch.float64)

    def close(x, y, scale):
        bound = atol + rtol * torch.maximum(y.abs(), torch.clamp(floor * scale, min=term_scale))
        return ((x - y).abs() <= bound) | (x == y) | (x.isnan() & y.isnan())

    ok = close(a, e, scale_of(e))
    if bool(ok.all()):
        return
    # The other candidates, for the elements not close to the exact value only.
    rest = ~ok
    sub = close(a[rest], p[rest], scale_of(p))
    # Where the exact value is beyond the dtype's range the result overflows: Inf in the
    # plain formula, and whatever its under- and overflowing intermediates give in the
    # kernels' better-conditioned forms (docs/math.md section 10); not compared.
    sub |= e[rest].abs() > torch.finfo(dtype).max
    if exact_acc is not None:
        ea = exact_acc.detach().cpu().to(torch.float64)
        sub |= close(a[rest], ea[rest], scale_of(ea))
    ok[rest] = sub
    if not bool(ok.all()):
        bad = (~ok).flatten().nonzero()[0].item()
        ea_bad = "" if exact_acc is None else f", with the accumulation dtype's norms " \
            f"{exact_acc.detach().cpu().to(torch.float64).flatten()[bad].item()!r}"
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {a.numel()} elements differ; first at flat index {bad}: "
            f"got {a.flatten()[bad].item()!r}, float64 reference {e.flatten()[bad].item()!r}"
            f"{ea_bad}, reference in {dtype} {p.flatten()[bad].item()!r}")


PER_SAMPLE = {
    # name -> (op(f, g, param), reference(f, g, param), uses f, params to draw from)
    "sample_norm": (lambda f, g, p: ops.sample_norm(g), lambda f, g, p: ops.sample_norm_reference(g),
                    False, [0.0]),
    "gn_normalize": (lambda f, g, p: ops.gn_normalize(f, g),
                     lambda f, g, p: ops.gn_normalize_reference(f, g), True, [0.0]),
    "gran_normalize": (ops.gran_normalize, ops.gran_normalize_reference, True, [1e-4, 1e-2, 1.0, 30.0]),
    "gradient_penalty": (lambda f, g, p: ops.gradient_penalty(g, p),
                         lambda f, g, p: ops.gradient_penalty_reference(g, p), False, [1.0, 0.0, 2.5, -1.0]),
    "r1_penalty": (lambda f, g, p: ops.r1_penalty(g), lambda f, g, p: ops.r1_penalty_reference(g),
                   False, [0.0]),
}


def _weight(numel: int, dtype=torch.float64) -> torch.Tensor:
    """The fixed linear function of the output whose gradients are compared."""
    return torch.linspace(-1.0, 2.0, numel, dtype=torch.float64).to(dtype)


def _run(fn, f, g, param, uses_f):
    f = f.detach().clone().requires_grad_(uses_f)
    g = g.detach().clone().requires_grad_(True)
    out = fn(f, g, param)
    weight = _weight(out.numel(), out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), (f, g) if uses_f else (g,), allow_unused=True)
    return (out,) + tuple(grads)


def _closed_form(op, f, g, param, n=None):
    """Outputs and gradients of docs/math.md sections 2-5 in float64, written out (not
    autograd of the reference, whose GN derivative 1/d - |f|/d^2 cancels where |f| >> n).
    n: the norms to use (default: exact, in float64)."""
    f, g = f.detach().to(torch.float64), g.detach().to(torch.float64)
    batch = g.shape[0]
    per = (batch,) + (1,) * (g.dim() - 1)
    if n is None:
        n = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())))
    nz = n != 0
    unit = torch.where(nz.view(per), g / torch.where(nz, n, 1.0).view(per), torch.zeros_like(g))
    fb = f.reshape(-1)
    if op in ("gradient_penalty", "r1_penalty"):
        w = _weight(1)[0]
        if op == "r1_penalty":
            return (n.square().mean(), w * 2 * g / batch)
        return ((n - param).square().mean(), (w * 2 * (n - param) / batch).view(per) * unit)
    w = _weight(batch)
    if op == "sample_norm":
        return (n, w.view(per) * unit)
    if op == "gn_normalize":
        d = n + fb.abs()
        dz = d == 0
        ds = torch.where(dz, 1.0, d)
        out = torch.where(dz, 0.0, fb / ds)
        df = torch.where(dz, 0.0, w * n / ds / ds)
        dn = torch.where(dz, 0.0, -w * fb / ds / ds)
    else:  # gran_normalize
        q = n * n + param
        out = fb * (n / q)
        df = w * n / q
        dn = w * fb * (param - n * n) / q / q
    return (out.reshape(f.shape), df.reshape(f.shape), dn.view(per) * unit)


def check_per_sample(backend: str, op: str, case, param_index: int = 0) -> None:
    fn, ref, uses_f, params = PER_SAMPLE[op]
    param = params[param_index % len(params)]
    f, g = _make_per_sample(case)
    dtype = g.dtype
    exact = _closed_form(op, f, g, param)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n_acc = torch.linalg.vector_norm(g.to(acc), dim=tuple(range(1, g.dim()))).to(torch.float64)
    exact_acc = _closed_form(op, f, g, param, n=n_acc)
    with backend_context("reference"):
        plain = _run(ref, f, g, param, uses_f)
    with backend_context(backend):
        device = torch.get_default_device()
        actual = _run(fn, f.to(device), g.to(device), param, uses_f)
    names = ("out", "df", "dg") if uses_f else ("out", "dg")
    terms = {}
    if op == "gradient_penalty" and g.shape[0] > 0:
        # (n - c)^2 and 2 (n - c) g / n cancel where n is near c: their rounding is
        # relative to the size of the terms, n^2 + c^2 and 2 max(n, |c|) / B.
        n64 = torch.linalg.vector_norm(g.to(torch.float64), dim=tuple(range(1, g.dim())))
        n64 = n64[n64.isfinite()]
        if n64.numel():
            terms = {"out": (n64.square().mean() + param ** 2).item(),
                     "dg": 2 * max(n64.max().item(), abs(param)) / g.shape[0]}
    for name, a, e, p, ea in zip(names, actual, exact, plain, exact_acc):
        _check(a, e, p, dtype if name != "out" or op not in ("gradient_penalty", "r1_penalty")
               else (torch.float64 if dtype == torch.float64 else torch.float32),
               f"{op} [{backend}] {name}, case {case}, param {param}", exact_acc=ea,
               term_scale=terms.get(name, 0.0))
    COUNTS[f"{op}[{backend}]"] += 1


# ------------------------------------------------------------------ per-sample ops

PER_OP_EXAMPLES = 1400


def _per_sample_test(op, backend, examples=PER_OP_EXAMPLES, sizes=SIZES, max_elements=70_000,
                     dtypes=tuple(DTYPES)):
    @_settings(examples, backend)
    @given(case=per_sample_case(sizes=sizes, max_elements=max_elements, dtypes=dtypes),
           param_index=st.integers(0, 3))
    # Regression cases found by this fuzzer (dtype, shape, layout, g values, f values, f layout, seed):
    # a float16 g whose norm overflows float16 (sample_norm's backward used the rounded Inf norm
    # in the reference); a float32 g whose squares overflow (R1's reference backward overflowed).
    @example(case=(torch.float16, (2, 3, 4), "contiguous", "huge", "normal", "(B,)", 3), param_index=0)
    @example(case=(torch.float32, (3, 8), "expanded_batch", "huge", "special", "(B, 1)", 5), param_index=1)
    @example(case=(torch.float32, (0, 5), "offset", "normal", "normal", "expanded", 1), param_index=2)
    @example(case=(torch.bfloat16, (1, 1), "transposed", "subnormal", "tiny", "strided", 2), param_index=3)
    # GraN's coefficient dL/dn / n overflowed float32 (1e22 / 1e-18) where dL/dg does not.
    @example(case=(torch.float32, (1, 2), "contiguous", "tiny", "huge", "(B,)", 0), param_index=0)
    # Squares that underflow float32 (n = 0 there) under a tiny f.
    @example(case=(torch.float32, (8, 2), "contiguous", "subnormal", "tiny", "(B,)", 0), param_index=0)
    @example(case=(torch.float32, (2, 2), "contiguous", "subnormal", "mixed", "(B,)", 0), param_index=0)
    # GN's d f-hat / d f = n / d^2 overflowing float64 (subnormal n = d) under a zero
    # upstream gradient: 0, as the plain formula gives, not 0 * Inf.
    @example(case=(torch.float64, (4, 1), "contiguous", "subnormal", "zeros", "(B,)", 0), param_index=0)
    # GP near its center: (n - c)^2 cancels (65534 elements sharing memory per sample).
    @example(case=(torch.bfloat16, (2, 32767), "expanded_inner", "zero_rows", "normal", "(B,)", 0),
             param_index=0)
    def run(case, param_index):
        if case[0] not in dtypes:
            return  # an explicit example in a dtype this backend does not run
        check_per_sample(backend, op, case, param_index)
    run()


@pytest.mark.parametrize("op", list(PER_SAMPLE))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_fuzz_per_sample_ops(backend_name, op):
    _per_sample_test(op, backend_name)


@pytest.mark.triton
@pytest.mark.parametrize("op", list(PER_SAMPLE))
def test_fuzz_per_sample_ops_triton(op):
    """A small share under the interpreter: small shapes (and sizes across its 1024
    blocks), 20 cases per op."""
    if "triton" not in lipkernels.available_backends():
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1])
    _per_sample_test(op, "triton", examples=20, sizes=[1, 2, 7, 64, 1023, 1025], max_elements=5000,
                     dtypes=TRITON_DTYPES)


# ------------------------------------------------------------------ spectral norm

#: Spectral-norm magnitudes keep sigma^2 inside the accumulation dtype's range: beyond
#: it torch's own power iteration (and so the reference) overflows (docs/math.md 10).
SN_MAGNITUDES = {torch.float64: 1e100, torch.float32: 1e12, torch.bfloat16: 1e12, torch.float16: 1e2}


@st.composite
def spectral_case(draw, dtypes=tuple(DTYPES)):
    dtype = draw(st.sampled_from(dtypes))
    n_layers = draw(st.integers(1, 3))
    shapes = []
    for _ in range(n_layers):
        m = draw(st.sampled_from([1, 2, 3, 8, 17, 64, 65]))
        if draw(st.booleans()):
            shapes.append((m, draw(st.sampled_from([1, 2, 7, 63, 64, 65, 129, 256, 1025]))))
        else:
            shapes.append((m, draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3])),
                           draw(st.sampled_from([1, 4]))))
    layout = draw(st.sampled_from(["contiguous", "noncontiguous", "offset", "channels_last", "transposed"]))
    values = draw(st.sampled_from(["normal", "zeros", "huge", "tiny", "mixed"]))
    iters = draw(st.sampled_from([1, 0, 2, 3]))
    training = draw(st.booleans())
    eps = draw(st.sampled_from([1e-12, 1e-4]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, tuple(shapes), layout, values, iters, training, eps, seed


def _make_spectral(case):
    dtype, shapes, layout, values, iters, training, eps, seed = case
    gen = torch.Generator().manual_seed(seed)
    weights, us, vs = [], [], []
    for i, shape in enumerate(shapes):
        mag = SN_MAGNITUDES[dtype]
        scale = {"normal": 1.0, "zeros": 0.0, "huge": mag, "tiny": 1.0 / mag,
                 "mixed": [1.0, 0.0, mag, 1.0 / mag][i % 4]}[values]
        w64 = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        m, k = shape[0], math.prod(shape[1:])
        u = torch.nn.functional.normalize(torch.randn(m, generator=gen, dtype=torch.float64), dim=0)
        v = torch.nn.functional.normalize(torch.randn(k, generator=gen, dtype=torch.float64), dim=0)
        # u, v as a layer holds them after registration (15 iterations, in float64): random
        # vectors give sigma ~ 1 against ||W|| ~ 50, a cancellation no float32 tolerance
        # of a real layer has to cover (conftest.spectral_layers).
        ops.power_iteration_reference([w64], [u], [v], 15, eps)
        lay = "transposed" if layout == "noncontiguous" and len(shape) < 2 else layout
        weights.append(_layout(w64, lay, dtype, gen))
        us.append(u.to(dtype))
        vs.append(v.to(dtype))
    return weights, us, vs, iters, training, eps


def _sn_run(fn, weights, us, vs, iters, training, eps):
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    us = [u.clone() for u in us]
    vs = [v.clone() for v in vs]
    outs = fn(ws, us, vs, iters, eps, training)
    loss = sum((o.to(torch.float64) * torch.linspace(-1.0, 1.0, o.numel(), dtype=torch.float64)
                .reshape(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(loss, ws)
    return list(outs) + list(grads) + us + vs


def check_spectral(backend: str, case) -> None:
    weights, us, vs, iters, training, eps = _make_spectral(case)
    dtype = weights[0].dtype
    with backend_context("reference"):
        exact = _sn_run(ops.spectral_normalize, [w.to(torch.float64) for w in weights],
                        [u.to(torch.float64) for u in us], [v.to(torch.float64) for v in vs],
                        iters, training, eps)
        plain = _sn_run(ops.spectral_normalize, weights, us, vs, iters, training, eps)
    with backend_context(backend):
        device = torch.get_default_device()
        actual = _sn_run(ops.spectral_normalize, [w.to(device) for w in weights],
                         [u.to(device) for u in us], [v.to(device) for v in vs], iters, training, eps)
    L = len(weights)
    names = [f"W_sn[{i}]" for i in range(L)] + [f"dW[{i}]" for i in range(L)] + \
        [f"u[{i}]" for i in range(L)] + [f"v[{i}]" for i in range(L)]
    # Half precision: u and v are stored in the weight's dtype (as torch stores them), and
    # dW's rank-one correction carries their rounding at the scale of the largest
    # elements: compared relative to that scale.
    floor = 1.0 if dtype in (torch.float16, torch.bfloat16) else 0.1
    # dW = (G - <G, W_sn> u v^T) / sigma: its two terms are of the size |G| / sigma, and
    # they cancel exactly for a rank-one W (a 1 x 1 weight has dW = 0): its rounding is
    # relative to that size (max |G| = 1, 1 / sigma = max |W_sn| / max |W|).
    terms = [0.0] * L
    for i in range(L):
        w_max = weights[i].detach().to(torch.float64).abs().max().item()
        terms[i] = exact[i].abs().max().item() / w_max if w_max > 0 else 0.0
    for j, (name, a, e, p) in enumerate(zip(names, actual, exact, plain)):
        _check(a, e, p, dtype, f"spectral_normalize [{backend}] {name}, case {case}", floor=floor,
               term_scale=terms[j - L] if L <= j < 2 * L else 0.0)
    with backend_context(backend):
        device = torch.get_default_device()
        u2 = [u.clone().to(device) for u in us]
        v2 = [v.clone().to(device) for v in vs]
        sig = ops.power_iteration([w.to(device) for w in weights], u2, v2, iters, eps)
    with backend_context("reference"):
        u3 = [u.to(torch.float64) for u in us]
        v3 = [v.to(torch.float64) for v in vs]
        sig64 = ops.power_iteration([w.to(torch.float64) for w in weights], u3, v3, iters, eps)
        u4, v4 = [u.clone() for u in us], [v.clone() for v in vs]
        sig_plain = ops.power_iteration(list(weights), u4, v4, iters, eps)
    # sigma: the reference's u^T W v against the kernels' ||W^T u|| (docs/math.md 1).
    _check(sig, sig64, sig_plain, dtype, f"power_iteration [{backend}] sigmas, case {case}")
    for i in range(L):
        _check(u2[i], u3[i], u4[i], dtype, f"power_iteration [{backend}] u[{i}], case {case}")
        _check(v2[i], v3[i], v4[i], dtype, f"power_iteration [{backend}] v[{i}], case {case}")
    COUNTS[f"spectral[{backend}]"] += 1


def _spectral_test(backend, examples, dtypes=tuple(DTYPES)):
    @_settings(examples, backend)
    @given(case=spectral_case(dtypes=dtypes))
    @example(case=(torch.float32, ((3, 4),), "contiguous", "zeros", 1, True, 1e-12, 0))
    @example(case=(torch.float16, ((1, 1), (2, 3, 1, 4)), "channels_last", "mixed", 0, False, 1e-4, 1))
    # A 1 x 1 weight near eps: dW = 0 exactly, the kernels' rounding at the size of G / sigma.
    @example(case=(torch.float32, ((1, 1, 1, 1),), "contiguous", "tiny", 1, False, 1e-12, 1161641))
    # bfloat16 u, v in dW's rank-one correction.
    @example(case=(torch.bfloat16, ((3, 2),), "contiguous", "normal", 1, True, 1e-12, 1))
    def run(case):
        if case[0] not in dtypes:
            return
        check_spectral(backend, case)
    run()


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_fuzz_spectral_norm(backend_name):
    _spectral_test(backend_name, 2300)


@pytest.mark.triton
def test_fuzz_spectral_norm_triton():
    if "triton" not in lipkernels.available_backends():
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1])
    _spectral_test("triton", 20, dtypes=TRITON_DTYPES)


# ------------------------------------------------------------------ clipping

@st.composite
def clip_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.sampled_from([1, 2, 63, 64, 65, 1000, 4097]), min_size=0, max_size=5))
    values = draw(st.sampled_from(VALUES))
    c = draw(st.sampled_from([0.01, 1.0, 1e-30, 1e30, 5e4]))
    contiguous = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, tuple(sizes), values, c, contiguous, seed


def check_clip(backend, case):
    dtype, sizes, values, c, contiguous, seed = case
    gen = torch.Generator().manual_seed(seed)
    tensors = [_layout(_values(values, (n, 3), dtype, gen), "contiguous" if contiguous else "noncontiguous",
                       dtype, gen) for n in sizes]
    expected = [t.clone() for t in tensors]
    # The float64 reference: clamp in float64, then round; the same as clamping in the
    # dtype except where c itself is not representable there (then it is c rounded).
    with backend_context(backend):
        device = torch.get_default_device()
        actual = [t.to(device) for t in tensors]
        ops.clip_(actual, c)
    ops.clip_reference(expected, c)
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.cpu(), e
        assert torch.equal(a.isnan(), e.isnan()), f"clip_ [{backend}] tensors[{i}] NaN, case {case}"
        assert torch.equal(a.nan_to_num(), e.nan_to_num()), f"clip_ [{backend}] tensors[{i}], case {case}"
    COUNTS[f"clip_[{backend}]"] += 1


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_fuzz_clip(backend_name):
    @_settings(700, backend_name)
    @given(case=clip_case())
    # c beyond float16's range: torch's clamp raised in the reference, the kernels did not.
    @example(case=(torch.float16, (1, 64), "huge", 1e30, True, 0))
    @example(case=(torch.float16, (65,), "special", 1e30, False, 1))
    def run(case):
        check_clip(backend_name, case)
    run()


def test_case_count_reaches_the_budget():
    """At least 10,000 generated cases per CI run over the compiled backends here (the
    cpu backend alone reaches it; LIPKERNELS_FUZZ_SCALE < 1 lowers it on purpose)."""
    expected = {f"{op}[cpu]" for op in PER_SAMPLE} | {"spectral[cpu]", "clip_[cpu]"}
    if INTERPRETING or SCALE < 1 or not expected <= set(COUNTS):
        pytest.skip("counted after the cpu fuzz tests of this module ran at LIPKERNELS_FUZZ_SCALE >= 1")
    cpu = sum(n for name, n in COUNTS.items() if name.endswith("[cpu]"))
    assert cpu >= 10_000, COUNTS
