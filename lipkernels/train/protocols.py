"""Training protocols: which data, methods (with their settings), networks, batch sizes
and budgets belong together.

=============  ============================================================================
protocol       what it is
=============  ============================================================================
small          lipkernels' own small protocol (``methods.METHODS``): the PacGAN ring and
               grid and the digits, small networks, every method of the seeds with its
               paper's image-scale settings; sized to run on two CPU cores
pacgan         the mode-collapse experiment of PacGAN (Lin et al. 2018, the ring and grid
               of VEEGAN, Srivastava et al. 2017), with the settings of PacGAN's official
               code (fjxmlzn/PacGAN, ``synthetic_data_experiments``): ``ring8`` (radius 1,
               sigma 0.01) and ``grid25`` ({-4, ..., 4}^2, sigma 0.05) as a fixed set of
               100,000 points (packs) read in a new shuffled order every epoch; G
               ``2 -> 400 x 4 -> 2`` (no biases but the output's; BatchNorm with
               epsilon 1e-4 and momentum 0.05, ReLU), D three maxout layers of 200 units
               with 5 pieces and a linear output; every weight N(0, 0.02), biases 0;
               z ~ N(0, I_2); batch 100 (packs); metrics over 2,500 samples of G in eval
               mode. ``nsgan`` is the code's GAN (packing 1): BCE on logits, Adam(1e-4,
               betas (0.8, 0.999)), D and G updated simultaneously from one batch of
               fakes; ``pacgan2`` / ``pacgan3`` / ``pacgan4`` the same with packing 2-4.
               The seed papers' methods keep their own loss, Lipschitz device,
               optimizer and critic steps (``methods.METHODS``; WGAN-GP with the WGAN-GP
               authors' 2-D lambda 0.1) on these networks and data
wgangp-toy     the WGAN-GP paper's toy experiment (Gulrajani et al. 2017, section 4 and
               Figure 1; the settings of its official script ``gan_toy.py`` of
               igul222/improved_wgan_training): ``8gaussians``, ``25gaussians``,
               ``swissroll``; 3x512 ReLU MLPs for G and D; batch 256; 5 critic
               iterations; WGAN-GP with lambda = 0.1 and Adam(1e-4, betas (0.5, 0.9)) for
               both networks; the weight-clipping baseline with RMSProp(5e-5) for both
               and c = 0.01 (TensorFlow's RMSProp: decay 0.9, epsilon 1e-10 inside the
               square root, accumulator started at 1, as the script's optimizer runs)
=============  ============================================================================

The toy networks are initialised as the script's ``tflib`` layers: each ReLU layer's
weight uniform with standard deviation ``sqrt(2 / fan_in)`` ("he"), the output layer's
with ``sqrt(2 / (fan_in + fan_out))`` ("glorot"), every bias 0.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import losses
from . import data as data_mod
from . import methods as methods_mod
from .methods import Method

Builder = Callable[[Method, str], Tuple[nn.Module, nn.Module, int]]


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    source: str
    datasets: Tuple[str, ...]
    methods: Dict[str, Method]
    batch: Dict[str, int]
    steps: Dict[str, int]        # the suite's generator steps per data set
    seeds: Tuple[int, ...]
    build: Builder
    default_method: str
    #: the committed long runs' budgets (--long), by data set or by "method:data"
    long_steps: Optional[Dict[str, int]] = None
    #: a fixed training set of this many points (packs) per run, read in a new shuffled
    #: order every pass (PacGAN's 100,000); None: fresh draws from the distribution
    data_points: Optional[int] = None
    #: G sampled in eval mode for the metrics (its BatchNorm's running statistics)
    sample_eval: bool = False
    #: the suite's budget per "method:data" where it is not ``steps[data]``
    suite_steps: Optional[Dict[str, int]] = None

    def budget(self, method: str, data: str) -> int:
        return (self.suite_steps or {}).get(f"{method}:{data}", self.steps[data])

    def long_budget(self, method: str, data: str) -> int:
        return self.long_steps.get(f"{method}:{data}", self.long_steps[data])

    def method(self, name: str) -> Method:
        try:
            return self.methods[name]
        except KeyError:
            raise ValueError(f"--method {name!r} is not part of the {self.name} protocol "
                             f"(its methods: {', '.join(self.methods)})") from None

    def check(self, method: str, data: str) -> Method:
        """The method, when it and the data set belong to this protocol and to each other."""
        m = self.method(method)
        self.check_data(data)
        if m.data is not None and data not in m.data:
            raise ValueError(f"--method {method} runs on {', '.join(m.data)} only, not "
                             f"--data {data!r}")
        return m

    def pairs(self, methods, datas):
        """The (method, data) pairs of a suite: those that belong together."""
        return [(m, d) for d in datas for m in methods
                if self.methods[m].data is None or d in self.methods[m].data]

    def check_data(self, name: str) -> str:
        if name not in self.datasets:
            raise ValueError(f"--data {name!r} is not part of the {self.name} protocol "
                             f"(its data: {', '.join(self.datasets)})")
        return name


# ------------------------------------------------------------------ WGAN-GP toy

TOY_WIDTH = 512
TOY_DEPTH = 3      # ReLU layers before the output layer


def _uniform_(w: torch.Tensor, std: float) -> None:
    """tflib's ``uniform(stdev, size)``: uniform on ``[-std sqrt 3, std sqrt 3]``."""
    with torch.no_grad():
        w.uniform_(-std * math.sqrt(3), std * math.sqrt(3))


