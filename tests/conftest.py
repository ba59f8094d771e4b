"""Shared test helpers: which backends to test, per-dtype tolerances, and an
assertion that says where and by how much two results differ."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.utils.checkpoint

import lipkernels

#: Compiled backends the general suites run (the reference is what they are compared
#: against). Under the Triton interpreter (TRITON_INTERPRET=1) the Triton backend is
#: tested by tests/test_triton.py with small shapes instead.
#: LIPKERNELS_TEST_BACKENDS=cuda (a comma-separated list) restricts them: the CI run of
#: the emulation build (the CUDA kernels on CPU tensors) tests only what it adds.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_ONLY = [b for b in os.environ.get("LIPKERNELS_TEST_BACKENDS", "").split(",") if b]
#: The main run of the suite (not the emulation build's run, not the interpreter's):
#: tests that do not depend on the backend run there only.
MAIN_RUN = not INTERPRETING and not _ONLY
COMPILED_BACKENDS = [b for b in lipkernels.available_backends()
                     if b != "reference" and not (b == "triton" and INTERPRETING)
                     and (not _ONLY or b in _ONLY)]

#: (rtol, atol) per dtype for a backend against the float64 reference evaluated on the
#: same (rounded) inputs. float32: accumulation order differs (~1e-7 relative per
#: add over up to 1e5 terms); half types: one rounding of the output (2^-8 / 2^-11).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (4e-3, 1e-4),
}

CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread (tiny shapes: as fast, and no OpenMP spin-waiting); a module
    uses it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with num_threads(1):
        yield


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend in ("cuda", "triton") and torch.cuda.is_available()
                        else "cpu")


@contextlib.contextmanager
def backend_context(name: str):
    """Backend ``name`` selected, and its device the default device of tensor factories
    (so a test written with torch.randn(...) runs on CUDA for the cuda/triton backends)."""
    with lipkernels.use_backend(name), torch.device(device_for(name)):
        yield name


@pytest.fixture(params=COMPILED_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no compiled backend available: " + str(lipkernels.backend_status())))])
def backend(request):
    """Each compiled backend available here, selected for the test's duration."""
    with backend_context(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "",
                 rtol: float | None = None, atol: float | None = None) -> None:
    """Compare in float64 with the tolerance of ``dtype`` (default: actual's dtype) and,
    on failure, report the worst element, its index and both values."""
    dtype = dtype or actual.dtype
    r, a = TOLERANCES[dtype]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    x = actual.detach().to(torch.float64).cpu()
    y = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(x).all(), f"{what}: non-finite values in the result"
    err = (x - y).abs()
    # Elements far below the tensor's largest are held to 10% of that scale: a float
    # sum's error follows the size of its terms, not of its (cancelled) result.
    scale = y.abs().max() if y.numel() else torch.tensor(0.0, dtype=torch.float64)
    bound = atol + rtol * torch.maximum(y.abs(), 0.1 * scale)
    if not bool((err <= bound).all()):
        idx = int((err - bound).flatten().argmax())
        unravel = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), x.shape)) if x.dim() else ()
        raise AssertionError(
            f"{what}: max excess at {unravel}: got {x.flatten()[idx].item():.10g}, expected "
            f"{y.flatten()[idx].item():.10g} (|diff| {err.flatten()[idx].item():.3g} > allowed "
            f"{bound.flatten()[idx].item():.3g}; rtol={rtol}, atol={atol}); "
            f"max |diff| overall {err.max().item():.3g}")


def pytest_terminal_summary(terminalreporter):
    """tests/test_fuzz.py's count of generated cases, when it ran."""
    import sys
    fuzz = sys.modules.get("test_fuzz")
    for line in (fuzz.summary_lines() if fuzz is not None else []):
        terminalreporter.write_line(line)


def pytest_report_header(config):
    return [f"lipkernels {lipkernels.__version__}, torch {torch.__version__}, "
            f"backends: {lipkernels.backend_status()}",
            f"threads: {torch.get_num_threads()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]


# ------------------------------------------------------------------ shared test inputs

GRAN_EPS = 1e-3

#: name -> (op(f, g), reference(f, g), whether f is an input) for the per-sample family.
PER_SAMPLE_OPS = {
    "sample_norm": (lambda f, g: lipkernels.ops.sample_norm(g),
                    lambda f, g: lipkernels.ops.sample_norm_reference(g), False),
    "gn_normalize": (lipkernels.ops.gn_normalize, lipkernels.ops.gn_normalize_reference, True),
    "gran_normalize": (lambda f, g: lipkernels.ops.gran_normalize(f, g, GRAN_EPS),
                       lambda f, g: lipkernels.ops.gran_normalize_reference(f, g, GRAN_EPS), True),
    "gradient_penalty": (lambda f, g: lipkernels.ops.gradient_penalty(g, 1.0),
                         lambda f, g: lipkernels.ops.gradient_penalty_reference(g, 1.0), False),
    "r1_penalty": (lambda f, g: lipkernels.ops.r1_penalty(g),
                   lambda f, g: lipkernels.ops.r1_penalty_reference(g), False),
}


def run_per_sample(fn, f, g, uses_f):
    """Forward, and the gradients of a fixed linear function of the output."""
    f = f.detach().clone().requires_grad_(uses_f)
    g = g.detach().clone().requires_grad_(True)
    out = fn(f, g)
    weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64,
                            device=out.device).to(out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), (f, g) if uses_f else (g,))
    return (out,) + grads


