"""The input gradient ``g = d sum(f) / dx`` of a discriminator, with its checks (used by
the double-backward and the JVP steps alike)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import _func


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
