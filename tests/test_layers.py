"""Layer-level tests of spectral normalization: ``lipkernels.spectral_norm``, the
``SN*`` layers and ``SpectralNormGroup``, against ``torch.nn.utils.parametrizations.
spectral_norm`` (docs/math.md section 1), the legacy ``torch.nn.utils.spectral_norm``, and
closed forms. Every test runs on the reference backend and on every compiled one.

Tolerances: unless a test says otherwise, ``assert_close`` with the dtype's tolerance
from conftest (float64 1e-10, float32 1e-5): the compiled kernels get sigma from a
single pass (``||W^T u||`` instead of ``u^T W v``) and sum in another order, so they
agree with torch to rounding, not bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lipkernels
from lipkernels.nn import (SNConv1d, SNConv2d, SNConv3d, SNConvTranspose1d, SNConvTranspose2d,
                           SNConvTranspose3d, SNEmbedding, SNLinear, SpectralNormGroup)

from conftest import backend_context, COMPILED_BACKENDS, assert_close, num_threads

# ``lipkernels.nn.spectral_norm`` is the function; the module it lives in:
sn_module = importlib.import_module("lipkernels.nn.spectral_norm")

ALL_BACKENDS = ["reference"] + COMPILED_BACKENDS


_DEFAULT_THREADS = torch.get_num_threads()


# The shapes here are tiny: one intra-op thread is as fast, and it avoids the OpenMP
# spin-waiting that makes small ops 10-100x slower on a shared, loaded machine. The
# real-shapes test goes back to the default thread count (multi-threaded kernels).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    """The reference and every compiled backend, selected for the test's duration."""
    with backend_context(request.param):
        yield request.param


def torch_sn(module, **kwargs):
    return torch.nn.utils.parametrizations.spectral_norm(module, **kwargs)


def lk_sn(module, **kwargs):
    return lipkernels.spectral_norm(module, **kwargs)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------- models

