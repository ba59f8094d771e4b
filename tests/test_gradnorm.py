"""GradNorm / GraN / gradient penalties / weight clipping / losses, end to end
(docs/math.md sections 3-7), against the formulas written out here in plain PyTorch.

Every module-level test runs once per backend: "reference" and each compiled backend.
Unless a test says otherwise, everything is float64, so the only differences between
the library and the hand-written formula are summation order and the (equivalent)
algebra of the backward; the float64 tolerance of conftest (rtol 1e-10, atol 1e-12)
is many orders above that (~1e-15 relative) and far below any real mistake.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipkernels
from lipkernels.nn import GradNorm, GraN

from conftest import backend_context, COMPILED_BACKENDS, assert_close, device_for

BACKENDS = ["reference"] + COMPILED_BACKENDS
B = 5  # batch size used throughout


@pytest.fixture(params=BACKENDS)
def be(request):
    """The reference and every compiled backend, selected for the test's duration;
    yields the device the backend's tensors live on."""
    with backend_context(request.param):
        yield device_for(request.param)


# ------------------------------------------------------------------ networks


def _act(name: str) -> nn.Module:
    return {"leaky": nn.LeakyReLU(0.1), "tanh": nn.Tanh()}[name]


def image_D(act: str = "leaky", flat_out: bool = False, dev="cpu") -> nn.Module:
    """Small conv discriminator, (B, 3, 8, 8) -> (B, 1), or (B,) with flat_out."""
    layers = [nn.Conv2d(3, 4, 3, padding=1), _act(act), nn.Conv2d(4, 4, 4, stride=2, padding=1),
              _act(act), nn.Flatten(), nn.Linear(4 * 4 * 4, 1)]
    if flat_out:
        layers.append(nn.Flatten(0))
    return nn.Sequential(*layers).double().to(dev)


def vector_D(act: str = "leaky", flat_out: bool = False, dev="cpu", dim: int = 16) -> nn.Module:
    """MLP discriminator, (B, 16) -> (B, 1), or (B,) with flat_out."""
    layers = [nn.Linear(dim, 12), _act(act), nn.Linear(12, 12), _act(act), nn.Linear(12, 1)]
    if flat_out:
        layers.append(nn.Flatten(0))
    return nn.Sequential(*layers).double().to(dev)


def make_D(kind: str, act: str = "leaky", flat_out: bool = False, dev="cpu") -> nn.Module:
    return (image_D if kind == "image" else vector_D)(act, flat_out, dev)


def input_shape(kind: str):
    return (B, 3, 8, 8) if kind == "image" else (B, 16)


def make_G(kind: str, dev="cpu", zdim: int = 4) -> nn.Module:
    """Tiny generator z (B, 4) -> x of the discriminator's input shape."""
    shape = input_shape(kind)[1:]
    numel = math.prod(shape)
    return nn.Sequential(nn.Linear(zdim, numel), nn.Tanh(),
                         nn.Unflatten(1, shape)).double().to(dev)


