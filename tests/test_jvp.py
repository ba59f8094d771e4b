"""The reverse-over-forward (JVP) method of the gradient penalties, GN and GraN
(lipkernels/nn/_jvp.py, docs/math.md section 13), held to the double backward: float64
gradients of D steps and G steps equal within 1e-10 on the papers' discriminators with
spectral norm inside, on every backend; samples that interact; the first-order-only
guard; torch.compile of the steps of every training method."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipkernels
from lipkernels import models
from lipkernels import nn as lnn
from lipkernels.train import methods as train_methods
from conftest import _ONLY, COMPILED_BACKENDS, INTERPRETING, MAIN_RUN, backend_context

F64 = torch.float64
TOL = 1e-10

# The emulation build's run (LIPKERNELS_TEST_BACKENDS=cuda) tests only what it adds.
BACKENDS = ([] if _ONLY else ["reference"]) + COMPILED_BACKENDS
if INTERPRETING and "triton" in lipkernels.available_backends():
    BACKENDS = ["triton"]


def _cnn():
    return models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm, channels=(4, 4, 8, 8),
                                          image_size=8)


def _dcgan():
    return models.dcgan_discriminator(norm=torch.nn.utils.parametrizations.spectral_norm,
                                      channels=(4, 4, 8, 8), image_size=8)


def _resnet():
    return models.sngan_resnet_discriminator(norm=lipkernels.spectral_norm, width=6)


def _resnet_grouped():
    D = models.gngan_resnet_discriminator(norm=lipkernels.spectral_norm, width=6)
    lnn.SpectralNormGroup(D)
    return D


NETWORKS = {"sngan_cnn": _cnn, "dcgan_torch_sn": _dcgan, "sngan_resnet": _resnet,
            "gngan_resnet_grouped": _resnet_grouped}
if INTERPRETING:  # the interpreter is slow: one network of each kind
    NETWORKS = {k: NETWORKS[k] for k in ("sngan_cnn", "gngan_resnet_grouped")}

#: loss name -> (D-step loss, G-step loss) for (D, x, other, alpha, method).
WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)


def _gp(D, x, other, alpha, method):
    return lnn.gradient_penalty(D, x, other, weight=10.0, alpha=alpha, method=method)


def _r1(D, x, other, alpha, method):
    return lnn.r1_penalty(D, x, 10.0, method=method)


def _wrapped(make):
    def loss(D, x, other, alpha, method):
        out = make(D, method)(x).reshape(-1)
        return (out * WEIGHTS[:out.shape[0]].to(out.device)).sum() + (out ** 2).sum()
    return loss


LOSSES = {
    "gp": _gp, "r1": _r1,
    "gn": _wrapped(lambda D, m: lnn.GradNorm(D, method=m)),
    "gn_first_order": _wrapped(lambda D, m: lnn.GradNorm(D, first_order=True, method=m)),
    "gran": _wrapped(lambda D, m: lnn.GraN(D, tau=0.5, eps=1e-3, method=m)),
}


def _step(make, loss, method, x_requires_grad, seed=0):
    """(loss, grads of D's parameters (+ x's), D's buffers) of one step from the same
    start; x with a graph is a G step (gradients into x), without, a D step."""
    torch.manual_seed(seed)
    D = make().to(F64)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    other = torch.randn(4, 3, 8, 8, dtype=F64)
    alpha = torch.rand(4, dtype=F64)
    xin = x.clone().requires_grad_(x_requires_grad)
    value = LOSSES[loss](D, xin, other, alpha, method)
    wrt = list(D.parameters()) + ([xin] if x_requires_grad else [])
    grads = torch.autograd.grad(value, wrt, allow_unused=True, materialize_grads=True)
    return value.detach(), grads, [b.detach().clone() for b in D.buffers()]


def _assert_same(a, b, what):
    (va, ga, ba), (vb, gb, bb) = a, b
    assert torch.allclose(va, vb, rtol=TOL, atol=TOL), f"{what}: loss {float(va)} vs {float(vb)}"
    for i, (x, y) in enumerate(zip(ga, gb)):
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert err <= TOL * max(1.0, float(y.abs().max())), f"{what}: gradient {i} off by {err}"
    for i, (x, y) in enumerate(zip(ba, bb)):
        assert torch.equal(x, y) or float((x.double() - y.double()).abs().max()) <= 1e-13, \
            f"{what}: buffer {i} differs"


@pytest.mark.triton
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("g_step", [False, True], ids=["D_step", "G_step"])
def test_jvp_equals_double_backward(backend_name, net, loss, g_step):
    """Gradients in the weights (D step) and in x (G step, x = G(z) carries a graph), the
    loss value and the spectral-norm vectors after the step, all equal within 1e-10."""
    if INTERPRETING and g_step and loss in ("r1", "gn_first_order"):
        pytest.skip("the interpreter run keeps to the steps that differ from the D step")
    with backend_context(backend_name):
        want = _step(NETWORKS[net], loss, "double_backward", g_step)
        got = _step(NETWORKS[net], loss, "jvp", g_step)
    _assert_same(got, want, f"{backend_name} {net} {loss} {'G' if g_step else 'D'} step")


class _MinibatchStd(nn.Module):
    """ProGAN's minibatch standard deviation: mixes the samples of the batch."""

    def forward(self, x):
        s = x.std(0, keepdim=True).mean().expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([x, s], 1)