def sngan_d(sn, width: int = 4, size: int = 32, n_power_iterations: int = 1) -> nn.Sequential:
    """The SNGAN CIFAR-10 CNN discriminator of docs/math.md section 9 with channel widths
    ``width * (1, 1, 2, 2, 4, 4, 8)`` (``width=64`` is the real one) and LeakyReLU(0.1)."""
    c = width
    spec = [(3, c, 3, 1), (c, c, 4, 2), (c, 2 * c, 3, 1), (2 * c, 2 * c, 4, 2),
            (2 * c, 4 * c, 3, 1), (4 * c, 4 * c, 4, 2), (4 * c, 8 * c, 3, 1)]
    layers = []
    for cin, cout, k, s in spec:
        layers += [sn(nn.Conv2d(cin, cout, k, s, 1), n_power_iterations=n_power_iterations),
                   nn.LeakyReLU(0.1)]
    layers += [nn.Flatten(),
               sn(nn.Linear(8 * c * (size // 8) ** 2, 1), n_power_iterations=n_power_iterations)]
    return nn.Sequential(*layers)


def mixed_d(sn, n_power_iterations: int = 1) -> nn.Sequential:
    """A small model with every kind of normalized dim: Conv2d (dim 0), ConvTranspose2d
    (dim 1 by default), Linear; input (B, 3, 8, 8)."""
    return nn.Sequential(
        sn(nn.Conv2d(3, 5, 3, 2, 1), n_power_iterations=n_power_iterations), nn.LeakyReLU(0.1),
        sn(nn.ConvTranspose2d(5, 4, 4, 2, 1), n_power_iterations=n_power_iterations),
        nn.LeakyReLU(0.1),
        sn(nn.Conv2d(4, 6, 4, 2, 1), n_power_iterations=n_power_iterations), nn.LeakyReLU(0.1),
        nn.Flatten(), sn(nn.Linear(6 * 4 * 4, 1), n_power_iterations=n_power_iterations))


def sn_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if parametrize.is_parametrized(m)]


def eval_weights(model: nn.Module):
    """``module.weight`` of every normalized layer, read in eval mode (no buffer update)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        out = {name: m.weight.clone() for name, m in sn_layers(model)}
    for m, mode in modes.items():
        m.training = mode
    return out


def sn_buffers(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith("._u") or k.endswith("._v")}


def d_step(model, opt, x_real, x_fake, two_forwards: bool):
    """One discriminator step (non-saturating loss); returns the outputs."""
    opt.zero_grad()
    out_real = model(x_real)
    loss = F.softplus(-out_real).mean()
    outs = [out_real]
    if two_forwards:
        out_fake = model(x_fake)
        loss = loss + F.softplus(out_fake).mean()
        outs.append(out_fake)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return outs, grads


def compare_models(a, b, dtype, what, **tol):
    """Same state_dict values, same eval-mode normalized weights."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_close(sa[k], sb[k], dtype=dtype, what=f"{what}: {k}", **tol)
    wa, wb = eval_weights(a), eval_weights(b)
    for k in wa:
        assert_close(wa[k], wb[k], dtype=dtype, what=f"{what}: {k}.weight", **tol)


def run_parity(models, dtype, train: bool, two_forwards: bool, steps: int, x_shape,
               checks, lr: float = 0.1):
    """Train ``models`` (same starting state) side by side with SGD; after every step
    call ``checks(step, results)`` with ``results[i] = (outs, grads)`` of model i."""
    x_real = torch.randn(*x_shape, dtype=dtype)
    x_fake = torch.randn(*x_shape, dtype=dtype)
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    for m in models:
        m.train(train)
    for step in range(steps):
        results = [d_step(m, o, x_real, x_fake, two_forwards) for m, o in zip(models, opts)]
        checks(step, results)


# ----------------------------------------------------------------- 1. parity with torch

LAYERS = {
    "Linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(2, 3, 7)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, 2, 1), lambda: torch.randn(2, 3, 6, 6)),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(2, 2, 3, 3, 3)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(3, 5, 3), lambda: torch.randn(2, 3, 4)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 5, 4, 2, 1), lambda: torch.randn(2, 3, 3, 3)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), lambda: torch.randn(2, 2, 2, 2, 2)),
    "Embedding": (lambda: nn.Embedding(7, 4), lambda: torch.tensor([[0, 3, 6], [3, 1, 1]])),
}


@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "ConvTranspose2d", "Embedding",
                                  "Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose3d"])
def test_state_dict_keys_match_torch(any_backend, kind):
    make, _ = LAYERS[kind]
    ours, theirs = lk_sn(make()), torch_sn(make())
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_theirs:  # shapes too: u is (out,) with dim=1 for transposed convs
        assert sd_ours[k].shape == sd_theirs[k].shape, k
        assert sd_ours[k].dtype == sd_theirs[k].dtype, k
    assert "parametrizations.weight.0._u" in sd_ours and "parametrizations.weight.0._v" in sd_ours


@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "ConvTranspose2d", "Embedding"])
def test_state_dict_loads_both_ways(any_backend, kind):
    make, make_x = LAYERS[kind]
    x = make_x()
    torch.manual_seed(1)
    theirs = torch_sn(make())
    torch.manual_seed(2)
    ours = lk_sn(make())
    # torch -> lipkernels, strict
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ours.eval()
    theirs.eval()
    # The loaded state is the one used: same output (eval: sigma from the loaded u, v).
    assert_close(ours(x), theirs(x), what=f"{kind} output after torch -> lipkernels")
    # lipkernels -> torch, strict
    torch.manual_seed(3)
    ours2 = lk_sn(make())
    ours2.train()
    ours2(x)  # moves u, v away from their initial values
    torch.manual_seed(4)
    theirs2 = torch_sn(make())
    theirs2.load_state_dict(ours2.state_dict(), strict=True)
    for k, v in ours2.state_dict().items():
        assert torch.equal(theirs2.state_dict()[k], v), k
    ours2.eval()
    theirs2.eval()
    assert_close(theirs2(x), ours2(x), what=f"{kind} output after lipkernels -> torch")


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_single_layer_training_matches_torch(any_backend, kind, dtype, n_iter):
    make, make_x = LAYERS[kind]
    theirs = torch_sn(make(), n_power_iterations=n_iter).to(dtype)
    ours = lk_sn(make(), n_power_iterations=n_iter).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    x = make_x()
    if x.is_floating_point():
        x = x.to(dtype)
    # A bounded loss and a moderate step: the float32 rounding differences then stay at
    # their ~1e-7 relative size instead of being amplified by large, fast-growing weights.
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(4):
        outs = []
        for m, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            out = m(x)
            torch.tanh(out).sum().backward()
            opt.step()
            outs.append(out)
        assert_close(outs[0], outs[1], dtype=dtype, what=f"{kind} step {step} output")
        compare_models(ours, theirs, dtype, f"{kind} step {step}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("two_forwards", [False, True], ids=["1fwd", "2fwd"])
def test_sngan_discriminator_training_matches_torch(any_backend, dtype, n_iter, train,
                                                    two_forwards):
    theirs = sngan_d(torch_sn, n_power_iterations=n_iter).to(dtype)
    ours = sngan_d(lk_sn, n_power_iterations=n_iter).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    initial_buffers = sn_buffers(theirs)

    def checks(step, results):
        (outs_o, grads_o), (outs_t, grads_t) = results
        for i, (a, b) in enumerate(zip(outs_o, outs_t)):
            assert_close(a, b, dtype=dtype, what=f"step {step} output {i}")
        for k in grads_t:
            assert_close(grads_o[k], grads_t[k], dtype=dtype, what=f"step {step} grad {k}")
        compare_models(ours, theirs, dtype, f"step {step}")
        if not train:  # eval: the stored vectors never move
            for k, v in sn_buffers(ours).items():
                assert torch.equal(v, initial_buffers[k]), f"eval mode updated {k}"

    run_parity([ours, theirs], dtype, train, two_forwards, 4, (4, 3, 32, 32), checks)
    if train:  # the test would not see a missing update otherwise
        moved = [k for k, v in sn_buffers(ours).items() if not torch.equal(v, initial_buffers[k])]
        assert moved, "training-mode steps did not update u, v"


@pytest.mark.parametrize("grouped", [False, True], ids=["per_layer", "group"])
def test_sngan_real_shapes_forward_backward(any_backend, grouped):
    """The real SNGAN CIFAR-10 layer shapes (64x27 ... 1x8192), batch 2, float32."""
    theirs = sngan_d(torch_sn, width=64)
    ours = sngan_d(lk_sn, width=64)
    ours.load_state_dict(theirs.state_dict())
    shapes = [tuple(m.parametrizations.weight.original.flatten(1).shape) for _, m in sn_layers(ours)]
    assert shapes == [(64, 27), (64, 1024), (128, 576), (128, 2048), (256, 1152), (256, 4096),
                      (512, 2304), (1, 8192)]
    x = torch.randn(2, 3, 32, 32)
    group = SpectralNormGroup(ours) if grouped else contextlib.nullcontext()
    with group, num_threads(_DEFAULT_THREADS):
        out_o = ours(x)
        out_o.sum().backward()
    out_t = theirs(x)
    out_t.sum().backward()
    assert out_o.shape == (2, 1)
    assert_close(out_o, out_t, what="output")
    grads_t = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        assert_close(p.grad, grads_t[k].grad, what=f"grad {k}")
    for k, v in sn_buffers(theirs).items():
        assert_close(sn_buffers(ours)[k], v, what=k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "ConvTranspose2d", "Embedding"])