def toy_mlp(n_in: int, n_out: int, width: int = TOY_WIDTH, depth: int = TOY_DEPTH) -> nn.Sequential:
    """``depth`` ReLU layers of ``width`` then a linear output layer, initialised as
    ``gan_toy.py``'s ``ReLULayer`` ("he") and ``Linear`` ("glorot") with zero biases."""
    layers = []
    dims = [n_in] + [width] * depth
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        _uniform_(lin.weight, math.sqrt(2.0 / a))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    out = nn.Linear(dims[-1], n_out)
    _uniform_(out.weight, math.sqrt(2.0 / (dims[-1] + n_out)))
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def _toy_build(m: Method, data: str) -> Tuple[nn.Module, nn.Module, int]:
    return toy_mlp(2, 2), toy_mlp(2, 1), 2


TOY_METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("wgangp", "WGAN-GP", losses.wasserstein, "adam", 1e-4, (0.5, 0.9), 5, gp_weight=0.1,
           source="Gulrajani et al. 2017, gan_toy.py: LAMBDA .1, CRITIC_ITERS 5, Adam(1e-4, .5, .9)"),
    Method("wgan", "WGAN (clip)", losses.wasserstein, "rmsprop-tf", 5e-5, n_critic=5, clip=0.01,
           source="gan_toy.py MODE 'wgan': RMSProp(5e-5), clip [-.01, .01], CRITIC_ITERS 5"),
]}


# ------------------------------------------------------------------ PacGAN

PAC_G_WIDTH, PAC_G_DEPTH = 400, 4
PAC_D_WIDTH, PAC_D_PIECES, PAC_D_DEPTH = 200, 5, 3
PAC_INIT_STD = 0.02


class Maxout(nn.Module):
    """A maxout layer (Goodfellow et al. 2013) as blocks' ``LinearMaxout``: a linear map
    to ``width * pieces`` units, then the maximum over each run of ``pieces`` consecutive
    units. ``linear``: the linear map (default ``nn.Linear(n_in, width * pieces)``)."""

    def __init__(self, n_in: int, width: int, pieces: int, linear: Optional[nn.Module] = None
                 ) -> None:
        super().__init__()
        self.linear = linear if linear is not None else nn.Linear(n_in, width * pieces)
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y.reshape(*y.shape[:-1], -1, self.pieces).amax(-1)


