"""Gradient-normalized discriminators (docs/math.md sections 4 and 5) and the gradient
penalties that take a network (section 3).

All of them differentiate the network's input gradient ``g = d sum(f) / dx``, so their
outputs are differentiable end to end into the network's weights and, for GN/GraN, into
the generator through ``x``. Two methods (argument ``method``):

* ``'double_backward'``: ``g`` built with ``create_graph=True`` and differentiated by a
  second backward; every order of derivative; ``torch.compile`` cannot compile it.
* ``'jvp'``: reverse-over-forward (lipkernels/nn/_jvp.py, docs/math.md section 13):
  exact first derivatives from one gradient without a graph, one forward-mode JVP and
  the ordinary backward; compilable (``fullgraph=True``); ``create_graph=True`` raises.
* ``'auto'`` (default): ``'jvp'`` while ``torch.compile`` traces, else
  ``'double_backward'`` (faster in eager mode, as measured by ``lipkernels bench``).

Under ``torch.autocast`` ``f`` comes out in the autocast dtype (float16/bfloat16) while
``g``, the gradient of a float32 ``x``, is float32: GN/GraN compute in the wider dtype and
return ``f``'s (docs/math.md section 10); the penalties return float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import _func, _validate
from . import _jvp
from ._grad import input_gradient


class GradNorm(nn.Module):
    """GN-GAN: ``D(x) -> f(x) / (||grad_x f(x)|| + |f(x)|)``, in ``[-1, 1]``.

    Args:
        discriminator: any module mapping ``(B, ...)`` to ``(B,)`` or ``(B, 1)``;
            image and vector inputs alike.
        first_order: the authors' "Faster GN-GAN" generator step. Treats ``||grad f||``
            as a constant, so the input gradient is ``n / (n + |f|)^2 * grad f`` and no
            double backward is needed. Exact (almost everywhere) for piecewise-linear
            discriminators (ReLU / LeakyReLU); NOT valid for the discriminator step,
            where ``d||grad f|| / d theta != 0``. Default False (exact everywhere).
        method: ``'auto'``, ``'double_backward'`` or ``'jvp'`` (module docstring). With
            ``first_order`` no second derivative is taken by either; ``'jvp'`` then only
            computes ``g`` in a compilable way.

    The output has the shape of ``f``; 0 where ``f = 0`` and ``grad f = 0``.
    """

    def __init__(self, discriminator: nn.Module, first_order: bool = False,
                 method: str = "auto") -> None:
        super().__init__()
        self.discriminator = discriminator
        self.first_order = first_order
        _jvp.resolve("GradNorm", method)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _jvp.resolve("GradNorm", self.method) == "jvp" and not _func.transforming():
            if self.first_order:
                f, g = _jvp.scores_and_gradient(self.discriminator, x)
                return ops.gn_normalize(f, g)
            return _jvp.normalized("GradNorm", self.discriminator, x, "gn", 0.0)
        create = None if not self.first_order else False
        f, g = input_gradient(self.discriminator, x, create_graph=create)
        return ops.gn_normalize(f, g)


class GraN(nn.Module):
    """GraN-GAN: ``D(x) -> f * ||grad f|| / (||grad f||^2 + eps) / tau``.

    Returns logits for a GraN discriminator (apply ``sigmoid`` / a BCE loss) and scores
    for a GraN critic (Wasserstein or hinge loss). The Lipschitz constant is
    ``1 / tau`` (piecewise).

    Args:
        discriminator: module mapping ``(B, ...)`` to ``(B,)`` or ``(B, 1)``.
        tau: temperature > 0.
        eps: > 0; ``R(n) = n / (n^2 + eps)`` is close to ``1 / n`` for ``n >> sqrt(eps)``.
            The paper's default could not be confirmed from a primary source; 1e-4 is
            this library's choice, keep it small against typical gradient norms.
        method: ``'auto'``, ``'double_backward'`` or ``'jvp'`` (module docstring).
    """

    def __init__(self, discriminator: nn.Module, tau: float = 1.0, eps: float = 1e-4,
                 method: str = "auto") -> None:
        super().__init__()
        self.discriminator = discriminator
        self.tau = _validate.positive("GraN", "tau", tau)
        self.eps = _validate.positive("GraN", "eps", eps)
        _jvp.resolve("GraN", method)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _jvp.resolve("GraN", self.method) == "jvp" and not _func.transforming():
            return _jvp.normalized("GraN", self.discriminator, x, "gran", self.eps) / self.tau
        f, g = input_gradient(self.discriminator, x)
        return ops.gran_normalize(f, g, self.eps) / self.tau


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     weight: float = 10.0, alpha: Optional[torch.Tensor] = None,
                     center: float = 1.0, method: str = "auto") -> torch.Tensor:
    """WGAN-GP: ``weight * mean_i (||grad f(x_hat_i)|| - center)^2`` with
    ``x_hat = alpha * real + (1 - alpha) * fake``, one ``alpha ~ U[0, 1]`` per sample.

    Differentiable into the critic's weights (double backprop); ``real`` and ``fake``
    are detached (the penalty trains the critic only).

    Args:
        alpha: optional ``(B,)`` interpolation weights (drawn when None).
        method: ``'auto'``, ``'double_backward'`` or ``'jvp'`` (module docstring); the
            JVP is exact for any critic, samples that interact (BatchNorm) included.
    """
    method = _jvp.resolve("gradient_penalty", method)
    weight = _validate.finite("gradient_penalty", "weight", weight)
    for name, t in (("real", real), ("fake", fake)):
        _validate.per_sample_grad("gradient_penalty", t, name)
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real and fake must have the same shape, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    _validate.same_device("gradient_penalty", "real", real, "fake", fake)
    batch = real.shape[0]
    if alpha is None:
        alpha = torch.rand(batch, device=real.device, dtype=real.dtype)
    elif tuple(alpha.shape) != (batch,):
        raise ValueError(f"gradient_penalty: alpha must have shape ({batch},), got {tuple(alpha.shape)}")
    a = alpha.reshape((batch,) + (1,) * (real.dim() - 1))
    x_hat = a * real.detach() + (1 - a) * fake.detach()  # input_gradient differentiates it
    if method == "jvp" and not _func.transforming():
        center = _validate.fits("gradient_penalty", "center",
                                _validate.finite("gradient_penalty", "center", center),
                                real.dtype, "real")
        return _jvp.penalty("gradient_penalty", critic, x_hat, "gp", float(center), weight)
    _, g = input_gradient(critic, x_hat)
    return weight * ops.gradient_penalty(g, center)


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, gamma: float,
               method: str = "auto") -> torch.Tensor:
    """R1: ``gamma / 2 * mean_i ||grad D(real_i)||^2``, differentiable into D's weights.
    ``method``: ``'auto'``, ``'double_backward'`` or ``'jvp'`` (module docstring)."""
    method = _jvp.resolve("r1_penalty", method)
    gamma = _validate.finite("r1_penalty", "gamma", gamma)
    _validate.per_sample_grad("r1_penalty", real, "real")
    if method == "jvp" and not _func.transforming():
        return _jvp.penalty("r1_penalty", discriminator, real, "r1", 0.0, 0.5 * gamma)
    _, g = input_gradient(discriminator, real.detach())
    return 0.5 * gamma * ops.r1_penalty(g)
