"""Gradient-normalized discriminators (docs/math.md sections 4 and 5) and the gradient
penalties that take a network (section 3).

All of them differentiate the network's input gradient ``g = d sum(f) / dx`` (built
with ``create_graph=True``), so their outputs are differentiable end to end into the
network's weights and, for GN/GraN, into the generator through ``x``.

Under ``torch.autocast`` ``f`` comes out in the autocast dtype (float16/bfloat16) while
``g``, the gradient of a float32 ``x``, is float32: GN/GraN compute in the wider dtype and
return ``f``'s (docs/math.md section 10); the penalties return float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..ops import _func, _validate


def input_gradient(model: nn.Module, x: torch.Tensor, create_graph: Optional[bool] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f, g)`` with ``f = model(x)`` and ``g = d sum(f) / dx`` per sample.

    ``x`` keeps its graph when it has one (a generator's output), so gradients reach
    the generator; a leaf ``x`` is detached and made to require grad. With
    ``create_graph=None`` the graph of ``g`` is built whenever grad mode is on.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    grad_enabled = torch.is_grad_enabled()
    if create_graph is None:
        create_graph = grad_enabled
    if _func.transforming():
        # Under torch.func (grad, vmap, jacrev, ...): requires_grad_ and autograd.grad
        # are not allowed there; torch.func.vjp gives the same g, differentiable by the
        # enclosing transforms.
        f, vjp_fn = torch.func.vjp(model, x)
        _scores(f, x)
        (g,) = vjp_fn(torch.ones_like(f))
        return (f if grad_enabled else f.detach()), (g if create_graph else g.detach())
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        f = model(x)
        flat = _scores(f, x)
        # Keep f's graph when the caller will differentiate f (grad mode on).
        (g,) = torch.autograd.grad(flat.sum(), x, create_graph=create_graph,
                                   retain_graph=create_graph or grad_enabled)
    if not grad_enabled:
        f = f.detach()
    if not create_graph:
        g = g.detach()
    return f, g


def _scores(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f as (B,), after checking its shape against the batch of x."""
    if f.dim() == 2 and f.shape[1] == 1:
        flat = f.reshape(-1)
    elif f.dim() == 1:
        flat = f
    else:
        raise ValueError(f"the discriminator must return shape (B,) or (B, 1), got {tuple(f.shape)}")
    if flat.shape[0] != x.shape[0]:
        raise ValueError(f"the discriminator returned {flat.shape[0]} scores for a batch of {x.shape[0]}")
    return flat


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

    The output has the shape of ``f``; 0 where ``f = 0`` and ``grad f = 0``.
    """

    def __init__(self, discriminator: nn.Module, first_order: bool = False) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.first_order = first_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    """

    def __init__(self, discriminator: nn.Module, tau: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.tau = _validate.positive("GraN", "tau", tau)
        self.eps = _validate.positive("GraN", "eps", eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, g = input_gradient(self.discriminator, x)
        return ops.gran_normalize(f, g, self.eps) / self.tau


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     weight: float = 10.0, alpha: Optional[torch.Tensor] = None,
                     center: float = 1.0) -> torch.Tensor:
    """WGAN-GP: ``weight * mean_i (||grad f(x_hat_i)|| - center)^2`` with
    ``x_hat = alpha * real + (1 - alpha) * fake``, one ``alpha ~ U[0, 1]`` per sample.

    Differentiable into the critic's weights (double backprop); ``real`` and ``fake``
    are detached (the penalty trains the critic only).

    Args:
        alpha: optional ``(B,)`` interpolation weights (drawn when None).
    """
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
    _, g = input_gradient(critic, x_hat)
    return weight * ops.gradient_penalty(g, center)


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """R1: ``gamma / 2 * mean_i ||grad D(real_i)||^2``, differentiable into D's weights."""
    gamma = _validate.finite("r1_penalty", "gamma", gamma)
    _validate.per_sample_grad("r1_penalty", real, "real")
    _, g = input_gradient(discriminator, real.detach())
    return 0.5 * gamma * ops.r1_penalty(g)