def test_initialisation_matches_torch(any_backend, dtype, kind):
    """Same seed -> same normals for u, v, then 15 power iterations, as torch."""
    make, _ = LAYERS[kind]
    with default_dtype(dtype):
        torch.manual_seed(123)
        theirs = torch_sn(make())
        torch.manual_seed(123)
        ours = lk_sn(make())
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert torch.equal(sd_o["parametrizations.weight.original"],
                       sd_t["parametrizations.weight.original"])
    for k in ("parametrizations.weight.0._u", "parametrizations.weight.0._v"):
        assert sd_o[k].dtype == dtype
        assert_close(sd_o[k], sd_t[k], what=k)


def test_initialisation_of_whole_model_matches_torch(any_backend):
    torch.manual_seed(7)
    theirs = sngan_d(torch_sn)
    torch.manual_seed(7)
    ours = sngan_d(lk_sn)
    compare_models(ours, theirs, torch.float32, "seeded construction")


@pytest.mark.parametrize("kind,dim", [("Linear", 1), ("Conv2d", 1), ("Conv2d", -1),
                                      ("ConvTranspose2d", 0), ("Conv3d", 2)])
def test_explicit_dim_matches_torch(any_backend, kind, dim):
    make, make_x = LAYERS[kind]
    theirs = torch_sn(make(), dim=dim, n_power_iterations=2).double()
    ours = lk_sn(make(), dim=dim, n_power_iterations=2).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_x().double()
    for _ in range(3):
        assert_close(ours(x), theirs(x), what=f"{kind} dim={dim} output")
    compare_models(ours, theirs, torch.float64, f"{kind} dim={dim}")


