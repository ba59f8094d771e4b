"""GAN losses of docs/math.md section 7, as ``d(real, fake)`` and ``g(fake)`` pairs.

``real`` and ``fake`` are the discriminator's outputs on real and generated data
(any shape, typically ``(B,)`` or ``(B, 1)``); every loss is a batch mean.

>>> from lipkernels import losses
>>> d_loss = losses.hinge.d(D(x_real), D(x_fake.detach()))
>>> g_loss = losses.hinge.g(D(x_fake))
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class GANLoss(NamedTuple):
    """A discriminator loss ``d(real, fake)`` and its generator loss ``g(fake)``."""

    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``mean relu(1 - D(x_r)) + mean relu(1 + D(x_f))``"""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    """``-mean D(x_f)``"""
    return -fake.mean()


def wasserstein_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``mean D(x_f) - mean D(x_r)``"""
    return fake.mean() - real.mean()


def wasserstein_g(fake: torch.Tensor) -> torch.Tensor:
    """``-mean D(x_f)``"""
    return -fake.mean()


def nonsaturating_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """BCE on logits: ``mean softplus(-D(x_r)) + mean softplus(D(x_f))``"""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def nonsaturating_g(fake: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-D(x_f))``"""
    return F.softplus(-fake).mean()


hinge = GANLoss(hinge_d, hinge_g)
wasserstein = GANLoss(wasserstein_d, wasserstein_g)
nonsaturating = GANLoss(nonsaturating_d, nonsaturating_g)

__all__ = ["GANLoss", "hinge", "wasserstein", "nonsaturating", "hinge_d", "hinge_g",
           "wasserstein_d", "wasserstein_g", "nonsaturating_d", "nonsaturating_g"]