def _with(layer_name):
    layers = {
        "batchnorm_train": lambda: nn.BatchNorm2d(4),
        "batchnorm_no_stats": lambda: nn.BatchNorm2d(4, track_running_stats=False),
        "batchnorm_eval": lambda: nn.BatchNorm2d(4).eval(),
        "layernorm": lambda: nn.LayerNorm([4, 4, 4]),
        "instancenorm_tracked": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        "groupnorm": lambda: nn.GroupNorm(2, 4),
        "minibatch_std": _MinibatchStd,
    }
    extra = 1 if layer_name == "minibatch_std" else 0

    def make():
        return nn.Sequential(lnn.SNConv2d(3, 4, 3, 2, 1), layers[layer_name](), nn.LeakyReLU(0.2),
                             nn.Flatten(), lnn.SNLinear((4 + extra) * 16, 1))
    return make


MIXING = {"batchnorm_train", "batchnorm_no_stats", "minibatch_std"}


@pytest.mark.parametrize("layer", ["batchnorm_train", "batchnorm_no_stats", "batchnorm_eval",
                                   "layernorm", "instancenorm_tracked", "groupnorm",
                                   "minibatch_std"])
@pytest.mark.parametrize("loss", ["gp", "r1", "gn", "gran"])
def test_normalization_layers_and_samples_that_interact(layer, loss):
    """Penalties: exact for any critic (one JVP of sum f along dP/dg), samples that
    interact included, with the running statistics updated once. GN / GraN: exact where
    samples do not interact, else a clear error (never a different gradient). LayerNorm
    and InstanceNorm, whose torch forward-mode rules are not differentiable in reverse
    mode, are exact too (run as elementary ops)."""
    make = _with(layer)
    want = _step(make, loss, "double_backward", True)
    if loss in ("gn", "gran") and layer in MIXING:
        with pytest.raises(RuntimeError, match="interact"):
            _step(make, loss, "jvp", True)
        return
    got = _step(make, loss, "jvp", True)
    _assert_same(got, want, f"{layer} {loss}")


def test_torch_forward_ad_of_batch_norm_is_not_reverse_differentiable():
    """Why the JVP steps write the normalizations with elementary ops: torch's own
    forward-mode rule of batch_norm (training) gives a tangent whose reverse-mode
    derivative is wrong. If this starts failing, torch fixed it (the workaround can go)."""
    from torch.autograd import forward_ad
    torch.manual_seed(0)
    D = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Softplus(), nn.Flatten(),
                      nn.Linear(4 * 16, 1)).to(F64)
    x = torch.randn(5, 3, 8, 8, dtype=F64)
    w = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(D(xr).sum(), xr, create_graph=True)
    exact = torch.autograd.grad((g * w).sum(), D[0].bias)[0]
    with forward_ad.dual_level():
        t = forward_ad.unpack_dual(D(forward_ad.make_dual(x, w))).tangent
    plain = torch.autograd.grad(t.sum(), D[0].bias)[0]
    # A conv bias before BatchNorm has no effect on anything: its exact derivative is 0.
    assert float(exact.abs().max()) < 1e-12
    assert float(plain.abs().max()) > 1e-6


@pytest.mark.parametrize("loss", ["gp", "r1", "gn", "gran"])
def test_create_graph_through_jvp_raises(loss):
    torch.manual_seed(0)
    D = _cnn().to(F64)
    x = torch.randn(4, 3, 8, 8, dtype=F64, requires_grad=True)
    value = LOSSES[loss](D, x, torch.randn_like(x), torch.rand(4, dtype=F64), "jvp")
    with pytest.raises(RuntimeError, match="double_backward"):
        torch.autograd.grad(value, list(D.parameters()), create_graph=True, allow_unused=True)
    # The double backward gives second derivatives.
    value = LOSSES[loss](D, x, torch.randn_like(x), torch.rand(4, dtype=F64), "double_backward")
    grads = torch.autograd.grad(value, [p for p in D.parameters()][:1], create_graph=True)
    assert grads[0].requires_grad