@pytest.mark.parametrize("kind", ["Linear", "ConvTranspose2d"])
def test_converged_weight_has_unit_spectral_norm(any_backend, kind):
    """Closed form: after many iterations the largest singular value of the normalized
    matrix is 1 (torch.linalg.matrix_norm(ord=2) by SVD)."""
    make, _ = LAYERS[kind]
    layer = lk_sn(make(), n_power_iterations=300).double()
    layer.train()
    w_sn = layer.weight.detach()
    mat = w_sn.transpose(0, 1) if kind == "ConvTranspose2d" else w_sn
    # 1e-9: 315 iterations leave the power-iteration error far below this for a random
    # matrix with a spectral gap; float64 rounding is ~1e-16.
    assert abs(torch.linalg.matrix_norm(mat.flatten(1), ord=2).item() - 1.0) < 1e-9


def test_one_dimensional_weight_matches_torch(any_backend):
    ours, theirs = lk_sn(nn.BatchNorm1d(5)), torch_sn(nn.BatchNorm1d(5))
    with torch.no_grad():
        for m in (ours, theirs):
            m.parametrizations.weight.original.copy_(torch.arange(1.0, 6.0))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    expected = torch.arange(1.0, 6.0) / torch.arange(1.0, 6.0).norm()  # closed form
    assert_close(ours.weight, expected, what="1-D weight")
    assert_close(ours.weight, theirs.weight, what="1-D weight vs torch")


def test_double_backward_matches_torch(any_backend):
    """A gradient taken with create_graph=True, then differentiated again."""
    theirs = torch_sn(nn.Linear(6, 5), n_power_iterations=2).double()
    ours = lk_sn(nn.Linear(6, 5), n_power_iterations=2).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        w = m.parametrizations.weight.original
        loss = torch.tanh(m(x)).sum()
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        g.square().sum().backward()
        results.append((g.detach(), w.grad.clone()))
    assert_close(results[0][0], results[1][0], what="first derivative")
    assert_close(results[0][1], results[1][1], what="second derivative (grad of |g|^2)")


# ----------------------------------------------------------------- 2. legacy checkpoints

LEGACY_LAYERS = {
    "Linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, 2, 1), lambda: torch.randn(2, 3, 6, 6)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 5, 4, 2, 1), lambda: torch.randn(2, 3, 3, 3)),
    "Embedding": (lambda: nn.Embedding(7, 4), lambda: torch.tensor([[0, 3, 6], [3, 1, 1]])),
}


def test_legacy_checkpoint_loads(any_backend):
    kinds = list(LEGACY_LAYERS)
    legacy = nn.ModuleList([torch.nn.utils.spectral_norm(LEGACY_LAYERS[k][0]()) for k in kinds])
    xs = [LEGACY_LAYERS[k][1]() for k in kinds]
    legacy.train()
    for layer, x in zip(legacy, xs):  # a few updates so that u, v are not the initial ones
        for _ in range(3):
            layer(x)
    sd = legacy.state_dict()
    assert "0.weight_orig" in sd and "0.weight_u" in sd and "0.weight_v" in sd
    torch.manual_seed(99)
    ours = nn.ModuleList([lk_sn(LEGACY_LAYERS[k][0]()) for k in kinds])
    ours.load_state_dict(sd, strict=True)
    # The source dict is not consumed by the key mapping.
    assert "0.weight_orig" in sd
    legacy.eval()
    ours.eval()
    for i, (kind, layer, mine, x) in enumerate(zip(kinds, legacy, ours, xs)):
        out_legacy = layer(x)  # eval: legacy sets .weight = W / (u^T W v), stored u, v
        w_orig, u, v = layer.weight_orig, layer.weight_u, layer.weight_v
        mat = w_orig.transpose(0, 1) if kind == "ConvTranspose2d" else w_orig
        closed_form = w_orig / torch.dot(u, mat.flatten(1) @ v)
        assert_close(mine.weight, layer.weight, what=f"{kind}: weight vs legacy")
        assert_close(mine.weight, closed_form, what=f"{kind}: weight vs W / (u^T W v)")
        assert_close(mine(x), out_legacy, what=f"{kind}: output vs legacy")
        assert torch.equal(mine.parametrizations.weight.original, w_orig)
        assert torch.equal(mine.parametrizations.weight[0]._u, u)
        assert torch.equal(mine.parametrizations.weight[0]._v, v)


