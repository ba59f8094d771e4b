"""Dtypes beyond the real floating types of one tensor (issue 10 sections 2 and 3).

Complex weights: ``lipkernels.spectral_norm`` against torch's own
``torch.nn.utils.parametrizations.spectral_norm`` (same seeds, same ``u``/``v``,
outputs and gradients, several power iterations, train and eval), its state_dict both
ways, the ops against closed forms (the largest singular value) and ``gradcheck``; a
compiled backend selected explicitly refuses complex weights by name.

Mixed precision: every layer, penalty and op under ``torch.autocast`` (CPU bfloat16;
CUDA float16/bfloat16 where there is a GPU) on every backend available, outputs finite
and of the documented dtype, values and gradients against the float32 run; GN/GraN with
``f`` and ``g`` of different dtypes computed in the wider dtype and returned in ``f``'s
(docs/math.md section 10).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lipkernels
from lipkernels import losses, ops
from lipkernels import nn as lknn

from conftest import COMPILED_BACKENDS, INTERPRETING, assert_close, backend_context

ALL_BACKENDS = ["reference"] + COMPILED_BACKENDS

# --------------------------------------------------------------------------- complex

COMPLEX = [torch.complex64, torch.complex128]


def _complex_layers(dtype):
    return {
        "linear": (lambda: nn.Linear(5, 4, dtype=dtype), (3, 5)),
        "conv2d": (lambda: nn.Conv2d(2, 3, 3, dtype=dtype), (2, 2, 5, 5)),
        "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, dtype=dtype), (2, 2, 4, 4)),
    }


def _pair(make, n_power_iterations, dim=None):
    """(torch's layer, ours): same weights, same seed for the random u, v."""
    torch.manual_seed(1)
    ours = make()
    theirs = copy.deepcopy(ours)
    torch.manual_seed(2)
    nn.utils.parametrizations.spectral_norm(theirs, n_power_iterations=n_power_iterations, dim=dim)
    torch.manual_seed(2)
    lipkernels.spectral_norm(ours, n_power_iterations=n_power_iterations, dim=dim)
    return theirs, ours


def _buffers(layer):
    sn = layer.parametrizations.weight[0]
    return sn._u, sn._v


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_complex_layer_matches_torch(dtype, kind, n_iter):
    make, xshape = _complex_layers(dtype)[kind]
    theirs, ours = _pair(make, n_iter)
    for a, b in zip(_buffers(theirs), _buffers(ours)):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a)
    x = torch.randn(xshape, dtype=dtype)
    for step, training in enumerate([True, True, False, True]):
        theirs.train(training)
        ours.train(training)
        results = []
        for layer in (theirs, ours):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            # A real loss of the complex output: |y|^2 weighted.
            loss = (y.abs() ** 2 * torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape)).sum()
            grads = torch.autograd.grad(loss, (layer.parametrizations.weight.original, xi))
            results.append((y, layer.weight) + grads + _buffers(layer))
        for what, a, b in zip(["output", "W_sn", "dL/dW", "dL/dx", "u", "v"], *results):
            torch.testing.assert_close(b, a, msg=lambda m: f"{kind} step {step} {what}: {m}")


@pytest.mark.parametrize("dtype", COMPLEX)
def test_complex_state_dict_both_ways(dtype):
    make, xshape = _complex_layers(dtype)["conv2d"]
    theirs, ours = _pair(make, 2)
    x = torch.randn(xshape, dtype=dtype)
    theirs(x), ours(x)   # a training step each: buffers move away from the initial ones
    torch.manual_seed(5)
    fresh_ours = lipkernels.spectral_norm(make())
    fresh_theirs = nn.utils.parametrizations.spectral_norm(make())
    assert set(fresh_ours.state_dict()) == set(theirs.state_dict())
    fresh_ours.load_state_dict(theirs.state_dict())
    fresh_theirs.load_state_dict(ours.state_dict())
    for layer in (theirs, ours, fresh_ours, fresh_theirs):
        layer.eval()
    torch.testing.assert_close(fresh_ours(x), theirs(x))
    torch.testing.assert_close(fresh_theirs(x), ours(x))
    assert fresh_ours.parametrizations.weight[0]._u.dtype == dtype


