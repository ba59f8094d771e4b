"""Training protocols: which data, methods (with their settings), networks, batch sizes
and budgets belong together.

=============  ============================================================================
protocol       what it is
=============  ============================================================================
small          lipkernels' own small protocol (``methods.METHODS``): the PacGAN ring and
               grid and the digits, small networks, every method of the seeds with its
               paper's image-scale settings; sized to run on two CPU cores
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


__all__ = ["Protocol", "PROTOCOLS", "protocol", "find", "toy_mlp", "TOY_METHODS"]