# ----------------------------------------------------------------- 3. SN* layers

SN_CLASSES = [
    (SNLinear, nn.Linear, (6, 5), {}, lambda: torch.randn(3, 6)),
    (SNConv1d, nn.Conv1d, (3, 4, 3), {"padding": 1}, lambda: torch.randn(2, 3, 7)),
    (SNConv2d, nn.Conv2d, (3, 4, 4), {"stride": 2, "padding": 1}, lambda: torch.randn(2, 3, 8, 8)),
    (SNConv3d, nn.Conv3d, (2, 3, 2), {}, lambda: torch.randn(2, 2, 3, 4, 3)),
    (SNConvTranspose1d, nn.ConvTranspose1d, (3, 5, 3), {"stride": 2},
     lambda: torch.randn(2, 3, 4)),
    (SNConvTranspose2d, nn.ConvTranspose2d, (3, 5, 4), {"stride": 2, "padding": 1},
     lambda: torch.randn(2, 3, 3, 3)),
    (SNConvTranspose3d, nn.ConvTranspose3d, (2, 3, 2), {}, lambda: torch.randn(2, 2, 2, 3, 2)),
    (SNEmbedding, nn.Embedding, (7, 4), {}, lambda: torch.tensor([[0, 3, 6], [3, 1, 1]])),
]


@pytest.mark.parametrize("cls,base,args,kwargs,make_x", SN_CLASSES,
                         ids=[c[0].__name__ for c in SN_CLASSES])
def test_sn_layers_match_torch_layer_plus_spectral_norm(any_backend, cls, base, args, kwargs,
                                                        make_x):
    torch.manual_seed(5)
    ours = cls(*args, n_power_iterations=3, eps=1e-6, **kwargs)
    torch.manual_seed(5)
    plain = base(*args, **kwargs)
    torch.manual_seed(5)
    theirs = torch_sn(base(*args, **kwargs), n_power_iterations=3, eps=1e-6)
    torch.manual_seed(5)
    ours_fn = lk_sn(base(*args, **kwargs), n_power_iterations=3, eps=1e-6)
    assert isinstance(ours, base)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = make_x()
    for m in (ours, theirs, ours_fn):
        m.train()
    for step in range(3):
        out, out_t, out_fn = ours(x), theirs(x), ours_fn(x)
        assert out.shape == plain(x).shape  # the torch layer's output shape
        assert_close(out, out_t, what=f"{cls.__name__} step {step} vs torch")
        assert_close(out, out_fn, what=f"{cls.__name__} step {step} vs spectral_norm(layer)")
    compare_models(ours, theirs, torch.float32, cls.__name__)


def test_sn_layer_eps_is_used(any_backend):
    """eps reaches the parametrization: with a zero weight the divisor is eps
    (documented), so W_sn = 0 and dL/dW = G / eps shows which eps was used."""
    layer = SNLinear(4, 3, eps=0.5)
    with torch.no_grad():
        layer.parametrizations.weight.original.zero_()
    layer.eval()
    # u, v stay as initialised (nonzero); sigma = u^T 0 v = 0 < eps -> divisor eps.
    assert_close(layer.weight, torch.zeros(3, 4), what="zero weight, eps=0.5")
    layer.train()
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    g = layer.parametrizations.weight.original.grad
    # d/dW (W / eps) = G / eps with G = dL/dW_sn = ones(3) x^T summed over the batch.
    assert_close(g, torch.ones(3, 1) * x.sum(0) / 0.5, what="grad of zero weight, eps=0.5")


# ----------------------------------------------------------------- 4. SpectralNormGroup