def test_complex_dim_and_group():
    """dim=1 and SpectralNormGroup (one batched call) give torch's numbers too."""
    dtype = torch.complex128
    make = lambda: nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.Linear(5, 2, dtype=dtype))  # noqa: E731
    torch.manual_seed(1)
    base = make()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(2)
    for layer in theirs:
        nn.utils.parametrizations.spectral_norm(layer, n_power_iterations=2, dim=1)
    torch.manual_seed(2)
    for layer in ours:
        lipkernels.spectral_norm(layer, n_power_iterations=2, dim=1)
    x = torch.randn(4, 6, dtype=dtype)
    with lknn.SpectralNormGroup(ours):
        for _ in range(3):
            ya, yb = theirs(x), ours(x)
            ga = torch.autograd.grad(ya.abs().sum(), list(theirs.parameters()))
            gb = torch.autograd.grad(yb.abs().sum(), list(ours.parameters()))
            torch.testing.assert_close(yb, ya)
            for a, b in zip(ga, gb):
                torch.testing.assert_close(b, a)


@pytest.mark.parametrize("dtype", COMPLEX)
def test_complex_power_iteration_finds_largest_singular_value(dtype):
    """Independent of torch's layer: sigma -> ||W||_2 (real, up to rounding)."""
    w = torch.randn(7, 3, 2, dtype=dtype)
    u = torch.nn.functional.normalize(torch.randn(7, dtype=dtype), dim=0)
    v = torch.nn.functional.normalize(torch.randn(6, dtype=dtype), dim=0)
    sigma = ops.power_iteration([w], [u], [v], 200)
    assert sigma.dtype == dtype
    expected = torch.linalg.matrix_norm(w.flatten(1), ord=2)
    tol = 1e-4 if dtype == torch.complex64 else 1e-10
    assert abs(sigma[0].real.item() - expected.item()) < tol * expected.item()
    assert abs(sigma[0].imag.item()) < tol * expected.item()
    (w_sn,) = ops.spectral_normalize([w], [u], [v], 1, training=True)
    assert abs(torch.linalg.matrix_norm(w_sn.flatten(1), ord=2).item() - 1) < tol


def test_complex_spectral_normalize_gradcheck():
    w = torch.randn(4, 3, dtype=torch.complex128, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(4, dtype=torch.complex128), dim=0)
    v = torch.nn.functional.normalize(torch.randn(3, dtype=torch.complex128), dim=0)
    ops.power_iteration([w], [u], [v], 5)
    fn = lambda w: ops.spectral_normalize([w], [u], [v], 1, training=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,))
    assert torch.autograd.gradgradcheck(fn, (w,))


