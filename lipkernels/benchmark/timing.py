"""Timers, the machine's copy bandwidth, and launch counts.

All implementations of a case are timed in alternation: one call of each per round,
after warm-up rounds, so that a machine whose speed drifts (a shared VM, GPU clocks)
slows them alike; the speedup of an implementation is the median over rounds of
(baseline time / its time). On a GPU each call is timed with CUDA events.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int,
                warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of every function, rounds x alternation."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    cuda = device.type == "cuda"
    for r in range(warmup + rounds):
        if cuda:
            events = {}
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize(device)
            if r >= warmup:
                for name, (start, end) in events.items():
                    times[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                if r >= warmup:
                    times[name].append(t1 - t0)
    return times


def median_ratio(baseline: List[float], other: List[float]) -> float:
    return statistics.median(b / t for b, t in zip(baseline, other))


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting bytes read and written, for
    buffers larger than the last-level cache."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=10, warmup=2)["copy"]
    return 2 * src.numel() * src.element_size() / statistics.median(times)


@contextlib.contextmanager
def _quiet():
    """File descriptors 1 and 2 sent to /dev/null for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches of one call (CUDA runtime/driver launch calls) on a GPU; on the
    CPU, the number of operator calls at the top of the dispatcher (what a launch costs
    there: a dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet():  # the profiler's own library logs to the terminal
        with profile(activities=activities) as prof:
            fn()
            _sync(device)
    events = prof.events()
    if device.type == "cuda":
        names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
        return sum(1 for e in events if e.name in names)
    # Top-level operator calls: aten:: / lipkernels:: ops not nested in another op.
    ops = [e for e in events if "::" in e.name and not e.name.startswith("autograd::")]
    nested = set()
    for e in ops:
        for child in e.cpu_children:
            nested.add(id(child))
    return sum(1 for e in ops if id(e) not in nested)
