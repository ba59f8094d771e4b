"""Batched power iteration and spectral normalization: every compiled backend against
the reference (torch's algorithm), closed forms (the top singular value), gradcheck /
gradgradcheck, opcheck, bad input and edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lipkernels
from lipkernels import ops

from conftest import CPU_DTYPES, COMPILED_BACKENDS, assert_close, float64_copies, spectral_layers

# The SNGAN CIFAR-10 CNN discriminator (docs/math.md section 9), plus odd shapes: a single
# row, one column, sizes that are no multiple of any block, a 1 x 8192 layer, 512 x 4608.
SNGAN = [(64, 3, 3, 3), (64, 64, 4, 4), (128, 64, 3, 3), (128, 128, 4, 4), (256, 128, 3, 3),
         (256, 256, 4, 4), (512, 256, 3, 3), (1, 8192)]
ODD = [(1, 5), (7, 1), (3, 17), (33, 5, 3), (1, 8192), (512, 4608), (1000, 3)]


_layers = spectral_layers
_float64_copies = float64_copies


def _clone(ts):
    return [t.detach().clone() for t in ts]


@pytest.mark.parametrize("n_iter", [0, 1, 3])
@pytest.mark.parametrize("shapes", [SNGAN, ODD], ids=["sngan", "odd"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_power_iteration_matches_reference(backend, shapes, n_iter, dtype):
    ws, us, vs = _layers(shapes, dtype)
    us_ref, vs_ref = _float64_copies(us), _float64_copies(vs)
    sigmas = ops.power_iteration(ws, us, vs, n_iter)
    with lipkernels.use_backend("reference"):
        sig_ref = ops.power_iteration(_float64_copies(ws), us_ref, vs_ref, n_iter)
    assert sigmas.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(sigmas, sig_ref, dtype=dtype, what="sigmas")
    for i, (u, v, ur, vr) in enumerate(zip(us, vs, us_ref, vs_ref)):
        # u, v are rounded to the layer dtype after each iteration, as torch's buffers are.
        assert u.dtype == dtype and v.dtype == dtype
        assert_close(u, ur, dtype=dtype, what=f"u[{i}]")
        assert_close(v, vr, dtype=dtype, what=f"v[{i}]")


def test_power_iteration_converges_to_top_singular_value(backend):
    # A matrix with a known, well separated spectrum: sigma_max = 5.
    q1, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    s = torch.linspace(5.0, 0.1, 30, dtype=torch.float64)
    w = q1[:, :30] @ torch.diag(s) @ q2.T
    u = F.normalize(torch.randn(40, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(30, dtype=torch.float64), dim=0)
    sigma = ops.power_iteration([w], [u], [v], 200)
    assert sigma.item() == pytest.approx(5.0, rel=1e-10)
    assert torch.allclose((w @ v).abs(), (5.0 * u).abs(), atol=1e-8)


@pytest.mark.parametrize("training,n_iter", [(True, 1), (True, 2), (False, 1)])
@pytest.mark.parametrize("shapes", [SNGAN, ODD], ids=["sngan", "odd"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_spectral_normalize_matches_reference(backend, shapes, dtype, training, n_iter):
    ws, us, vs = _layers(shapes, dtype, requires_grad=True)
    ws_ref = [w.detach().to(torch.float64, copy=True).requires_grad_(True) for w in ws]
    us_ref, vs_ref = _float64_copies(us), _float64_copies(vs)
    out = ops.spectral_normalize(ws, us, vs, n_iter, 1e-12, training)
    with lipkernels.use_backend("reference"):
        out_ref = ops.spectral_normalize(ws_ref, us_ref, vs_ref, n_iter, 1e-12, training)
    seeds = [torch.randn(o.shape, dtype=torch.float64) for o in out]
    grads = torch.autograd.grad(out, ws, [s.to(dtype) for s in seeds])
    grads_ref = torch.autograd.grad(out_ref, ws_ref, seeds)
    for i in range(len(shapes)):
        assert out[i].shape == ws[i].shape and out[i].dtype == dtype
        assert_close(out[i], out_ref[i], dtype=dtype, what=f"W_sn[{i}]")
        assert_close(grads[i], grads_ref[i], dtype=dtype, what=f"dW[{i}]")
        assert_close(us[i], us_ref[i], dtype=dtype, what=f"u[{i}]")
        assert_close(vs[i], vs_ref[i], dtype=dtype, what=f"v[{i}]")


def test_matches_torch_parametrization(backend):
    """W_sn and the updated u, v of torch.nn.utils.parametrizations.spectral_norm."""
    conv = torch.nn.Conv2d(16, 32, 3).double()
    conv = torch.nn.utils.parametrizations.spectral_norm(conv, n_power_iterations=2)
    sn = conv.parametrizations.weight[0]
    w = conv.parametrizations.weight.original
    u, v = sn._u.clone(), sn._v.clone()
    (ours,) = ops.spectral_normalize([w], [u], [v], 2, 1e-12, True)
    theirs = conv.weight  # runs torch's power iteration on its own buffers
    assert_close(ours, theirs, what="W_sn")
    assert_close(u, sn._u, what="u")
    assert_close(v, sn._v, what="v")


def test_gradcheck_eval_mode(backend):
    # In eval mode W -> W / (u^T W v) is an honest function of W: gradcheck applies.
    ws, us, vs = _layers([(5, 3), (4, 2, 2, 1), (1, 6)], requires_grad=True)
    fn = lambda *w: tuple(ops.spectral_normalize(list(w), us, vs, 1, 1e-12, False))
    assert torch.autograd.gradcheck(fn, tuple(ws))
    assert torch.autograd.gradgradcheck(fn, tuple(ws))


def test_backward_treats_u_v_as_constants(backend):
    """Training-mode gradient: (G - <G, W_sn> u v^T) / sigma with the updated u, v
    (docs/math.md section 1), written out here."""
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    u = F.normalize(torch.randn(6, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    (w_sn,) = ops.spectral_normalize([w], [u], [v], 1, 1e-12, True)
    G = torch.randn(6, 4, dtype=torch.float64)
    (dw,) = torch.autograd.grad(w_sn, w, G)
    sigma = u @ w.detach() @ v
    expected = (G - (G * (w.detach() / sigma)).sum() * torch.outer(u, v)) / sigma
    assert_close(dw, expected, what="dW")
    assert_close(w_sn, w.detach() / sigma, what="W_sn")


def test_two_forwards_then_backward(backend):
    """Each backward uses the u, v of its own forward (torch clones them)."""
    ws, us, vs = _layers([(8, 3, 2, 2), (5, 7)], requires_grad=True)
    out1 = ops.spectral_normalize(ws, us, vs)
    u1 = _clone(us)
    v1 = _clone(vs)
    out2 = ops.spectral_normalize(ws, us, vs)
    G = [torch.randn_like(o) for o in out1]
    grads = torch.autograd.grad(out1, ws, G, retain_graph=True)
    for w, g_out, u, v, dw in zip(ws, G, u1, v1, grads):
        W = w.detach().flatten(1)
        sigma = u @ W @ v
        expected = (g_out.flatten(1) - (g_out.flatten(1) * W / sigma).sum() * torch.outer(u, v)) / sigma
        assert_close(dw.flatten(1), expected, what="dW of the first forward")
    torch.autograd.grad(out2, ws, G)


def test_second_order_through_create_graph(backend):
    ws, us, vs = _layers([(4, 3), (2, 5)], requires_grad=True)
    ws_ref = [w.detach().clone().requires_grad_(True) for w in ws]
    us_ref, vs_ref = _clone(us), _clone(vs)

    def hvp(fn, w):
        out = fn(w)
        loss = sum((o ** 3).sum() for o in out)
        g = torch.autograd.grad(loss, w, create_graph=True)
        return torch.autograd.grad(sum((x ** 2).sum() for x in g), w)

    actual = hvp(lambda w: ops.spectral_normalize(w, us, vs, 1, 1e-12, True), ws)
    with lipkernels.use_backend("reference"):
        expected = hvp(lambda w: ops.spectral_normalize(w, us_ref, vs_ref, 1, 1e-12, True), ws_ref)
    for a, e in zip(actual, expected):
        assert_close(a, e, what="second order")


def test_zero_weight_is_finite(backend):
    ws, us, vs = _layers([(4, 3), (3, 2, 2)], requires_grad=True)
    with torch.no_grad():
        ws[0].zero_()
    out = ops.spectral_normalize(ws, us, vs)
    (grad,) = torch.autograd.grad(out[0].sum() + out[1].sum(), ws[:1])
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(grad).all() and torch.isfinite(out[1]).all()
    for u, v in zip(us, vs):
        assert torch.isfinite(u).all() and torch.isfinite(v).all()


def test_non_contiguous_and_channels_last_weights(backend):
    base = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    ws = [base.to(memory_format=torch.channels_last).requires_grad_(True),
          torch.randn(6, 10, dtype=torch.float64).t().requires_grad_(True)]
    _, us, vs = _layers([tuple(w.shape) for w in ws])
    us_ref, vs_ref = _clone(us), _clone(vs)
    out = ops.spectral_normalize(ws, us, vs)
    with lipkernels.use_backend("reference"):
        out_ref = ops.spectral_normalize(ws, us_ref, vs_ref)
    for o, r in zip(out, out_ref):
        assert_close(o, r, what="W_sn")
    grads = torch.autograd.grad(out, ws, [torch.ones_like(o) for o in out])
    grads_ref = torch.autograd.grad(out_ref, ws, [torch.ones_like(o) for o in out])
    for g, r in zip(grads, grads_ref):
        assert_close(g, r, what="dW")


def test_deterministic_across_thread_counts(backend):
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        ws, us, vs = _layers(SNGAN, torch.float32, requires_grad=True)
        torch.manual_seed(1)
        out = ops.spectral_normalize(ws, us, vs, 2)
        grads = torch.autograd.grad(out, ws, [torch.ones_like(o) for o in out])
        results.append(out + list(grads) + us + vs)
        torch.manual_seed(0)
    torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_version_counters_bumped(backend):
    ws, us, vs = _layers([(3, 4)])
    before = us[0]._version
    ops.power_iteration(ws, us, vs, 1)
    assert us[0]._version > before
    before = us[0]._version
    ops.spectral_normalize(ws, us, vs, 1, 1e-12, True)
    assert us[0]._version > before


def test_opcheck(backend):
    lib = torch.ops.lipkernels
    ws, us, vs = _layers([(6, 5), (3, 2, 2, 2)], torch.float32, requires_grad=True)
    wd = [w.detach() for w in ws]
    w_sn, sigmas, uv = lib._sn_forward(wd, us, vs, 1, 1e-12)
    cases = [
        (lib.spectral_normalize, (ws, us, vs, 1, 1e-12, True)),
        (lib.spectral_normalize, (ws, us, vs, 1, 1e-12, False)),
        (lib.power_iteration, (wd, us, vs, 2, 1e-12)),
        (lib._sn_forward, (wd, us, vs, 1, 1e-12)),
        (lib._sn_store_vectors_, (_clone(us), _clone(vs), uv)),
        (lib._sn_backward, ([torch.randn_like(w) for w in wd], wd, uv, sigmas, 1e-12)),
        (lib.clip_, ([torch.randn(5), torch.randn(3, 3)], 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------ bad input

def _bad(make):
    ws, us, vs = _layers([(4, 3), (2, 5)])
    return lambda: make(ws, us, vs)


BAD = [
    ("u wrong length", _bad(lambda w, u, v: ops.power_iteration(w, [torch.randn(5), u[1]], v)), ValueError, r"us\[0\] must have shape \(4,\)"),
    ("v wrong length", _bad(lambda w, u, v: ops.spectral_normalize(w, u, [v[0], torch.randn(4)])), ValueError, r"vs\[1\] must have shape \(5,\)"),
    ("lengths differ", _bad(lambda w, u, v: ops.power_iteration(w, u[:1], v)), ValueError, "same length"),
    ("weight rank 1", _bad(lambda w, u, v: ops.power_iteration([torch.randn(4)], u[:1], v[:1])), ValueError, "rank >= 2"),
    ("integer weight", _bad(lambda w, u, v: ops.power_iteration([torch.ones(4, 3, dtype=torch.int64)], u[:1], v[:1])), TypeError, "floating-point"),
    ("mixed dtypes", _bad(lambda w, u, v: ops.power_iteration([w[0].float(), w[1]], u, v)), TypeError, "dtype"),
    ("mixed devices", _bad(lambda w, u, v: ops.power_iteration([w[0], w[1].to("meta")], u, v)), ValueError, "device"),
    ("eps zero", _bad(lambda w, u, v: ops.power_iteration(w, u, v, 1, 0.0)), ValueError, "eps"),
    ("eps negative", _bad(lambda w, u, v: ops.spectral_normalize(w, u, v, 1, -1e-12)), ValueError, "eps"),
    ("negative iterations", _bad(lambda w, u, v: ops.power_iteration(w, u, v, -1)), ValueError, "n_power_iterations"),
    ("float iterations", _bad(lambda w, u, v: ops.power_iteration(w, u, v, 1.5)), TypeError, "n_power_iterations"),
    ("not a list", _bad(lambda w, u, v: ops.power_iteration(w[0], u, v)), TypeError, "list"),
    ("u requires grad", _bad(lambda w, u, v: ops.spectral_normalize(w, [u[0].requires_grad_(), u[1]], v)), ValueError, "must not require grad"),
    ("u non-contiguous", _bad(lambda w, u, v: ops.power_iteration(w, [torch.randn(8, dtype=torch.float64)[::2], u[1]], v)), ValueError, "contiguous"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("backend_name", ["reference"] + COMPILED_BACKENDS)
def test_bad_input(case, backend_name):
    _, call, error, words = case
    with lipkernels.use_backend(backend_name):
        with pytest.raises(error, match=words):
            call()


def test_kernel_checks_name_the_argument(backend):
    lib = torch.ops.lipkernels
    ws, us, vs = _layers([(4, 3)])
    with pytest.raises(RuntimeError, match=r"us\[0\] must have shape \(4,\)"):
        lib.power_iteration(ws, [torch.randn(3)], vs, 1, 1e-12)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        lib.spectral_normalize(ws, us, vs, 1, 0.0, True)
    with pytest.raises(RuntimeError, match="n_power_iterations must be >= 0"):
        lib.power_iteration(ws, us, vs, -2, 1e-12)