@pytest.mark.parametrize("name", COMPILED_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no compiled backend available: " + str(lipkernels.backend_status())))])
def test_complex_explicit_compiled_backend_refuses(name):
    w = torch.randn(4, 3, dtype=torch.complex64)
    u = torch.nn.functional.normalize(torch.randn(4, dtype=torch.complex64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(3, dtype=torch.complex64), dim=0)
    with backend_context(name):
        device = torch.get_default_device()
        w, u, v = w.to(device), u.to(device), v.to(device)
        for call in (lambda: ops.power_iteration([w], [u], [v], 1),
                     lambda: ops.spectral_normalize([w], [u], [v], 1),
                     lambda: lipkernels.spectral_norm(nn.Linear(3, 4, dtype=torch.complex64))):
            with pytest.raises(RuntimeError, match=rf"backend '{name}'.*complex.*complex64"):
                call()
    with lipkernels.use_backend("reference"):   # the reference (also what auto picks) works
        assert ops.spectral_normalize([w], [u], [v], 1)[0].dtype == torch.complex64


def test_complex_only_for_spectral_norm():
    g = torch.randn(2, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="g must be a floating-point tensor"):
        ops.sample_norm(g)
    w = torch.randn(4, 3)
    u = torch.zeros(4, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"us\[0\] has dtype torch.complex64"):
        ops.power_iteration([w], [u], [torch.zeros(3)], 1)


# --------------------------------------------------------------------------- autocast

#: (device type, dtype) of the autocast runs available here.
AUTOCAST = [("cpu", torch.bfloat16)] + (
    [("cuda", torch.float16), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


def _autocast_cases():
    """(backend, device type, autocast dtype) for every backend whose tensors live on that
    device type (cuda/triton run on CUDA tensors with a GPU, on CPU tensors otherwise)."""
    from conftest import device_for
    return [pytest.param(b, d, t, id=f"{b}-{d}-{str(t)[6:]}") for b in ALL_BACKENDS
            for d, t in AUTOCAST if device_for(b).type == d]


CASES = _autocast_cases()

#: Mixed precision against float32, (rtol, atol) with conftest.assert_close's floor of
#: 10% of the largest element: bfloat16 keeps 8 significant bits, float16 11. Through the
#: three layers below (up to 72 terms per dot product, each operand rounded) and a double
#: backward, the bfloat16 gradients here differ from float32 by up to 5% of the largest
#: element (measured, CPU); 8e-2 leaves a margin of 1.5-2x. float16 (CPU autocast under
#: the Triton interpreter): up to 1.3% measured, 2e-2 allowed.
AMP_TOL = {torch.bfloat16: (8e-2, 1e-3), torch.float16: (2e-2, 2e-4)}


def _discriminator(out_dim=1):
    return nn.Sequential(lknn.SNConv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2),
                         lknn.SNConvTranspose2d(8, 4, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Flatten(), lknn.SNLinear(4 * 4 * 4, out_dim))


def _run_model(model, fn, device_type, amp_dtype):
    """fn(model) with and without autocast on copies of model (same u, v): returns
    (autocast result, float32 result), each (output, grads of the parameters)."""
    results = []
    for amp in (True, False):
        m = copy.deepcopy(model)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp):
            out = fn(m)
        loss = (out.float() * torch.linspace(-1, 2, out.numel(), device=out.device).reshape(out.shape)).sum()
        grads = torch.autograd.grad(loss, [p for p in m.parameters()], allow_unused=True)
        results.append((out, grads))
    return results


def _check_amp(amp, ref, amp_dtype, what, out_dtype):
    (out, grads), (out32, grads32) = amp, ref
    rtol, atol = AMP_TOL[amp_dtype]
    assert out.dtype == out_dtype, f"{what}: output dtype {out.dtype}, expected {out_dtype}"
    assert_close(out, out32, dtype=amp_dtype, rtol=rtol, atol=atol, what=f"{what} output")
    for i, (a, b) in enumerate(zip(grads, grads32)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype == torch.float32
            assert_close(a, b, dtype=amp_dtype, rtol=rtol, atol=atol, what=f"{what} grad of parameter {i}")


@pytest.mark.parametrize("backend,device_type,amp_dtype", CASES)
@pytest.mark.parametrize("group", [False, True])
def test_autocast_sn_layers(backend, device_type, amp_dtype, group):
    with backend_context(backend):
        model = _discriminator()
        emb = lknn.SNEmbedding(10, 6)
        x = torch.randn(4, 3, 4, 4)
        idx = torch.tensor([1, 3, 3, 9])

        def fn(m):
            if group:
                with lknn.SpectralNormGroup(m):
                    return m(x)
            return m(x)

        _check_amp(*_run_model(model, fn, device_type, amp_dtype), amp_dtype,
                   f"SN layers ({backend}, group={group})", amp_dtype)
        # Embedding is not autocast: float32 out, the same as without autocast.
        _check_amp(*_run_model(emb, lambda m: m(idx), device_type, amp_dtype), amp_dtype,
                   "SNEmbedding", torch.float32)
        # Against torch's own spectral norm: its W_sn (and u, v) computed without autocast,
        # since the weight is a parameter, then the autocast linear. (torch's layer itself
        # under CUDA autocast runs its power iteration's torch.mv in float16.)
        theirs, ours = _pair(lambda: nn.Linear(6, 5), 1)
        xs = torch.randn(3, 6)
        for training in (True, False):
            theirs.train(training)
            ours.train(training)
            w_sn = theirs.weight
            with torch.autocast(device_type, dtype=amp_dtype):
                a = nn.functional.linear(xs, w_sn, theirs.bias)
                b = ours(xs)
            assert a.dtype == b.dtype == amp_dtype
            assert_close(b, a, dtype=amp_dtype, what="SNLinear vs torch under autocast")
            for x, y in zip(_buffers(ours), _buffers(theirs)):
                assert x.dtype == torch.float32
                assert_close(x, y, what="u, v after a step under autocast")


@pytest.mark.parametrize("backend,device_type,amp_dtype", CASES)
@pytest.mark.parametrize("wrapper", ["gn", "gn_first_order", "gran"])
def test_autocast_gradnorm_wrappers(backend, device_type, amp_dtype, wrapper):
    with backend_context(backend):
        make = {"gn": lambda d: lknn.GradNorm(d), "gn_first_order": lambda d: lknn.GradNorm(d, first_order=True),
                "gran": lambda d: lknn.GraN(d, tau=0.5, eps=1e-4)}[wrapper]
        model = make(_discriminator())
        x = torch.randn(4, 3, 4, 4)
        # f is amp_dtype (the last Linear runs under autocast), g float32 (x is float32):
        # the result has f's dtype.
        amp, ref = _run_model(model, lambda m: m(x), device_type, amp_dtype)
        assert torch.isfinite(amp[0].float()).all()
        _check_amp(amp, ref, amp_dtype, f"{wrapper} ({backend})", amp_dtype)
        # The gradient reaching a generator through x.
        grads = []
        for enabled in (True, False):
            xi = x.clone().requires_grad_(True)
            with torch.autocast(device_type, dtype=amp_dtype, enabled=enabled):
                out = copy.deepcopy(model)(xi)
            grads.append(torch.autograd.grad(out.float().sum(), xi)[0])
        assert grads[0].dtype == torch.float32
        assert_close(grads[0], grads[1], dtype=amp_dtype, rtol=AMP_TOL[amp_dtype][0],
                     atol=AMP_TOL[amp_dtype][1], what=f"{wrapper} dL/dx")


@pytest.mark.parametrize("backend,device_type,amp_dtype", CASES)
@pytest.mark.parametrize("penalty", ["gradient_penalty", "r1_penalty"])
def test_autocast_penalties_and_losses(backend, device_type, amp_dtype, penalty):
    with backend_context(backend):
        model = _discriminator()
        real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
        alpha = torch.rand(4)
        fn = {"gradient_penalty": lambda m: lipkernels.gradient_penalty(m, real, fake, 10.0, alpha=alpha),
              "r1_penalty": lambda m: lipkernels.r1_penalty(m, real, 10.0)}[penalty]
        amp, ref = _run_model(model, fn, device_type, amp_dtype)
        assert torch.isfinite(amp[0])
        _check_amp(amp, ref, amp_dtype, f"{penalty} ({backend})", torch.float32)


@pytest.mark.parametrize("device_type,amp_dtype", AUTOCAST)
@pytest.mark.parametrize("name", ["hinge", "wasserstein", "nonsaturating"])
def test_autocast_gan_losses(device_type, amp_dtype, name):
    """The losses of lipkernels.losses on autocast scores (amp_dtype): finite, float32 or
    the scores' dtype, values and gradients those of the float32 scores within the
    scores' rounding (scores kept away from the hinge's kinks at -1 and 1)."""
    loss = getattr(losses, name)
    device = torch.device(device_type)
    real = torch.linspace(-3, 3, 16, device=device)
    real = real[(real.abs() - 1).abs() > 0.1]
    fake = real.flip(0) * 0.7
    results = []
    for dtype, enabled in ((amp_dtype, True), (torch.float32, False)):
        r = real.to(dtype).requires_grad_(True)
        fk = fake.to(dtype).requires_grad_(True)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=enabled):
            out = torch.stack([loss.d(r, fk).float(), loss.g(fk).float()])
        results.append((out,) + torch.autograd.grad(out.sum(), (r, fk)))
    rtol, atol = AMP_TOL[amp_dtype]
    for what, a, b in zip(("loss", "grad real", "grad fake"), *results):
        assert torch.isfinite(a).all()
        assert_close(a, b, dtype=amp_dtype, rtol=rtol, atol=atol, what=f"losses.{name} {what}")


_OPS = {
    "sample_norm": lambda f, g: ops.sample_norm(g),
    "gn_normalize": ops.gn_normalize,
    "gran_normalize": lambda f, g: ops.gran_normalize(f, g, 1e-3),
    "gradient_penalty": lambda f, g: ops.gradient_penalty(g, 1.0),
    "r1_penalty": lambda f, g: ops.r1_penalty(g),
}


@pytest.mark.parametrize("backend,device_type,amp_dtype", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, "amp"])
def test_autocast_ops_unchanged(backend, device_type, amp_dtype, dtype):
    """Autocast is off inside every op: under autocast each op gives exactly what it
    gives without, in its inputs' dtypes (on CUDA, autocast would otherwise run the
    reference's torch.mv in float16 and its vector_norm in float32)."""
    dtype = amp_dtype if dtype == "amp" else dtype
    with backend_context(backend):
        g = torch.randn(5, 3, 4).to(dtype)
        f = torch.randn(5).to(dtype)
        for name, op in _OPS.items():
            results = []
            for enabled in (True, False):
                fi = f.clone().requires_grad_(True)
                gi = g.clone().requires_grad_(True)
                with torch.autocast(device_type, dtype=amp_dtype, enabled=enabled):
                    out = op(fi, gi)
                    grads = torch.autograd.grad(out.float().sum(), (fi, gi), allow_unused=True)
                results.append((out,) + tuple(x for x in grads if x is not None))
            for a, b in zip(*results):
                assert a.dtype == b.dtype
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        if dtype == torch.float32:   # weights are parameters: float32 under autocast too
            w = torch.randn(6, 2, 3)
            us = [torch.nn.functional.normalize(torch.randn(6), dim=0)]
            vs = [torch.nn.functional.normalize(torch.randn(6), dim=0)]
            results = []
            for enabled in (True, False):
                u, v = us[0].clone(), vs[0].clone()
                wi = w.clone().requires_grad_(True)
                with torch.autocast(device_type, dtype=amp_dtype, enabled=enabled):
                    sigma = ops.power_iteration([wi], [u], [v], 2)
                    (w_sn,) = ops.spectral_normalize([wi], [u], [v], 1)
                    (grad,) = torch.autograd.grad(w_sn.sum(), wi)
                results.append((sigma, w_sn, grad, u, v))
            for a, b in zip(*results):
                assert a.dtype == b.dtype == torch.float32
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            params = [torch.randn(3, 4), torch.randn(5)]
            clipped = [p.clone() for p in params]
            with torch.autocast(device_type, dtype=amp_dtype):
                ops.clip_(clipped, 0.5)
            for p, c in zip(params, clipped):
                torch.testing.assert_close(c, p.clamp(-0.5, 0.5), rtol=0, atol=0)


# ------------------------------------------------------------------ mixed f/g dtypes

MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
         (torch.float16, torch.float32), (torch.float32, torch.float16),
         (torch.float32, torch.float64), (torch.float64, torch.float32),
         (torch.bfloat16, torch.float16), (torch.float16, torch.float64)]


def _narrowest(a, b):
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return max(a, b, key=order.index)


def _check_mixed(f_dtype, g_dtype, f_shape=(5,)):
    g = torch.randn(5, 3, 7, dtype=torch.float64)
    g[2] = 0                          # n = 0 ...
    f = torch.randn(f_shape, dtype=torch.float64)
    f.view(-1)[2] = 0                 # ... and f = 0: GN's 0/0
    g, f = g.to(g_dtype), f.to(f_dtype)
    wide = torch.promote_types(f_dtype, g_dtype)
    for name, op, ref in (
            ("gn_normalize", ops.gn_normalize, ops.gn_normalize_reference),
            ("gran_normalize", lambda f, g: ops.gran_normalize(f, g, 1e-3),
             lambda f, g: ops.gran_normalize_reference(f, g, 1e-3))):
        fi, gi = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
        out = op(fi, gi)
        weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).reshape(out.shape)
        grad_f, grad_g = torch.autograd.grad((out.double() * weight).sum(), (fi, gi))
        assert (out.dtype, out.shape) == (f_dtype, f.shape), f"{name}: {out.dtype} {out.shape}"
        assert grad_f.dtype == f_dtype and grad_g.dtype == g_dtype
        # Independent: the float64 reference on the same (rounded) inputs, computed in
        # the wide dtype first (the rule), then rounded to f's dtype.
        f64, g64 = f.double().requires_grad_(True), g.double().requires_grad_(True)
        with lipkernels.use_backend("reference"):
            expected = ref(f64, g64)
        ef, eg = torch.autograd.grad((expected * weight).sum(), (f64, g64))
        what = f"{name} f {f_dtype} g {g_dtype} ({lipkernels.backends.select(g.device)})"
        assert_close(out, expected, dtype=_narrowest(f_dtype, wide), what=what)
        assert_close(grad_f, ef, dtype=_narrowest(f_dtype, wide), what=what + " grad f")
        assert_close(grad_g, eg, dtype=_narrowest(g_dtype, wide), what=what + " grad g")
        assert float(out.detach().reshape(-1)[2]) == 0 and float(grad_g[2].abs().sum()) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("f_dtype,g_dtype", MIXED)
