"""Mixed precision (docs/math.md section 10): the ops are not autocast-eligible.

Each public op runs in the dtypes of its inputs, whichever backend computes it: autocast
is switched off for the duration of the op, as it would be inside a custom kernel. Without
this, the reference formulas would follow autocast's op lists (on CUDA, ``torch.mv`` runs
in float16 and ``torch.linalg.vector_norm`` returns float32), so backends would disagree.
The dtype rules are the ops' own: spectral norm in the weight's dtype, GN/GraN in the
wider of ``f``'s and ``g``'s dtypes with ``f``'s dtype returned.
"""
from __future__ import annotations

import contextlib
import functools

import torch


_any_autocast = torch._C._is_any_autocast_enabled


def autocast_off(fn):
    """Decorator: run ``fn`` with autocast disabled (CPU and CUDA); free when it is off."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _any_autocast():  # one call where two would cost 0.3 us per op
            return fn(*args, **kwargs)
        cpu = torch.is_autocast_enabled("cpu")
        cuda = torch.is_autocast_enabled("cuda")
        if not (cpu or cuda):
            return fn(*args, **kwargs)
        with (torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext()), \
                (torch.autocast("cuda", enabled=False) if cuda else contextlib.nullcontext()):
            return fn(*args, **kwargs)

    return wrapper