MODELS = {
    "sngan": (lambda sn, n: sngan_d(sn, width=2, n_power_iterations=n), (3, 3, 32, 32)),
    "mixed": (lambda sn, n: mixed_d(sn, n_power_iterations=n), (3, 3, 8, 8)),
}


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_group_matches_per_layer(any_backend, model_kind, n_iter, train):
    make, x_shape = MODELS[model_kind]
    per_layer = make(lk_sn, n_iter).double()
    grouped = make(lk_sn, n_iter).double()
    theirs = make(torch_sn, n_iter).double()
    grouped.load_state_dict(per_layer.state_dict())
    theirs.load_state_dict(per_layer.state_dict())
    group = SpectralNormGroup(grouped)
    # 1e-12: same kernels and the same per-layer arithmetic, only batched in one call.
    tight = dict(rtol=1e-12, atol=1e-14)

    def checks(step, results):
        (outs_p, grads_p), (outs_g, grads_g), (outs_t, grads_t) = results
        for i in range(len(outs_p)):
            assert_close(outs_g[i], outs_p[i], what=f"step {step} output {i}", **tight)
            assert_close(outs_g[i], outs_t[i], what=f"step {step} output {i} vs torch")
        for k in grads_p:
            assert_close(grads_g[k], grads_p[k], what=f"step {step} grad {k}", **tight)
            assert_close(grads_g[k], grads_t[k], what=f"step {step} grad {k} vs torch")
        compare_models(grouped, per_layer, torch.float64, f"step {step}", **tight)
        compare_models(grouped, theirs, torch.float64, f"step {step} vs torch")

    initial = sn_buffers(grouped)
    run_parity([per_layer, grouped, theirs], torch.float64, train, True, 4, x_shape, checks)
    moved = any(not torch.equal(v, initial[k]) for k, v in sn_buffers(grouped).items())
    assert moved == train
    group.remove()


def test_group_with_mixed_settings_matches_per_layer(any_backend, monkeypatch):
    """Layers with different n_power_iterations / eps, one of them in eval mode: one
    call per distinct setting, with the numbers of per-layer mode."""
    def make():
        return nn.Sequential(lk_sn(nn.Linear(6, 5), n_power_iterations=1),
                             nn.LeakyReLU(0.1),
                             lk_sn(nn.Linear(5, 5), n_power_iterations=2),
                             nn.LeakyReLU(0.1),
                             lk_sn(nn.Linear(5, 4), n_power_iterations=2, eps=1e-4),
                             nn.LeakyReLU(0.1),
                             lk_sn(nn.Linear(4, 3), n_power_iterations=2),
                             nn.LeakyReLU(0.1),
                             lk_sn(nn.Linear(3, 1), n_power_iterations=2)).double()
    per_layer = make()
    grouped = make()
    grouped.load_state_dict(per_layer.state_dict())
    for model in (per_layer, grouped):
        model.train()
        model[8].eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    counter = CallCounter(monkeypatch)
    # 1e-12: same kernels and per-layer arithmetic, only batched differently.
    tight = dict(rtol=1e-12, atol=1e-14)
    with SpectralNormGroup(grouped):
        for step in range(3):
            out_p = per_layer(x)
            counter.take()
            out_g = grouped(x)
            # (train, 1 it.): layer 0; (train, 2 it.): layers 2, 6; (train, 2 it., eps
            # 1e-4): layer 4; (eval): layer 8 -- in order of first appearance.
            assert counter.take() == [1, 2, 1, 1]
            out_p.sum().backward()
            out_g.sum().backward()
            assert_close(out_g, out_p, what=f"step {step} output", **tight)
            compare_models(grouped, per_layer, torch.float64, f"step {step}", **tight)
            for (k, p), q in zip(grouped.named_parameters(), per_layer.parameters()):
                assert_close(p.grad, q.grad, what=f"step {step} grad {k}", **tight)