@pytest.mark.parametrize("f_shape", [(5,), (5, 1)])
def test_mixed_f_g_dtypes(backend, f_dtype, g_dtype, f_shape):
    with backend_context(backend):
        _check_mixed(f_dtype, g_dtype, f_shape)


@pytest.mark.triton
@pytest.mark.parametrize("f_dtype,g_dtype", [
    p if torch.cuda.is_available() or torch.bfloat16 not in p else
    pytest.param(*p, marks=pytest.mark.skip(reason="the Triton interpreter has no bfloat16 arithmetic"))
    for p in MIXED])
def test_mixed_f_g_dtypes_triton(f_dtype, g_dtype):
    if "triton" not in lipkernels.available_backends():
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1])
    with backend_context("triton"):
        _check_mixed(f_dtype, g_dtype)


def test_mixed_dtypes_other_ops_unchanged():
    """Only GN/GraN take f; the penalties and sample_norm keep their dtype rules, and
    every backend agrees with the reference on the documented output dtypes."""
    g = torch.randn(3, 4, dtype=torch.bfloat16)
    assert ops.sample_norm(g).dtype == torch.bfloat16
    assert ops.gradient_penalty(g).dtype == torch.float32
    assert ops.r1_penalty(g).dtype == torch.float32
    with pytest.raises(TypeError, match="f must be a floating-point tensor"):
        ops.gn_normalize(torch.ones(3, dtype=torch.int64), g)