class Lambda(nn.Module):
    def __init__(self, fn, *params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.ps = nn.ParameterList([nn.Parameter(p) for p in params])

    def forward(self, x):
        return self.fn(x, *self.ps)


# ------------------------------------------------------------------ hand-written formulas


def grad_of(D: nn.Module, x: torch.Tensor):
    """(f, g) with g = d sum f / dx built with create_graph (x made a leaf if needed)."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    f = D(x)
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=True)
    return f, g


def norm_of(g: torch.Tensor) -> torch.Tensor:
    """||g_i||_2, plain sqrt of a sum of squares (only used where n > 0)."""
    return g.flatten(1).square().sum(1).sqrt()


def safe_norm_of(g: torch.Tensor) -> torch.Tensor:
    """||g_i||_2 with the docs/math.md convention dn/dg = 0 at n = 0 (double-where guard)."""
    s = g.flatten(1).square().sum(1)
    pos = s > 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


def gn_formula(D, x, safe=False):
    f, g = grad_of(D, x)
    n = (safe_norm_of if safe else norm_of)(g)
    fb = f.reshape(-1)
    if safe:  # 0/0 := 0 with zero derivatives (docs/math.md section 4, this project's choice)
        d = n + fb.abs()
        pos = d > 0
        out = torch.where(pos, fb / torch.where(pos, d, torch.ones_like(d)), torch.zeros_like(d))
    else:
        out = fb / (n + fb.abs())
    return out.reshape(f.shape)


def gran_formula(D, x, tau, eps, safe=False):
    f, g = grad_of(D, x)
    n = (safe_norm_of if safe else norm_of)(g)
    fb = f.reshape(-1)
    return (fb * n / (n * n + eps) / tau).reshape(f.shape)


def gp_formula(D, real, fake, alpha, weight, center, safe=False):
    a = alpha.reshape((-1,) + (1,) * (real.dim() - 1))
    x_hat = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    _, g = grad_of(D, x_hat)
    n = (safe_norm_of if safe else norm_of)(g)
    return weight * ((n - center) ** 2).mean()


def r1_formula(D, real, gamma):
    _, g = grad_of(D, real.detach())
    return gamma / 2 * g.flatten(1).square().sum(1).mean()


def grads(out: torch.Tensor, inputs, weights: torch.Tensor | None = None):
    """d <out, weights> / d inputs (weights: fixed random cotangent, or plain sum)."""
    loss = (out.reshape(-1) * weights).sum() if weights is not None else out.sum()
    # retain_graph: the library's output and the formula may share a graph (x = G(z)).
    return torch.autograd.grad(loss, list(inputs), retain_graph=True)


def pgrads(out: torch.Tensor, params):
    """d out / d params for a scalar penalty; None where a parameter does not reach it
    (the last layer's bias never reaches an input gradient)."""
    return torch.autograd.grad(out, list(params), allow_unused=True, retain_graph=True)


def assert_all_close(actual, expected, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{i}]: gradient where the formula has none"
            continue
        assert a is not None, f"{what}[{i}]: no gradient where the formula has one"
        assert_close(a, e, dtype=torch.float64, what=f"{what}[{i}]")


# ------------------------------------------------------------------ 1. GradNorm


@pytest.mark.parametrize("act", ["leaky", "tanh"])
@pytest.mark.parametrize("flat_out", [False, True], ids=["B1", "B"])
@pytest.mark.parametrize("kind", ["image", "vector"])
def test_gradnorm_matches_formula(be, kind, flat_out, act):
    D = make_D(kind, act, flat_out, be)
    x = torch.randn(input_shape(kind), dtype=torch.float64, device=be, requires_grad=True)
    out = GradNorm(D)(x)
    ref = gn_formula(D, x)
    # Output has f's shape: (B,) or (B, 1).
    assert out.shape == ((B,) if flat_out else (B, 1))
    assert_close(out, ref, what="GN value")  # float64, see module docstring
    assert bool((out.abs() <= 1).all()), "GN output must lie in [-1, 1]"
    # Double backprop into D's weights and into x, with a random cotangent so that every
    # sample's coefficient matters.
    w = torch.randn(B, dtype=torch.float64, device=be)
    params = list(D.parameters())
    assert_all_close(grads(out, params + [x], w), grads(ref, params + [x], w), "GN grad (theta, x)")


@pytest.mark.parametrize("act", ["leaky", "tanh"])
@pytest.mark.parametrize("kind", ["image", "vector"])
def test_gradnorm_generator_step(be, kind, act):
    """x = G(z): the gradient reaches G's weights through f and through ||grad f||."""
    D = make_D(kind, act, dev=be)
    G = make_G(kind, be)
    z = torch.randn(B, 4, dtype=torch.float64, device=be)
    x = G(z)
    out = GradNorm(D)(x)
    ref = gn_formula(D, x)
    assert_close(out, ref, what="GN value on G(z)")
    w = torch.randn(B, dtype=torch.float64, device=be)
    params = list(G.parameters()) + list(D.parameters())
    assert_all_close(grads(out, params, w), grads(ref, params, w), "GN grad (G, D)")


def test_gradnorm_real_data_without_grad(be):
    """x that does not require grad (real data): works, D's weights still get the
    double-backprop gradient, and the caller's x is left untouched."""
    D = image_D("tanh", dev=be)
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64, device=be)
    out = GradNorm(D)(x)
    assert not x.requires_grad and x.grad is None
    ref = gn_formula(D, x)
    assert_close(out, ref, what="GN value (real data)")
    params = list(D.parameters())
    assert_all_close(grads(out, params), grads(ref, params), "GN grad theta (real data)")


def test_gradnorm_under_no_grad(be):
    D = vector_D("tanh", dev=be)
    x = torch.randn(B, 16, dtype=torch.float64, device=be)
    with torch.no_grad():
        out = GradNorm(D)(x)
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in D.parameters())
    assert_close(out, gn_formula(D, x), what="GN value under no_grad")