class CallCounter:
    """Wraps spectral_normalize_unchecked, the entry both modes go through."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = sn_module.spectral_normalize_unchecked

        def wrapper(weights, *args, **kwargs):
            self.calls.append(len(weights))
            return real(weights, *args, **kwargs)

        monkeypatch.setattr(sn_module, "spectral_normalize_unchecked", wrapper)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def test_group_batches_into_one_call_and_remove_restores(any_backend, monkeypatch):
    model = mixed_d(lk_sn)
    n_layers = len(sn_layers(model))
    x = torch.randn(2, 3, 8, 8)
    counter = CallCounter(monkeypatch)
    model(x)
    assert counter.take() == [1] * n_layers  # per-layer mode
    group = SpectralNormGroup(model)
    assert len(group.layers) == n_layers
    model(x).sum().backward()
    assert counter.take() == [n_layers]  # one call with every layer
    model.eval()
    model(x)
    assert counter.take() == [n_layers]
    group.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(x)
    assert counter.take() == [1] * n_layers
    group.remove()  # a second remove is harmless


def test_group_context_manager(any_backend, monkeypatch):
    model = sngan_d(lk_sn, width=2)
    reference = copy.deepcopy(model)
    n_layers = len(sn_layers(model))
    x = torch.randn(2, 3, 32, 32)
    counter = CallCounter(monkeypatch)
    with SpectralNormGroup(model) as group:
        assert isinstance(group, SpectralNormGroup)
        out = model(x)
        assert counter.take() == [n_layers]
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(x)
    assert counter.take() == [1] * n_layers
    out_ref = reference(x)
    counter.take()
    # float32 tolerance: batching may change the order of float32 sums only.
    assert_close(out, out_ref, what="output in the with block vs per-layer copy")


def test_group_clears_results_when_forward_raises(any_backend):
    model = mixed_d(lk_sn)
    group = SpectralNormGroup(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4, 8, 8))  # wrong channel count
    # Outside the forward the layer must compute W_sn from its current weight again,
    # not return the group's result of the failed forward.
    layer = model[0]
    layer.eval()
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(-3.0)
        w = layer.parametrizations.weight.original
        sn = layer.parametrizations.weight[0]
        expected = w / torch.dot(sn._u, w.flatten(1) @ sn._v)  # closed form, eval mode
        assert_close(layer.weight, expected, what="weight after a failed grouped forward")
    group.remove()


def test_group_rejects_bad_models(any_backend):
    with pytest.raises(ValueError):
        SpectralNormGroup(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError):  # torch's own spectral norm is not batched
        SpectralNormGroup(nn.Sequential(torch_sn(nn.Linear(3, 3))))
    with pytest.raises(TypeError):
        SpectralNormGroup(lambda x: x)
    with pytest.raises(TypeError):
        SpectralNormGroup(torch.zeros(3))


def test_group_does_not_change_state_dict(any_backend):
    model = mixed_d(lk_sn)
    twin = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    group = SpectralNormGroup(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    x = torch.randn(2, 3, 8, 8)
    model(x)
    twin(x)
    assert list(model.state_dict()) == list(twin.state_dict())
    # float32 tolerance: batching may change the order of float32 sums only.
    compare_models(model, twin, torch.float32, "state after a grouped forward")
    group.remove()
    # A grouped model's checkpoint loads into torch's spectral norm.
    theirs = mixed_d(torch_sn)
    theirs.load_state_dict(model.state_dict(), strict=True)


# ----------------------------------------------------------------- 5. bad input

@pytest.mark.parametrize("kwargs,error", [
    ({"n_power_iterations": 0}, ValueError),
    ({"n_power_iterations": -2}, ValueError),
    ({"eps": 0.0}, ValueError),
    ({"eps": -1e-3}, ValueError),
    ({"dim": 2}, IndexError),
    ({"dim": -3}, IndexError),
    ({"name": "no_such_weight"}, ValueError),
])
def test_bad_arguments(any_backend, kwargs, error):
    layer = nn.Linear(4, 3)
    with pytest.raises(error):
        lk_sn(layer, **kwargs)
    assert not parametrize.is_parametrized(layer)  # left as it was
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize("kwargs", [{"n_power_iterations": 0}, {"eps": 0.0}, {"eps": -1.0}])
def test_sn_layer_bad_arguments(any_backend, kwargs):
    with pytest.raises(ValueError):
        SNConv2d(3, 4, 3, **kwargs)


# ----------------------------------------------------------------- 6. zero weight

@pytest.mark.parametrize("zero_before_registration", [True, False], ids=["zero_init", "zeroed"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_zero_weight_gives_zero_not_nan(any_backend, zero_before_registration, train):
    layer = nn.Linear(4, 3)
    if zero_before_registration:
        with torch.no_grad():
            layer.weight.zero_()
    lk_sn(layer)
    if not zero_before_registration:
        with torch.no_grad():
            layer.parametrizations.weight.original.zero_()
    layer.train(train)
    w_sn = layer.weight
    assert torch.isfinite(w_sn).all()
    assert torch.equal(w_sn, torch.zeros(3, 4))
    x = torch.randn(2, 4)
    out = layer(x)
    assert torch.equal(out, layer.bias.detach().expand(2, 3))  # 0 @ x + b
    out.sum().backward()
    g = layer.parametrizations.weight.original.grad
    # Divisor eps where |sigma| < eps (documented), so dL/dW = G / eps with
    # G = dL/dW_sn = ones(3) x^T summed over the batch; the rank-1 term vanishes (W_sn = 0).
    assert_close(g, torch.ones(3, 1) * x.sum(0) / 1e-12, what="grad of a zero weight")