@pytest.mark.triton
@pytest.mark.parametrize("check", ["sn_layers", "gradnorm", "gran", "penalties", "ops"])
def test_autocast_triton(check):
    """The autocast tests on the Triton backend. Under the interpreter (CPU tensors) with
    CPU autocast to float16: the interpreter has no bfloat16 arithmetic, and float16
    inputs only reach the kernels in the ops check (the layers' weights and inputs stay
    float32, GN/GraN promote f to g's float32)."""
    if "triton" not in lipkernels.available_backends():
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1])
    from conftest import device_for
    cases = [(d, t) for d, t in AUTOCAST if d == device_for("triton").type]
    if not torch.cuda.is_available():
        cases = [("cpu", torch.float16)]
    for device_type, amp_dtype in cases:
        if check == "sn_layers":
            test_autocast_sn_layers("triton", device_type, amp_dtype, True)
        elif check == "gradnorm":
            test_autocast_gradnorm_wrappers("triton", device_type, amp_dtype, "gn")
        elif check == "gran":
            test_autocast_gradnorm_wrappers("triton", device_type, amp_dtype, "gran")
        elif check == "penalties":
            test_autocast_penalties_and_losses("triton", device_type, amp_dtype, "gradient_penalty")
        else:
            test_autocast_ops_unchanged("triton", device_type, amp_dtype, torch.float32)
            test_autocast_ops_unchanged("triton", device_type, amp_dtype, "amp")
