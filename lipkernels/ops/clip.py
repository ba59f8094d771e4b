"""WGAN weight clipping (docs/math.md section 6): clamp many tensors to ``[-c, c]`` in one
multi-tensor call."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import torch

from .. import backends
from . import _validate


@torch.no_grad()
def clip_reference(tensors: List[torch.Tensor], c: float) -> None:
    """``torch._foreach_clamp_{min,max}_`` over the list, one call per dtype, with ``c``
    rounded to that dtype: a ``c`` beyond a dtype's range (``1e30`` for float16 tensors)
    clamps to +-Inf, i.e. leaves the tensor as it is (torch's clamp would raise), as the
    kernels do."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        bound = float(torch.tensor(c, dtype=torch.float64).to(dtype))
        torch._foreach_clamp_min_(group, -bound)
        torch._foreach_clamp_max_(group, bound)


@torch.no_grad()
def clip_(tensors: Iterable[torch.Tensor], c: float) -> None:
    """Clamp every tensor to ``[-c, c]`` in place.

    Contiguous tensors go to the selected backend's multi-tensor kernel (one call per
    device); others, and every tensor of a backend without one (reference, triton),
    through one ``torch._foreach`` call.
    """
    c = _validate.positive("clip_", "c", c)
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        _validate.tensor("clip_", f"tensors[{i}]", t)
    fast: Dict[torch.device, List[torch.Tensor]] = {}
    kernels: Dict[torch.device, Callable] = {}
    rest: List[torch.Tensor] = []
    for t in tensors:
        kernel = getattr(backends.implementation(t.device), "clip_", None)
        if kernel is not None and t.is_contiguous():
            fast.setdefault(t.device, []).append(t)
            kernels[t.device] = kernel
        else:
            rest.append(t)
    for device, group in fast.items():
        kernels[device](group, c)
    clip_reference(rest, c)