def test_dropout_is_refused_and_bad_method_named():
    D = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(4, 2)
    for call in (lambda: lnn.gradient_penalty(D, x, x, method="jvp"),
                 lambda: lnn.GradNorm(D, method="jvp")(x),
                 lambda: lnn.GraN(D, method="jvp")(x)):
        with pytest.raises(RuntimeError, match="dropout|Dropout"):
            call()
    D.eval()
    lnn.gradient_penalty(D, x, x, method="jvp")  # eval mode: no masks
    for call in (lambda: lnn.GradNorm(D, method="jvps"),
                 lambda: lnn.GraN(D, method="double"),
                 lambda: lnn.gradient_penalty(D, x, x, method="JVP"),
                 lambda: lnn.r1_penalty(D, x, 1.0, method=None)):
        with pytest.raises(ValueError, match="method must be one of"):
            call()


def test_auto_is_double_backward_in_eager_mode():
    """Eager 'auto' keeps the double backward (faster eagerly: lipkernels bench), so its
    result supports create_graph."""
    torch.manual_seed(0)
    D = _cnn().to(F64)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    value = lnn.gradient_penalty(D, x, torch.randn_like(x))
    torch.autograd.grad(value, list(D.parameters())[:1], create_graph=True)


def test_zero_gradient_samples():
    """n_i = 0 (a sample where D is flat): v_i = 0 and t_i = 0, as the double backward's
    convention dn/dg = 0 at n = 0 (docs/math.md section 10)."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            # sample 0's output does not depend on its input
            mask = torch.ones(x.shape[0], 1, dtype=x.dtype)
            mask[0] = 0
            return self.lin(x * mask) + 0.1 * self.lin.weight.sum()
    for loss in ("gp", "r1", "gn", "gran"):
        torch.manual_seed(0)
        D = Flat().to(F64)
        x = torch.randn(3, 2, dtype=F64, requires_grad=True)
        res = []
        for method in ("double_backward", "jvp"):
            if loss == "gp":
                value = lnn.gradient_penalty(D, x, torch.zeros_like(x), alpha=torch.ones(3, dtype=F64),
                                             method=method)
            elif loss == "r1":
                value = lnn.r1_penalty(D, x, 1.0, method=method)
            elif loss == "gn":
                value = lnn.GradNorm(D, method=method)(x).sum()
            else:
                value = lnn.GraN(D, method=method)(x).sum()
            res.append(torch.autograd.grad(value, list(D.parameters()) + [x], allow_unused=True,
                                           materialize_grads=True))
        for a, b in zip(*res):
            assert torch.allclose(a, b, rtol=TOL, atol=TOL) and torch.isfinite(a).all(), loss


# ------------------------------------------------------------------ compiled steps

COMPILE_METHODS = [m for m in train_methods.METHOD_NAMES if train_methods.METHODS[m].data is None]


def _trainer_grads(method, data, compile, seed=0):
    """Gradients of one D step and one G step of the training method, from one start."""
    m = train_methods.method(method)
    torch.manual_seed(seed)
    G, D, z_dim = train_methods.build(m, data)
    trainer = train_methods.Trainer(m, G, D, z_dim, F64, compile=compile)
    shape = (6, 2) if data != "digits" else (6, 1, 16, 16)
    real = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        fake = trainer.G(trainer.z(6))
    alpha = torch.rand(6, dtype=F64)
    d_loss = trainer._d_loss(real, fake, alpha)
    d_grads = torch.autograd.grad(d_loss, list(D.parameters()), allow_unused=True,
                                  materialize_grads=True)
    D.requires_grad_(False)
    try:
        g_loss = trainer._g_loss(trainer.z(6))
        g_grads = torch.autograd.grad(g_loss, list(G.parameters()), allow_unused=True,
                                      materialize_grads=True)
    finally:
        D.requires_grad_(True)
    buffers = [b.detach().clone() for b in D.buffers()] + [b.detach().clone() for b in G.buffers()]
    return (d_loss.detach(), d_grads, []), (g_loss.detach(), g_grads, buffers)


@pytest.mark.skipif(not MAIN_RUN, reason="compiled steps: the main suite's run (they use the "
                                          "cpu backend, the interpreter compiles nothing)")
@pytest.mark.parametrize("method", COMPILE_METHODS)
@pytest.mark.parametrize("data", ["ring8", "digits"])
def test_compiled_training_steps_equal_eager(method, data):
    """torch.compile(fullgraph=True) of the D loss and the G loss of every method of
    ``lipkernels train`` (auto = JVP while compiling; GP, GN exact and first order,
    GraND / GraNC, spectral norm through SpectralNormGroup), against the eager steps
    (auto = the double backward): float64 gradients within 1e-10. ``fullgraph=True``: a
    graph break would raise."""
    if data == "digits" and method not in ("wgangp", "gngan"):
        pytest.skip("digits (an SN CNN D, a BatchNorm G): the penalty and GN only, the "
                    "networks compile slowly here (ring8 has every method)")
    torch._dynamo.reset()
    eager = _trainer_grads(method, data, False)
    compiled = _trainer_grads(method, data, True)
    for a, b, what in zip(compiled, eager, ("D step", "G step")):
        _assert_same(a, b, f"{method} {data} {what}")