def check_graph_release(name: str) -> None:
    """The op's autograd node frees what it saved after a backward and checks the saved
    g's version, with the errors torch's autograd gives the reference; retain_graph
    keeps it for another backward with the same gradients."""
    op, ref, uses_f = PER_SAMPLE_OPS[name]

    def outcome(fn, action):
        torch.manual_seed(0)
        base = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        f = torch.randn(4, dtype=torch.float64, requires_grad=uses_f)
        g = base * 1.0
        out = fn(f, g).sum()
        if action == "in place":
            with torch.no_grad():
                g.add_(1.0)
        try:
            first = torch.autograd.grad(out, base, retain_graph=action == "retain")
            second = torch.autograd.grad(out, base)
        except RuntimeError as exc:
            return type(exc), str(exc).split(".")[0]
        return first, second

    for action in ("twice", "in place", "retain"):
        ours = outcome(op, action)
        with lipkernels.use_backend("reference"):
            theirs = outcome(ref, action)
        if action == "retain":
            assert torch.equal(ours[0][0], ours[1][0])
            assert_close(ours[0][0], theirs[0][0], dtype=torch.float64, what=f"{name} retained")
        else:
            assert ours[0] is RuntimeError and theirs[0] is RuntimeError, (action, ours, theirs)
            key = "second time" if action == "twice" else "modified by an inplace operation"
            assert key in ours[1] and key in theirs[1], (ours[1], theirs[1])


def check_saved_tensor_hooks(name: str) -> None:
    """What the op saves for its backward goes through torch.autograd.graph's saved-tensor
    hooks (offloading, torch.utils.checkpoint), and anomaly mode runs it, with the
    gradients of a plain call."""
    op, _, uses_f = PER_SAMPLE_OPS[name]

    def grads(wrap):
        torch.manual_seed(0)
        g = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        f = torch.randn(4, dtype=torch.float64, requires_grad=uses_f)
        inputs = (f, g) if uses_f else (g,)
        return torch.autograd.grad(wrap(lambda: op(f, g * 1.0)).sum(), inputs)

    plain = grads(lambda fn: fn())
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def hooked(fn):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return fn()

    def anomaly(fn):
        with torch.autograd.detect_anomaly(check_nan=True):
            return fn()

    for label, wrap in (("saved_tensors_hooks", hooked),
                        ("checkpoint", lambda fn: torch.utils.checkpoint.checkpoint(fn, use_reentrant=False)),
                        ("detect_anomaly", anomaly)):
        for a, e in zip(grads(wrap), plain):
            assert torch.equal(a, e), f"{name}: gradients under {label}"
    assert (4, 3, 5) in packed, f"{name}: g was not saved through the hooks ({packed})"


def spectral_layers(shapes, dtype=torch.float64, requires_grad=False, warmup=5):
    """Weights and unit vectors; ``warmup`` reference iterations (in float64) make u, v
    what a layer holds after registration (torch runs 15), so that sigma = u^T W v is
    near ||W||_2: random u, v give sigma ~ 1 against ||W|| ~ 50, a cancellation no
    float32 tolerance of a real layer has to cover."""
    w64 = [torch.randn(s, dtype=torch.float64) for s in shapes]
    us = [torch.nn.functional.normalize(torch.randn(s[0], dtype=torch.float64), dim=0) for s in shapes]
    vs = [torch.nn.functional.normalize(torch.randn(torch.Size(s[1:]).numel(), dtype=torch.float64), dim=0)
          for s in shapes]
    lipkernels.ops.power_iteration_reference(w64, us, vs, warmup)
    ws = [w.to(dtype).requires_grad_(requires_grad) for w in w64]
    return ws, [u.to(dtype) for u in us], [v.to(dtype) for v in vs]


def float64_copies(ts):
    """Copies (never aliases, also for float64 input) for the reference to update."""
    return [t.detach().to(torch.float64, copy=True) for t in ts]