def test_gradnorm_float32(be):
    """float32 end to end, against the same formula in float32. f and g come from the
    same network on the same input in both, so only the epilogue's rounding and
    summation order differ: conftest's float32 tolerance (rtol 1e-5) covers that."""
    D = image_D("tanh", dev=be).float()
    x = torch.randn(B, 3, 8, 8, device=be, requires_grad=True)
    out = GradNorm(D)(x)
    ref = gn_formula(D, x)
    assert out.dtype == torch.float32
    assert_close(out, ref, what="GN float32 value")
    params = list(D.parameters()) + [x]
    for i, (a, e) in enumerate(zip(grads(out, params), grads(ref, params))):
        assert_close(a, e, what=f"GN float32 grad[{i}]")


# ------------------------------------------------------------------ 2. first-order GN


def test_first_order_exact_for_piecewise_linear(be):
    """docs/math.md §4, "Faster GN-GAN": for a LeakyReLU MLP, grad_x f_hat of the first-order
    variant equals the exact double-backprop input gradient (the Hessian in x is 0)."""
    D = vector_D("leaky", dev=be)
    x = torch.randn(B, 16, dtype=torch.float64, device=be, requires_grad=True)
    out = GradNorm(D, first_order=True)(x)
    ref = gn_formula(D, x)
    assert_close(out, ref, what="first-order GN value")
    w = torch.randn(B, dtype=torch.float64, device=be)
    (gx,) = grads(out, [x], w)
    (gx_exact,) = grads(ref, [x], w)
    # Mathematically identical; only float64 rounding of the same products differs
    # (at most 1.1e-16 over 20 seeds), so 1e-12 absolute is a strict bound for O(1) gradients.
    assert_close(gx, gx_exact, dtype=torch.float64, rtol=0.0, atol=1e-12,
                 what="first-order input gradient (LeakyReLU)")
    # And it is the closed form n / (n + |f|)^2 * grad_x f.
    f, g = grad_of(D, x)
    n, fb = norm_of(g), f.reshape(-1)
    closed = (w * n / (n + fb.abs()) ** 2)[:, None] * g
    assert_close(gx, closed, dtype=torch.float64, rtol=0.0, atol=1e-12,
                 what="first-order input gradient vs closed form")


def test_first_order_not_exact_otherwise(be):
    """The property needs piecewise linearity (a Tanh MLP breaks it), and it never holds
    for D's weights (dn/dtheta != 0): the first-order gradients must then differ from the
    exact ones, by far more than rounding."""
    w = torch.randn(B, dtype=torch.float64, device=be)
    # Smooth discriminator: input gradients differ.
    D = vector_D("tanh", dev=be)
    x = torch.randn(B, 16, dtype=torch.float64, device=be, requires_grad=True)
    (gx,) = grads(GradNorm(D, first_order=True)(x), [x], w)
    (gx_exact,) = grads(gn_formula(D, x), [x], w)
    assert (gx - gx_exact).abs().max() > 1e-6 * gx_exact.abs().max()
    # Piecewise-linear discriminator, weights: differ too.
    D = vector_D("leaky", dev=be)
    params = list(D.parameters())
    first = grads(GradNorm(D, first_order=True)(x), params, w)
    exact = grads(gn_formula(D, x), params, w)
    diff = max(float((a - e).abs().max()) for a, e in zip(first, exact))
    scale = max(float(e.abs().max()) for e in exact)
    assert diff > 1e-6 * scale


# ------------------------------------------------------------------ 3. GraN


@pytest.mark.parametrize("tau,eps", [(1.0, 1e-4), (0.5, 0.3), (2.0, 5.0)])
@pytest.mark.parametrize("flat_out", [False, True], ids=["B1", "B"])
@pytest.mark.parametrize("kind", ["image", "vector"])
def test_gran_matches_formula(be, kind, flat_out, tau, eps):
    D = make_D(kind, "tanh", flat_out, be)
    x = torch.randn(input_shape(kind), dtype=torch.float64, device=be, requires_grad=True)
    out = GraN(D, tau=tau, eps=eps)(x)
    ref = gran_formula(D, x, tau, eps)
    assert out.shape == ((B,) if flat_out else (B, 1))
    assert_close(out, ref, what="GraN value")
    w = torch.randn(B, dtype=torch.float64, device=be)
    params = list(D.parameters())
    assert_all_close(grads(out, params + [x], w), grads(ref, params + [x], w),
                     "GraN grad (theta, x)")


