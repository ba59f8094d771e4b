"""Spread and contamination of timing samples (pure functions of the samples, tested on
synthetic ones in tests/test_benchmark.py).

A shared machine disturbs a measurement in ways that leave traces in the samples:

* off CPU: during the call the process got less CPU time than a fraction of the wall
  time (no thread of ours ran for a good part of the call: preempted, or its vCPU
  stolen by the hypervisor);
* waited: the process's threads were runnable but waited for a CPU (the scheduler's
  run-queue delay, ``/proc/self/task/*/schedstat``) for a part of the call;
* on a tick: a call much shorter than a scheduler tick (1, 3.3, 4 or 10 ms) took whole
  ticks more than the implementation's fastest call (a thread that got the CPU back only
  at a later tick: the 7.9 / 15.9 / 31.9 ms timings of a 0.015 ms op);
* spread: the interquartile range of the times, or of the per-round speedups, is a
  large fraction of the median.

A call with any of the first three traces is "disturbed". A measurement is unstable when
more than ``max_disturbed`` of some implementation's calls were disturbed or a spread is
over ``max_spread``; the benchmark then measures the case again (a bounded number of
times) and marks a case that stays unstable in every output.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

#: Candidate scheduler ticks in seconds (CONFIG_HZ = 1000, 300, 250, 100).
TICKS = (0.001, 1 / 300, 0.004, 0.010)


@dataclasses.dataclass
class Thresholds:
    off_cpu: float = 0.5            # a call with process CPU time < 0.5 x wall time is off CPU
    waited: float = 0.10            # ... whose threads waited for a CPU > 10% of its wall time
    waited_floor_s: float = 50e-6   # ... and more than 50 us (a worker's wake-up is not a disturbance)
    tick_tolerance: float = 0.06    # within 6% of a tick of a whole number of ticks
    max_disturbed: float = 0.2      # more than 20% of an implementation's calls disturbed: unstable
    max_spread: float = 0.25        # interquartile range over median above 25%: unstable


DEFAULT = Thresholds()


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: Sequence[float]) -> float:
    return quantile(xs, 0.5)


def relative_iqr(xs: Sequence[float]) -> float:
    """(q3 - q1) / median: 0 for identical samples."""
    m = median(xs)
    return (quantile(xs, 0.75) - quantile(xs, 0.25)) / m if m else math.inf


def median_interval(xs: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Distribution-free confidence interval of the median: order statistics
    ``(x_(k), x_(n-k+1))`` with the largest ``k`` whose coverage ``1 - 2 P(Bin(n, 1/2) < k)``
    is at least ``level``; with too few samples for that level, ``(min, max)`` and its
    coverage. Returns ``(low, high, coverage)``."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan, math.nan, 0.0
    tail, k = 0.0, 0          # tail = P(Bin(n, 1/2) < k)
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2 ** n
        if 1 - 2 * nxt < level:
            break
        tail, k = nxt, k + 1
    k = max(k, 1)
    tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return s[k - 1], s[n - k], 1 - 2 * tail


def on_tick(t: float, fastest: float, tolerance: float = DEFAULT.tick_tolerance) -> Optional[float]:
    """The tick (seconds) such that ``t`` exceeds ``fastest`` by a whole number (>= 1) of
    ticks, within ``tolerance`` of a tick, for an implementation whose fastest call is at
    most half a tick; else None. (A call much shorter than a tick that took whole ticks
    more waited for one; longer calls are judged by the other traces.)"""
    excess = t - fastest
    for tick in TICKS:
        if fastest > tick / 2 or excess < tick * (1 - tolerance):
            continue
        frac = excess / tick - round(excess / tick)
        if abs(frac) <= tolerance:
            return tick
    return None


@dataclasses.dataclass
class Samples:
    """The calls of one implementation in one regime: wall seconds per call and, where
    measured, the process's CPU seconds and run-queue wait seconds during each call."""
    wall: List[float]
    cpu: Optional[List[float]] = None
    waited: Optional[List[float]] = None

    def summary(self) -> Dict[str, float]:
        return {"median": median(self.wall), "q1": quantile(self.wall, 0.25),
                "q3": quantile(self.wall, 0.75), "min": min(self.wall), "n": len(self.wall)}


def disturbed_calls(s: Samples, th: Thresholds = DEFAULT) -> Dict[str, List[int]]:
    """Indices of the disturbed calls, by trace: off_cpu, waited, on_tick."""
    fastest = min(s.wall)
    out: Dict[str, List[int]] = {"off_cpu": [], "waited": [], "on_tick": []}
    for i, t in enumerate(s.wall):
        if s.cpu is not None and s.cpu[i] < th.off_cpu * t:
            out["off_cpu"].append(i)
        if s.waited is not None and s.waited[i] > max(th.waited * t, th.waited_floor_s):
            out["waited"].append(i)
        if on_tick(t, fastest, th.tick_tolerance) is not None:
            out["on_tick"].append(i)
    return out


_TRACE_WORDS = {"off_cpu": "off CPU", "waited": "waited for a CPU", "on_tick": "on a scheduler tick"}


@dataclasses.dataclass
class Verdict:
    stable: bool
    reasons: List[str]
    disturbed: Dict[str, Dict[str, int]]   # "impl (regime)" -> {"calls", "disturbed", per trace counts}
    badness: float                          # for picking the least bad of several attempts

    def as_dict(self) -> dict:
        return {"stable": self.stable, "reasons": self.reasons, "disturbed": self.disturbed}


def judge(samples: Dict[str, Samples], ratios: Dict[str, List[float]],
          th: Thresholds = DEFAULT) -> Verdict:
    """Judge one measurement of a case: ``samples`` per "implementation (regime)",
    ``ratios`` the per-round speedups per implementation (interleaved regime)."""
    reasons: List[str] = []
    disturbed: Dict[str, Dict[str, int]] = {}
    badness = 0.0
    for name, s in samples.items():
        traces = disturbed_calls(s, th)
        bad = set().union(*traces.values())
        n = len(s.wall)
        disturbed[name] = {"calls": n, "disturbed": len(bad), **{k: len(v) for k, v in traces.items()}}
        frac = len(bad) / n
        spread = relative_iqr(s.wall)
        badness = max(badness, frac / th.max_disturbed, spread / th.max_spread)
        parts = []
        if frac > th.max_disturbed:
            what = ", ".join(f"{len(v)} {_TRACE_WORDS[k]}" for k, v in traces.items() if v)
            parts.append(f"{len(bad)} of {n} calls disturbed ({what})")
        if spread > th.max_spread:
            parts.append(f"time IQR {100 * spread:.0f}% of median")
        if parts:
            reasons.append(f"{name}: " + ", ".join(parts))
    for name, r in ratios.items():
        spread = relative_iqr(r)
        badness = max(badness, spread / th.max_spread)
        if spread > th.max_spread:
            reasons.append(f"{name}: speedup IQR {100 * spread:.0f}% of median")
    return Verdict(not reasons, reasons, disturbed, badness)