class Packed(nn.Module):
    """PacGAN's packing: ``net`` judges ``pack`` samples at once, concatenated. Input
    ``(N, d)`` with ``N`` a multiple of ``pack``; consecutive rows make a pack; output one
    score per pack, ``(N / pack, ...)``."""

    def __init__(self, net: nn.Module, pack: int) -> None:
        super().__init__()
        self.net = net
        self.pack = pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.pack:
            raise ValueError(f"Packed: the batch ({x.shape[0]}) must be a multiple of the "
                             f"packing degree {self.pack}")
        return self.net(x.reshape(x.shape[0] // self.pack, -1))


def pacgan_generator(z_dim: int = 2) -> nn.Sequential:
    """PacGAN's generator for the 2-D sets: 4 hidden layers of 400 (linear without bias,
    BatchNorm as blocks' with epsilon 1e-4, running averages with weight 0.05, ReLU),
    a linear output with bias; weights N(0, 0.02)."""
    layers = []
    dims = [z_dim] + [PAC_G_WIDTH] * PAC_G_DEPTH
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b, bias=False)
        nn.init.normal_(lin.weight, 0.0, PAC_INIT_STD)
        layers += [lin, nn.BatchNorm1d(b, eps=1e-4, momentum=0.05), nn.ReLU()]
    out = nn.Linear(dims[-1], 2)
    nn.init.normal_(out.weight, 0.0, PAC_INIT_STD)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


def pacgan_discriminator(pack: int = 1, sn: bool = False) -> nn.Module:
    """PacGAN's discriminator: three maxout layers (200 units, 5 pieces) and a linear
    output, on ``pack`` concatenated 2-D samples; weights N(0, 0.02), biases 0; with
    ``sn`` every linear map then spectrally normalized (``lipkernels.spectral_norm``,
    registered after the initialisation, so its u, v are those of these weights)."""
    from .. import spectral_norm

    def linear(a: int, b: int) -> nn.Module:
        lin = nn.Linear(a, b)
        nn.init.normal_(lin.weight, 0.0, PAC_INIT_STD)
        nn.init.zeros_(lin.bias)
        return spectral_norm(lin) if sn else lin

    dims = [2 * pack] + [PAC_D_WIDTH] * PAC_D_DEPTH
    layers = [Maxout(a, b, PAC_D_PIECES, linear(a, b * PAC_D_PIECES))
              for a, b in zip(dims[:-1], dims[1:])]
    net = nn.Sequential(*layers, linear(PAC_D_WIDTH, 1))
    return Packed(net, pack) if pack > 1 else net


def _pacgan_build(m: Method, data: str) -> Tuple[nn.Module, nn.Module, int]:
    return pacgan_generator(2), pacgan_discriminator(m.pack, m.spectral_norm), 2


_PAC_SOURCE = ("Lin et al. 2018, fjxmlzn/PacGAN synthetic_data_experiments: BCE, Adam(1e-4, "
               "beta1 0.8), simultaneous updates (ali_algorithm)")


def _pacgan_methods() -> Dict[str, Method]:
    pac = [Method("nsgan", "GAN (PacGAN's code, packing 1)", losses.nonsaturating, "adam", 1e-4,
                  (0.8, 0.999), 1, simultaneous=True, source=_PAC_SOURCE)]
    pac += [dataclasses.replace(pac[0], name=f"pacgan{k}", title=f"PacGAN{k}", pack=k)
            for k in (2, 3, 4)]
    seeds = [methods_mod.METHODS[n] for n in ("wgan", "wgangp", "sngan", "gngan", "grand", "granc")]
    seeds = [dataclasses.replace(s, gp_weight=0.1, source=s.source + "; lambda 0.1 (gan_toy.py, "
                                 "the WGAN-GP authors' 2-D setting)") if s.name == "wgangp" else s
             for s in seeds]
    return {m.name: m for m in pac + seeds}


PACGAN_METHODS: Dict[str, Method] = _pacgan_methods()
PACGAN_EPOCH = 1000   # iterations (D steps) per pass over the 100,000 packs at batch 100

# ------------------------------------------------------------------ the table

PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in [
    Protocol("small", "lipkernels' small protocol",
             "lipkernels (docs/training.md): PacGAN's ring and grid, scikit-learn's digits",
             data_mod.MIXTURES + ("digits",), methods_mod.METHODS,
             {"ring8": 128, "grid25": 128, "digits": 64},
             {"ring8": 2000, "grid25": 2000, "digits": 400}, (0, 1, 2), methods_mod.build, "gngan"),
    Protocol("wgangp-toy", "WGAN-GP toy experiment",
             "Gulrajani et al. 2017 (Improved Training of Wasserstein GANs), gan_toy.py",
             data_mod.TOY, TOY_METHODS, {d: 256 for d in data_mod.TOY},
             {d: 2000 for d in data_mod.TOY}, (0,), _toy_build, "wgangp",
             {"8gaussians": 5000, "25gaussians": 8000, "swissroll": 2000,
              "wgan:8gaussians": 2000, "wgan:25gaussians": 2000}),
    # Budgets in D steps (epochs of 1,000): the suite 5 epochs, --long 10 (the code runs
    # 400); the 5-critic-step methods make a G step of 5 D steps.
    Protocol("pacgan", "PacGAN mode-collapse experiment",
             "Lin et al. 2018 (PacGAN), fjxmlzn/PacGAN synthetic_data_experiments",
             data_mod.MIXTURES, PACGAN_METHODS, {d: 100 for d in data_mod.MIXTURES},
             {d: 5 * PACGAN_EPOCH for d in data_mod.MIXTURES}, (0,), _pacgan_build, "nsgan",
             {**{d: 10 * PACGAN_EPOCH for d in data_mod.MIXTURES},
              **{f"{m}:{d}": 10 * PACGAN_EPOCH // PACGAN_METHODS[m].n_critic
                 for m in PACGAN_METHODS if PACGAN_METHODS[m].n_critic > 1
                 for d in data_mod.MIXTURES}},
             data_points=100_000, sample_eval=True,
             suite_steps={f"{m}:{d}": 5 * PACGAN_EPOCH // PACGAN_METHODS[m].n_critic
                          for m in PACGAN_METHODS if PACGAN_METHODS[m].n_critic > 1
                          for d in data_mod.MIXTURES}),
]}


def protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}") from None


def find(method: str, data: str, name: Optional[str] = None) -> Tuple[Protocol, Method]:
    """The protocol (``name``, or the one holding ``data`` when None) and its method."""
    if name is None:
        name = next((p.name for p in PROTOCOLS.values() if data in p.datasets), "small")
    p = protocol(name)
    return p, p.check(method, data)


__all__ = ["Protocol", "PROTOCOLS", "protocol", "find", "toy_mlp", "TOY_METHODS", "Maxout",
           "Packed", "pacgan_generator", "pacgan_discriminator", "PACGAN_METHODS"]
