"""lipkernels trains as the plain implementations do: every method of
``lipkernels.train.methods.METHODS`` (and variants with other settings), run by
lipkernels' ``Trainer`` and by its plain-PyTorch twin (``lipkernels.train.plain``, the
papers' formulas in torch alone, torch's own spectral norm) from the same seed, the same
real batches and the same random draws, gives the same losses at every step and the same
parameters, spectral-norm vectors and running statistics at the end (float64, the
default backend: the compiled CPU kernels where built)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipkernels
from lipkernels import losses
from lipkernels.nn.spectral_norm import _SpectralNorm as LipkernelsSpectralNorm
from lipkernels.train import data, methods, protocols
from lipkernels.train.methods import Method, Trainer
from lipkernels.train.plain import PlainTrainer, check_plain

from conftest import MAIN_RUN

pytestmark = [pytest.mark.skipif(not MAIN_RUN, reason="the default backend's twin: the main "
                                                      "run of the suite tests it"),
              pytest.mark.usefixtures("single_thread")]

TorchSpectralNorm = torch.nn.utils.parametrizations._SpectralNorm

DTYPE = torch.float64
# (generator steps, batch size): each generator step follows n_critic D steps. The
# digits CNN runs 6 generator steps (short, for the test command's time): 50 take about 95 s for the eight methods on two
# cores, and at batch 8 the GN-GAN dynamics amplify float64 rounding to ~1e-9 by step 20
# (a single ill-conditioned step of f / (n + |f|); measured), past the bound below;
# after 10 steps every difference was below ~1e-12.
BUDGET = {"ring8": (50, 64), "digits": (6, 8)}
# Every compared quantity is O(1) or smaller (losses, weights, unit vectors u and v,
# running means and variances of O(1) activations), so one absolute bound fits all.
# The two sides differ by float64 rounding (different kernels, summation orders and
# analytic vs autograd derivatives: ~1e-16 per op) grown over 50 steps (at most 3e-11
# measured); a wrong formula moves the numbers of step 0 or 1 by far more: ten planted
# errors in the twin (GP centre 0.999, reversed interpolation, clip at 1.01 c, GN's
# |f| x 1.001, GraN eps x 2, hinge margin 1.001, Adam's default betas, no TTUR lr_g,
# TF RMSProp's accumulator from 0, alpha drawn out of order) gave 1.5e-8 to 3e-2.
ATOL = 1e-9


def _close(a: float, b: float) -> bool:
    """Within 1e-9 of the loss's magnitude (at least 1): GraN's logits reach ~16 on
    digits with eps = 1e-8, where R(n) ~ 1 / n with n ~ 1e-3 scales rounding up too
    (measured 2e-9 absolute, 1.2e-10 relative, at step 3)."""
    return abs(a - b) <= ATOL * max(1.0, abs(a))




def _needs(data_name: str) -> None:
    if data_name == "digits":
        pytest.importorskip("sklearn", reason="the digits data need scikit-learn")


def _run(trainer, data_name: str, steps: int, batch: int, n_critic: int):
    """``steps`` generator steps from torch seed 1 on real batches of Sampler seed 0."""
    sampler = data.Sampler(data_name, 0, DTYPE)
    torch.manual_seed(1)
    out = []
    for _ in range(steps):
        reals = [sampler(batch) for _ in range(n_critic)]
        out.append((reals, trainer.step(reals)))
    return out


def _parametrizations(net: nn.Module, kind: type):
    return [f"{name}.{t}" for name, mod in net.named_modules() if hasattr(mod, "parametrizations")
            for t, plist in mod.parametrizations.items() if isinstance(plist[0], kind)]


def _max_diff(a: dict, b: dict) -> float:
    """The largest |a[k] - b[k]| over all tensors (integer counters included)."""
    return max(float((x.detach().to(DTYPE) - b[k].detach().to(DTYPE)).abs().max())
               if x.numel() else 0.0 for k, x in a.items())


def _assert_twins(m: Method, data_name: str, steps: int, batch: int, build=methods.build):
    """Run ``m`` on both sides; assert equal losses, states and samples; return the
    largest differences seen."""
    torch.manual_seed(0)
    G, D, z_dim = build(m, data_name)
    ours = Trainer(m, G, D, z_dim, DTYPE)
    twin = PlainTrainer.twin_of(ours)
    check_plain(twin.G, "twin G")
    check_plain(twin.D, "twin D")
    for net in ("G", "D"):
        # Every lipkernels spectral norm became torch's own, holding the same state.
        assert (_parametrizations(getattr(ours, net), LipkernelsSpectralNorm)
                == _parametrizations(getattr(twin, net), TorchSpectralNorm))
        assert _max_diff(getattr(ours, net).state_dict(), getattr(twin, net).state_dict()) == 0

    start = {net: {k: v.detach().clone() for k, v in getattr(ours, net).named_parameters()}
             for net in ("G", "D")}
    a = _run(ours, data_name, steps, batch, m.n_critic)
    b = _run(twin, data_name, steps, batch, m.n_critic)
    loss_diff = 0.0
    for i, ((reals_a, (d_a, g_a)), (reals_b, (d_b, g_b))) in enumerate(zip(a, b)):
        assert all(torch.equal(x, y) for x, y in zip(reals_a, reals_b))
        assert _close(d_a, d_b), f"{m.name} {data_name} step {i}: D loss {d_a!r} vs {d_b!r}"
        assert _close(g_a, g_b), f"{m.name} {data_name} step {i}: G loss {g_a!r} vs {g_b!r}"
        loss_diff = max(loss_diff, abs(d_a - d_b), abs(g_a - g_b))
    diffs = {"loss": loss_diff}
    for net in ("G", "D"):
        sa, sb = getattr(ours, net).state_dict(), getattr(twin, net).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], atol=ATOL, rtol=0,
                                       msg=lambda s, k=k: f"{m.name} {data_name} {net}.{k}: {s}")
        diffs[net] = _max_diff(sa, sb)
        # The runs trained: equality is not that of two untouched networks.
        diffs[net + " moved"] = _max_diff(start[net], dict(getattr(ours, net).named_parameters()))
        assert diffs[net + " moved"] > 1e-6, f"{m.name} {data_name}: {net} did not change"
    torch.manual_seed(2)
    s_a = ours.sample(100)
    torch.manual_seed(2)
    s_b = twin.sample(100)
    torch.testing.assert_close(s_b, s_a, atol=ATOL, rtol=0)
    print(f"\n{m.name:9s} {data_name:7s} max |diff|: losses {diffs['loss']:.1e}, "
          f"G {diffs['G']:.1e}, D {diffs['D']:.1e} (moved: G {diffs['G moved']:.1e}, "
          f"D {diffs['D moved']:.1e})")
    return diffs


@pytest.mark.parametrize("data_name", ["ring8", "digits"])
@pytest.mark.parametrize("name", methods.METHOD_NAMES)
def test_trainer_matches_its_plain_twin(name, data_name):
    _needs(data_name)
    m = methods.method(name)
    if getattr(m, "data", None) and data_name not in m.data:
        pytest.skip(f"{name} is defined for {', '.join(m.data)} only")
    steps, batch = BUDGET[data_name]
    _assert_twins(m, data_name, steps, batch)


# ------------------------------------------------------------------ other settings

def _relu_mlp(n_in: int, n_out: int, width: int = 64, depth: int = 3) -> nn.Sequential:
    dims = [n_in] + [width] * depth
    layers = [mod for a, b in zip(dims, dims[1:]) for mod in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def _toy_build(m: Method, data_name: str):
    return _relu_mlp(2, 2), _relu_mlp(2, 1), 2


VARIANTS = {
    # The WGAN-GP paper's toy protocol: lambda 0.1, Adam(1e-4, (0.5, 0.9)), ReLU MLPs.
    "wgangp-toy": (Method("wgangp-toy", "", losses.wasserstein, "adam", 1e-4, (0.5, 0.9), 5,
                          gp_weight=0.1), _toy_build),
    # GN on a spectrally normalized D, hinge loss, first-order G step.
    "gn-sn-hinge": (Method("gn-sn-hinge", "", losses.hinge, "adam", 3e-4, (0.5, 0.99), 2,
                           spectral_norm=True, wrap="gn", first_order_g=True), methods.build),
    # A GraN critic with other tau and eps, Wasserstein loss, clipping, torch's RMSprop.
    "gran-clip": (Method("gran-clip", "", losses.wasserstein, "rmsprop", 1e-4, n_critic=3,
                         clip=0.05, wrap="gran", gran_tau=0.5, gran_eps=1e-2), methods.build),
    # PacGAN's code on its networks: packing 2, simultaneous updates, BatchNorm in G.
    "pacgan2": (protocols.PROTOCOLS["pacgan"].methods["pacgan2"], protocols._pacgan_build),
    # SNGAN on PacGAN's maxout discriminator (the spectral norm of maxout's linear maps).
    "sngan-maxout": (protocols.PROTOCOLS["pacgan"].methods["sngan"], protocols._pacgan_build),
    # WGAN-GP on spectrally normalized layers with BCE (the GP's forward iterates too).
    "gp-sn-bce": (Method("gp-sn-bce", "", losses.nonsaturating, "adam", 2e-4, (0.0, 0.9), 2,
                         gp_weight=1.0, spectral_norm=True), methods.build),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_method_settings_match_too(variant):
    m, build = VARIANTS[variant]
    _assert_twins(m, "ring8", 20, 64, build)


def test_tensorflow_rmsprop_clipping_matches():
    """The toy protocol's clipping baseline with TensorFlow 1's RMSProp; a learning rate
    of 1e-3 and c = 0.05 instead of 5e-5 and 0.01, so that G moves well beyond the bound
    in 20 steps (with ms starting at 1 its first updates are lr |g|, g ~ 1e-4)."""
    m = Method("wgan-tf", "", losses.wasserstein, "rmsprop-tf", 1e-3, n_critic=5, clip=0.05)
    try:
        opt = Trainer(m, *_toy_build(m, "ring8"), DTYPE).opt_d
    except ValueError as e:
        pytest.skip(f"this lipkernels Trainer has no rmsprop-tf: {e}")
    if isinstance(opt, (torch.optim.Adam, torch.optim.RMSprop)):
        pytest.skip(f"this lipkernels Trainer has no rmsprop-tf (it made {type(opt).__name__})")
    _assert_twins(m, "ring8", 20, 64, _toy_build)


# ------------------------------------------------------------------ errors

def test_unknown_settings_raise_clear_errors():
    base = methods.method("nsgan")
    G, D, z_dim = methods.build(base, "ring8")
    custom = losses.GANLoss(lambda r, f: (f - r).mean(), lambda f: -f.mean())
    with pytest.raises(ValueError, match="has no plain formula.*nonsaturating, hinge, wasserstein"):
        PlainTrainer(Method("x", "", custom, "adam", 1e-4), G, D, z_dim)
    with pytest.raises(ValueError, match="has no plain formula"):
        PlainTrainer(Method("x", "", "softmax", "adam", 1e-4), G, D, z_dim)
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        PlainTrainer(Method("x", "", losses.hinge, "sgd", 1e-4), G, D, z_dim)
    with pytest.raises(ValueError, match="wrap must be"):
        PlainTrainer(Method("x", "", losses.hinge, "adam", 1e-4, wrap="gp"), G, D, z_dim)
    # A spectral-norm D of lipkernels is lipkernels code: only twin_of makes it plain.
    _, D_sn, _ = methods.build(methods.method("sngan"), "ring8")
    with pytest.raises(TypeError, match="runs lipkernels code"):
        PlainTrainer(methods.method("sngan"), G, D_sn, z_dim)
    ours = Trainer(methods.method("sngan"), G, D_sn, z_dim, DTYPE)
    with pytest.raises(TypeError, match="runs lipkernels code"):
        check_plain(ours.D, "D")   # SNLinear layers and the SpectralNormGroup's hooks
    check_plain(PlainTrainer.twin_of(ours).D, "D")
    assert lipkernels.nn.SpectralNormGroup.ATTRIBUTE not in vars(PlainTrainer.twin_of(ours).D)
