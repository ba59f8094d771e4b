"""Argument checks shared by the public ops: every error names the op, the argument
and what was expected, before any kernel sees the input."""
from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

from .._layout import acc_dtype


def tensor(op: str, name: str, t, complex_ok: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if complex_ok and t.is_complex():
        return t
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor "
                        f"(float64, float32, float16 or bfloat16), got {t.dtype}")
    return t


def per_sample_grad(op: str, g, name: str = "g") -> torch.Tensor:
    """g: (B, ...) with rank >= 2 (B = 0, an empty batch, gives empty results)."""
    tensor(op, name, g)
    if g.dim() < 2:
        raise ValueError(f"{op}: {name} must have shape (B, ...) with rank >= 2 "
                         f"(one row per sample), got shape {tuple(g.shape)}")
    return g


def same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {name_a} is on {a.device} but {name_b} is on {b.device}; "
                         f"both must be on the same device")


def scores(op: str, f, g: torch.Tensor) -> torch.Tensor:
    """f: (B,) or (B, 1) matching g's batch and device (any floating dtype: the op
    computes in the wider of f's and g's). Returns f as (B,)."""
    tensor(op, "f", f)
    batch = g.shape[0]
    shape = f.shape
    if shape != (batch,) and shape != (batch, 1):
        raise ValueError(f"{op}: f must have shape (B,) or (B, 1) with B = g.shape[0] = {batch}, "
                         f"got {tuple(shape)}")
    if f.device != g.device:
        same_device(op, "f", f, "g", g)
    return f if len(shape) == 1 else f.reshape(batch)


def positive(op: str, name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {x}")
    return x


def finite(op: str, name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{op}: {name} must be finite, got {x}")
    return x


def fits(op: str, name: str, x: float, dtype: torch.dtype, what: str) -> float:
    """x (already checked finite) must stay finite, and non-zero if it is, in the dtype
    the kernels compute in for ``what`` of ``dtype`` (float64 for float64, else float32):
    every backend gives this error instead of computing with Inf or 0."""
    if acc_dtype(dtype) == torch.float64 or x == 0:
        return x
    try:
        rounded = struct.unpack("f", struct.pack("f", x))[0]  # x rounded to float32
    except OverflowError:  # older Pythons raise instead of rounding to Inf
        rounded = math.inf
    if math.isinf(rounded):
        raise ValueError(f"{op}: {name} = {x:g} overflows float32, the dtype the op computes in "
                         f"for {dtype} {what}; use |{name}| <= {torch.finfo(torch.float32).max:g}"
                         )
    if rounded == 0:
        raise ValueError(f"{op}: {name} = {x:g} underflows to 0 in float32, the dtype the op "
                         f"computes in for {dtype} {what}; use |{name}| >= "
                         f"{torch.finfo(torch.float32).smallest_normal:g}")
    return x


def non_negative_int(op: str, name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
    if x < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {x}")
    return x


def spectral_batch(op: str, weights: Sequence, us: Sequence, vs: Sequence) -> None:
    """Lists of weights (viewed as w.flatten(1), shape (m, k)), u (m,), v (k,),
    one dtype (floating point or complex) and one device for all."""
    for name, seq in (("weights", weights), ("us", us), ("vs", vs)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, got {type(seq).__name__}")
    if not (len(weights) == len(us) == len(vs)):
        raise ValueError(f"{op}: weights, us and vs must have the same length, "
                         f"got {len(weights)}, {len(us)} and {len(vs)}")
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        tensor(op, f"weights[{i}]", w, complex_ok=True)
        tensor(op, f"us[{i}]", u, complex_ok=True)
        tensor(op, f"vs[{i}]", v, complex_ok=True)
        if w.dim() < 2 or w.numel() == 0:
            raise ValueError(f"{op}: weights[{i}] must be a non-empty tensor of rank >= 2 "
                             f"(viewed as w.flatten(1)), got shape {tuple(w.shape)}")
        m = w.shape[0]
        k = w.numel() // m
        if tuple(u.shape) != (m,):
            raise ValueError(f"{op}: us[{i}] must have shape ({m},) for weights[{i}] of shape "
                             f"{tuple(w.shape)}, got {tuple(u.shape)}")
        if tuple(v.shape) != (k,):
            raise ValueError(f"{op}: vs[{i}] must have shape ({k},) for weights[{i}] of shape "
                             f"{tuple(w.shape)}, got {tuple(v.shape)}")
        for name, t in ((f"weights[{i}]", w), (f"us[{i}]", u), (f"vs[{i}]", v)):
            same_device(op, name, t, "weights[0]", weights[0])
            if t.dtype != weights[0].dtype:
                raise TypeError(f"{op}: {name} has dtype {t.dtype} but weights[0] has dtype "
                                f"{weights[0].dtype}; one call takes one dtype")
        if not (u.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"{op}: us[{i}] and vs[{i}] must be contiguous (updated in place)")
        if u.requires_grad or v.requires_grad:
            raise ValueError(f"{op}: us[{i}] and vs[{i}] are updated in place and must not "
                             f"require grad")
