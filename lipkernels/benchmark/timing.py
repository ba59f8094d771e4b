"""Timers, the machine's copy bandwidth, and launch counts.

All implementations of a case are timed in alternation: one call of each per round,
after warm-up rounds, so that a machine whose speed drifts (a shared VM, GPU clocks)
slows them alike; the speedup of an implementation is the median over rounds of
(baseline time / its time). On a GPU each call is timed with CUDA events. On the CPU
each call also records the process's CPU time and the time its threads waited for a
CPU (see :mod:`.noise`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from .noise import Samples, median


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunQueueWait:
    """Seconds the threads of this process have spent runnable but waiting for a CPU:
    the sum of ``run_delay`` over ``/proc/self/task/*/schedstat`` (threads that exist
    when it is made). ``available`` is False where the kernel does not report it."""

    def __init__(self):
        self._fds: List[int] = []
        try:
            for tid in os.listdir("/proc/self/task"):
                self._fds.append(os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY))
            self.available = bool(self._fds) and self() >= 0
        except (OSError, ValueError, IndexError):
            self.close()
            self.available = False

    def __call__(self) -> float:
        total = 0
        for fd in self._fds:
            try:
                total += int(os.pread(fd, 64, 0).split()[1])
            except (OSError, ValueError, IndexError):  # the thread has exited
                pass
        return total * 1e-9

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int,
                warmup: int, budget_s: Optional[float] = None,
                min_rounds: Optional[int] = None) -> Dict[str, Samples]:
    """Every function called once per round, ``warmup`` rounds and then up to ``rounds``
    timed rounds; with ``budget_s``, the timed rounds stop once they have taken that many
    seconds and there are at least ``min_rounds``. The samples: wall seconds per call
    and, on the CPU, the process's CPU seconds and run-queue wait during it."""
    if device.type == "cuda":
        times = _interleaved_cuda(fns, device, rounds, warmup, budget_s, min_rounds)
        return {name: Samples(wall) for name, wall in times.items()}
    wall: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, List[float]] = {name: [] for name in fns}
    waited: Dict[str, List[float]] = {name: [] for name in fns}
    perf, process = time.perf_counter, time.process_time
    deadline = _Deadline(budget_s, min_rounds)
    with RunQueueWait() as wait:
        w = wait() if wait.available else 0.0
        for r in range(warmup + rounds):
            if r == warmup:
                deadline.start()
            elif r > warmup and deadline.passed(r - warmup):
                break
            for name, fn in fns.items():
                c0 = process()
                t0 = perf()
                fn()
                t1 = perf()
                c1 = process()
                w1 = wait() if wait.available else 0.0
                if r >= warmup:
                    wall[name].append(t1 - t0)
                    cpu[name].append(c1 - c0)
                    waited[name].append(w1 - w)
                w = w1
        return {name: Samples(wall[name], cpu[name], waited[name] if wait.available else None)
                for name in fns}


class _Deadline:
    def __init__(self, budget_s: Optional[float], min_rounds: Optional[int]):
        self.budget_s, self.min_rounds, self.t0 = budget_s, min_rounds or 1, 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def passed(self, done: int) -> bool:
        return (self.budget_s is not None and done >= self.min_rounds
                and time.perf_counter() - self.t0 >= self.budget_s)


def _interleaved_cuda(fns, device, rounds, warmup, budget_s, min_rounds) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {name: [] for name in fns}
    deadline = _Deadline(budget_s, min_rounds)
    for r in range(warmup + rounds):
        if r == warmup:
            deadline.start()
        elif r > warmup and deadline.passed(r - warmup):
            break
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
    return times


def median_ratio(baseline: List[float], other: List[float]) -> float:
    return median(ratios(baseline, other))


def ratios(baseline: List[float], other: List[float]) -> List[float]:
    """Per-round speedups: baseline time / time."""
    return [b / t for b, t in zip(baseline, other)]


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting bytes read and written, for
    buffers larger than the last-level cache."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=10, warmup=2)["copy"].wall
    return 2 * src.numel() * src.element_size() / median(times)


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