def test_gran_generator_step(be):
    D = image_D("tanh", dev=be)
    G = make_G("image", be)
    x = G(torch.randn(B, 4, dtype=torch.float64, device=be))
    out = GraN(D, tau=0.5, eps=0.1)(x)
    ref = gran_formula(D, x, 0.5, 0.1)
    assert_close(out, ref, what="GraN value on G(z)")
    params = list(G.parameters()) + list(D.parameters())
    assert_all_close(grads(out, params), grads(ref, params), "GraN grad (G, D)")


@pytest.mark.parametrize("arg,value", [("tau", 0.0), ("tau", -1.0), ("tau", float("nan")),
                                       ("eps", 0.0), ("eps", -1e-3), ("eps", float("inf"))])
def test_gran_rejects_bad_tau_eps(arg, value):
    with pytest.raises(ValueError, match=arg):
        GraN(vector_D(), **{arg: value})


# ------------------------------------------------------------------ 4. gradient penalty


@pytest.mark.parametrize("weight,center", [(10.0, 1.0), (2.5, 0.0), (1.0, 0.3)])
@pytest.mark.parametrize("kind", ["image", "vector"])
def test_gradient_penalty_explicit_alpha(be, kind, weight, center):
    D = make_D(kind, "tanh", dev=be)
    real = torch.randn(input_shape(kind), dtype=torch.float64, device=be)
    fake = torch.randn(input_shape(kind), dtype=torch.float64, device=be)
    alpha = torch.rand(B, dtype=torch.float64, device=be)
    gp = lipkernels.gradient_penalty(D, real, fake, weight=weight, alpha=alpha, center=center)
    ref = gp_formula(D, real, fake, alpha, weight, center)
    assert gp.dim() == 0
    assert_close(gp, ref, what="GP value")
    params = list(D.parameters())
    assert_all_close(pgrads(gp, params), pgrads(ref, params),
                     "GP grad theta")


def test_gradient_penalty_detaches_real_and_fake(be):
    """Neither fake's producer (G) nor real's producer receives a gradient; the critic does."""
    D = vector_D("tanh", dev=be)
    G = make_G("vector", be)
    R = make_G("vector", be)
    fake = G(torch.randn(B, 4, dtype=torch.float64, device=be))
    real = R(torch.randn(B, 4, dtype=torch.float64, device=be))
    gp = lipkernels.gradient_penalty(D, real, fake, alpha=torch.full((B,), 0.3, dtype=torch.float64,
                                                                       device=be))
    producers = list(G.parameters()) + list(R.parameters())
    got = torch.autograd.grad(gp, producers + list(D.parameters()), allow_unused=True,
                              retain_graph=True)
    assert all(gr is None for gr in got[:len(producers)]), "gradient reached real/fake's producer"
    assert all(gr is not None for gr in got[len(producers):-1])  # all but the last bias
    gp.backward()
    assert all(p.grad is None for p in producers)
    assert D[0].weight.grad is not None


