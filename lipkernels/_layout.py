"""Dtype and memory-layout rules every backend follows (the C++ side states the same
in csrc/binding_utils.h), so outputs agree across backends and with the fake kernels."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def non_overlapping_and_dense(t: torch.Tensor) -> bool:
    dims = sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def has_sample_blocks(g: torch.Tensor) -> bool:
    """Every sample of g is one dense block of numel/B elements in memory (contiguous,
    channels-last, any dense permutation keeping the batch outermost)."""
    batch = g.shape[0]
    return g.is_contiguous() or (non_overlapping_and_dense(g)
                                 and (batch == 1 or g.stride(0) * batch == g.numel()))


def as_sample_blocks(g: torch.Tensor) -> torch.Tensor:
    return g if has_sample_blocks(g) else g.contiguous()


def empty_like_sample_blocks(g: torch.Tensor) -> torch.Tensor:
    """An output for a kernel that walks g sample by sample in memory order: g's
    strides when g has sample blocks, else contiguous."""
    if has_sample_blocks(g):
        return torch.empty_like(g)
    return torch.empty_like(g, memory_format=torch.contiguous_format)


def matching_sample_blocks(a: torch.Tensor, b: torch.Tensor):
    """Two tensors walked element by element in the same memory order."""
    if has_sample_blocks(a) and has_sample_blocks(b) and a.stride() == b.stride():
        return a, b
    return a.contiguous(), b.contiguous()


def epilogue_out_dtype(epilogue: str, dtype: torch.dtype) -> torch.dtype:
    """Per-sample outputs have g's dtype; the penalties' are in the accumulation dtype."""
    return acc_dtype(dtype) if epilogue in ("gp", "r1") else dtype
