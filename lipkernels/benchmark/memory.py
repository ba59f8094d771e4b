"""Peak memory of one call: what its allocations add at their highest over what was
allocated before it.

On CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own count). On
the CPU, which keeps no such count: the profiler's memory events (every allocation and
free through c10's allocator, inside an op or not, compiled code included), summed in
time order. An op's allocations are counted net of its own frees, so a temporary freed
inside one op is missed: a lower bound, up to the largest such temporary.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, Optional

import torch


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler's C++ side prints a line at each
    start and stop there (torch 2.13), which would interleave with the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes above the starting level at the peak of one ``fn()`` (None if unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    except RuntimeError:  # another profiler is active
        return None
    changes = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                      if e.self_cpu_memory_usage), key=lambda c: c[0])
    level = top = 0
    for _, delta in changes:
        level += delta
        top = max(top, level)
    return int(top)