class Recorder(nn.Module):
    """Wraps a critic and keeps the inputs it was called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_gradient_penalty_draws_alpha_per_sample(be):
    """alpha=None: every x_hat_i lies on the segment fake_i -> real_i at some alpha_i in
    [0, 1), the alphas differ between samples, and the value is the formula at those
    alphas. (The alphas are recovered from the critic's input, independent of how the
    library draws them.)"""
    n_batch = 64  # enough samples that "not all alphas equal" and the range check mean something
    D = Recorder(vector_D("tanh", dev=be))
    real = torch.randn(n_batch, 16, dtype=torch.float64, device=be)
    fake = torch.randn(n_batch, 16, dtype=torch.float64, device=be)
    gp = lipkernels.gradient_penalty(D, real, fake, weight=10.0)
    assert len(D.seen) == 1
    x_hat = D.seen[0]
    d = real - fake
    alpha = ((x_hat - fake) * d).sum(1) / d.square().sum(1)
    # x_hat = fake + alpha (real - fake) up to float64 rounding of the interpolation.
    assert_close(x_hat, fake + alpha[:, None] * d, dtype=torch.float64, rtol=1e-12, atol=1e-13,
                 what="x_hat on the segment fake -> real")
    assert bool((alpha >= -1e-12).all()) and bool((alpha < 1 + 1e-12).all()), alpha
    assert float(alpha.std()) > 0.1  # U[0,1) has std 0.29; one shared alpha would give 0
    D.seen.clear()
    ref = gp_formula(D, real, fake, alpha, 10.0, 1.0)
    # alpha recovered to ~1e-15 relative; the penalty is smooth in alpha, so 1e-9 relative.
    assert_close(gp, ref, dtype=torch.float64, rtol=1e-9, atol=1e-12, what="GP at the drawn alphas")
    # Seed-controlled: the same seed draws the same alphas.
    torch.manual_seed(123)
    a = lipkernels.gradient_penalty(D, real, fake)
    torch.manual_seed(123)
    b = lipkernels.gradient_penalty(D, real, fake)
    assert_close(a, b, dtype=torch.float64, rtol=0.0, atol=0.0, what="GP reproducible under a seed")


def test_gradient_penalty_bad_shapes(be):
    D = vector_D(dev=be)
    real = torch.randn(B, 16, dtype=torch.float64, device=be)
    with pytest.raises(ValueError, match="same shape"):
        lipkernels.gradient_penalty(D, real, torch.randn(B + 1, 16, dtype=torch.float64, device=be))
    with pytest.raises(ValueError, match="same shape"):
        lipkernels.gradient_penalty(D, real, torch.randn(B, 8, 2, dtype=torch.float64, device=be))
    with pytest.raises(ValueError, match="alpha"):
        lipkernels.gradient_penalty(D, real, real.clone(),
                                    alpha=torch.rand(B, 1, dtype=torch.float64, device=be))


# ------------------------------------------------------------------ 5. R1


@pytest.mark.parametrize("gamma", [10.0, 0.1])
@pytest.mark.parametrize("kind", ["image", "vector"])
def test_r1_penalty(be, kind, gamma):
    D = make_D(kind, "tanh", dev=be)
    real = torch.randn(input_shape(kind), dtype=torch.float64, device=be)
    r1 = lipkernels.r1_penalty(D, real, gamma)
    ref = r1_formula(D, real, gamma)
    assert r1.dim() == 0
    assert_close(r1, ref, what="R1 value")
    params = list(D.parameters())
    assert_all_close(pgrads(r1, params), pgrads(ref, params),
                     "R1 grad theta")


# ------------------------------------------------------------------ 6. zero input gradients


@pytest.mark.parametrize("b", [0.0, 0.7, -0.3])
def test_constant_discriminator(be, b):
    """D(x) = (0 x).sum + b: g = 0 exactly. GN = sign(f) (0 at f = 0, this project's
    definition of 0/0), GraN = 0, GP = weight * center^2, R1 = 0; all finite, and the
    gradients into b are 0 (dGN/df = n / (n + |f|)^2 = 0, dGraN/df = n / (n^2 + eps) = 0)."""
    bias = torch.tensor(b, dtype=torch.float64, device=be)
    D = Lambda(lambda x, p: (0 * x).flatten(1).sum(1) + p, bias)
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64, device=be)
    sign = torch.full((B,), math.copysign(1.0, b) if b != 0 else 0.0, dtype=torch.float64)
    zero = torch.zeros(B, dtype=torch.float64)
    for name, module, expected in (("GN", GradNorm(D), sign), ("GraN", GraN(D, eps=1e-4), zero)):
        out = module(x)
        assert_close(out, expected.to(be), what=f"{name} value at g = 0")  # exact closed form
        (gb,) = torch.autograd.grad(out.sum(), list(D.parameters()))
        assert_close(gb, torch.zeros_like(gb), what=f"{name} grad b at g = 0")
    gp = lipkernels.gradient_penalty(D, x, x.flip(0), weight=10.0, center=1.0)
    assert_close(gp, torch.tensor(10.0, dtype=torch.float64, device=be), what="GP at g = 0")
    r1 = lipkernels.r1_penalty(D, x, 10.0)
    assert_close(r1, torch.zeros((), dtype=torch.float64, device=be), what="R1 at g = 0")


@pytest.mark.parametrize("b", [0.0, 0.7])
def test_zero_weight_linear(be, b):
    """D = Linear with zero weight: g_i = W = 0 depends on the weight, so the backward
    really passes through n = 0, where dn/dg := 0. Every gradient is then exactly 0
    (GN: n / d^2 = 0 and dn/dg = 0; GraN: n / q = 0; GP: 2 (n - c) dn/dg; R1: gamma g / B)."""
    D = nn.Linear(16, 1).double().to(be)
    with torch.no_grad():
        D.weight.zero_()
        D.bias.fill_(b)
    x = torch.randn(B, 16, dtype=torch.float64, device=be)
    params = list(D.parameters())
    sign = torch.full((B, 1), 1.0 if b > 0 else 0.0, dtype=torch.float64, device=be)
    outs = {
        "GN": (GradNorm(D)(x), sign),
        "GN first order": (GradNorm(D, first_order=True)(x), sign),
        "GraN": (GraN(D, tau=0.5, eps=1e-4)(x), torch.zeros(B, 1, dtype=torch.float64, device=be)),
        "GP": (lipkernels.gradient_penalty(D, x, x.flip(0), weight=10.0, center=1.0),
               torch.tensor(10.0, dtype=torch.float64, device=be)),
        "R1": (lipkernels.r1_penalty(D, x, 10.0), torch.zeros((), dtype=torch.float64, device=be)),
    }
    for name, (out, expected) in outs.items():
        assert_close(out, expected, what=f"{name} value at n = 0")
        got = torch.autograd.grad(out.sum(), params, allow_unused=True)
        for p, gr in zip(params, got):
            if gr is None:  # e.g. b does not reach GP / R1
                continue
            assert_close(gr, torch.zeros_like(p), what=f"{name} grad at n = 0")


def test_mixed_batch_with_dead_samples(be):
    """A ReLU critic where some samples have f = 0 and g = 0 (dead unit) and the others
    don't: the degenerate samples must not poison the batch. Compared with the formulas
    written with the convention (0/0 := 0, dn/dg := 0 at n = 0)."""
    lin = nn.Linear(16, 1).double().to(be)
    D = nn.Sequential(lin, nn.ReLU())
    x = torch.randn(8, 16, dtype=torch.float64, device=be)
    with torch.no_grad():
        pre = lin(x).reshape(-1)
        srt = pre.sort().values
        lin.bias.sub_((srt[3] + srt[4]) / 2)  # half the samples dead, half alive, none at 0
        pre = lin(x).reshape(-1)
    dead = pre <= 0
    assert int(dead.sum()) == 4
    params = list(D.parameters())
    w = torch.randn(8, dtype=torch.float64, device=be)
    cases = [
        ("GN", GradNorm(D)(x), gn_formula(D, x, safe=True)),
        ("GraN", GraN(D, tau=0.5, eps=0.01)(x), gran_formula(D, x, 0.5, 0.01, safe=True)),
    ]
    for name, out, ref in cases:
        assert_close(out, ref, what=f"{name} value, mixed batch")
        assert_close(out.reshape(-1)[dead], torch.zeros_like(pre[dead]), what=f"{name} dead samples")
        assert_all_close(grads(out, params, w), grads(ref, params, w), f"{name} grad, mixed batch")
    alpha = torch.ones(8, dtype=torch.float64, device=be)  # x_hat = real: the same dead samples
    fake = torch.randn_like(x)
    gp = lipkernels.gradient_penalty(D, x, fake, weight=10.0, alpha=alpha)
    ref = gp_formula(D, x, fake, alpha, 10.0, 1.0, safe=True)
    assert_close(gp, ref, what="GP value, mixed batch")
    assert_all_close(pgrads(gp, params), pgrads(ref, params),
                     "GP grad, mixed batch")
    r1 = lipkernels.r1_penalty(D, x, 3.0)
    ref = r1_formula(D, x, 3.0)
    assert_close(r1, ref, what="R1 value, mixed batch")
    assert_all_close(pgrads(r1, params), pgrads(ref, params),
                     "R1 grad, mixed batch")


# ------------------------------------------------------------------ 7. weight clipping


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_clip_weights_module(be, dtype):
    D = image_D(dev=be).to(dtype)
    with torch.no_grad():
        for p in D.parameters():
            p.mul_(5)  # make sure plenty of entries lie outside [-c, c] and some inside
    c = 0.05
    expected = [torch.clamp(p.detach().clone(), -c, c) for p in D.parameters()]
    assert any(bool((p.abs() > c).any()) for p in D.parameters())
    lipkernels.clip_weights_(D, c)
    for i, (p, e) in enumerate(zip(D.parameters(), expected)):
        assert p.dtype == dtype and p.requires_grad
        # Clamping is exact (no arithmetic): bitwise equality.
        assert torch.equal(p.detach(), e), f"parameter {i} differs from torch.clamp"
        assert float(p.detach().abs().max()) <= float(torch.tensor(c, dtype=dtype))


def test_clip_weights_iterable_and_noncontiguous(be):
    base = 3 * torch.randn(6, 8, dtype=torch.float64, device=be)
    view_t = base.t()                   # non-contiguous view of all of base
    strided = 3 * torch.randn(10, 7, dtype=torch.float64, device=be)
    view_s = strided[::2, 1:5]          # non-contiguous view of part of strided
    plain = 3 * torch.randn(13, dtype=torch.float64, device=be)
    assert not view_t.is_contiguous() and not view_s.is_contiguous()
    c = 0.5
    exp_base = torch.clamp(base, -c, c)
    exp_strided = strided.clone()
    exp_strided[::2, 1:5] = torch.clamp(strided[::2, 1:5], -c, c)
    exp_plain = torch.clamp(plain, -c, c)
    lipkernels.clip_weights_(iter([view_t, plain, view_s]), c)  # any iterable, here a one-shot iterator
    assert torch.equal(base, exp_base)
    assert torch.equal(strided, exp_strided)  # only the viewed elements change
    assert torch.equal(plain, exp_plain)
    lipkernels.clip_weights_([], c)  # nothing to do, no error


def test_clip_weights_errors(be):
    t = torch.randn(4, dtype=torch.float64, device=be)
    for c in (0.0, -0.01):
        with pytest.raises(ValueError, match="c"):
            lipkernels.clip_weights_([t], c)
    with pytest.raises(TypeError):
        lipkernels.clip_weights_([t, torch.arange(4, device=be)], 0.1)


# ------------------------------------------------------------------ 8. losses


@pytest.mark.parametrize("shape", [(7,), (7, 1)])
def test_losses_match_math(shape):
    real = 2 * torch.randn(shape, dtype=torch.float64)
    fake = 2 * torch.randn(shape, dtype=torch.float64)
    softplus = lambda t: torch.log1p(torch.exp(t))  # noqa: E731  (|t| small here, no overflow)
    relu = lambda t: torch.clamp(t, min=0)  # noqa: E731
    L = lipkernels.losses
    expected = {
        "hinge": ((relu(1 - real)).mean() + relu(1 + fake).mean(), -fake.mean()),
        "wasserstein": (fake.mean() - real.mean(), -fake.mean()),
        "nonsaturating": (softplus(-real).mean() + softplus(fake).mean(), softplus(-fake).mean()),
    }
    for name, (d_exp, g_exp) in expected.items():
        loss = getattr(L, name)
        # Same arithmetic up to log1p/exp vs softplus evaluation: float64 tolerance.
        assert_close(loss.d(real, fake), d_exp, what=f"{name}.d")
        assert_close(loss.g(fake), g_exp, what=f"{name}.g")


# ------------------------------------------------------------------ 9. wrong output shape


@pytest.mark.parametrize("bad", ["B2", "scalar", "B11", "2B"])
@pytest.mark.parametrize("wrapper", ["GN", "GN first order", "GraN", "GP", "R1"])
def test_wrong_discriminator_output_shape(be, wrapper, bad):
    inner = vector_D(dev=be)
    head = {"B2": lambda f: torch.cat([f, f], 1),        # (B, 2)
            "scalar": lambda f: f.sum(),                 # ()
            "B11": lambda f: f[:, :, None],              # (B, 1, 1)
            "2B": lambda f: torch.cat([f, f], 0)}[bad]   # (2B, 1)
    D = Lambda(lambda x: head(inner(x)))
    x = torch.randn(B, 16, dtype=torch.float64, device=be)
    call = {"GN": lambda: GradNorm(D)(x),
            "GN first order": lambda: GradNorm(D, first_order=True)(x),
            "GraN": lambda: GraN(D)(x),
            "GP": lambda: lipkernels.gradient_penalty(D, x, x.flip(0)),
            "R1": lambda: lipkernels.r1_penalty(D, x, 1.0)}[wrapper]
    with pytest.raises(ValueError):
        call()
