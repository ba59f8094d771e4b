"""Benchmark suite support: collects the median of every benchmark, prints each
implementation's speedup over its case's baseline, and writes
bench/results/<device>-<date>.json with provenance.

Run: ``make bench`` (or ``pytest bench/``). Timings are never asserted: the numbers
are a measurement of this machine, not a test.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch

import lipkernels

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_records: list = []
_registry: dict = {}  # case -> {impl: (fn, is_baseline)}

INTERLEAVED_ROUNDS = 100


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true",
                     help="smoke run: a few rounds per benchmark, no results file")


def record(case: str, impl: str, baseline: bool, benchmark) -> None:
    """Called by each benchmark test after timing; keeps the median for the summary."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    s = stats.stats
    _records.append({"case": case, "impl": impl, "baseline": baseline,
                     "median_s": s.median, "min_s": s.min, "iqr_s": s.iqr, "rounds": s.rounds})


def interleaved(case: str, rounds: int, warmup: int = 5) -> dict:
    """Every implementation of a case timed in alternation, one call each per round, so
    that a machine whose speed drifts (a shared VM) slows all of them alike. Returns
    {impl: (median seconds, median over rounds of baseline_time / impl_time)}."""
    impls = _registry[case]
    names = list(impls)
    base = next((n for n in names if impls[n][1]), None)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in names:
            t0 = time.perf_counter()
            impls[n][0]()
            t1 = time.perf_counter()
            if r >= warmup:
                times[n].append(t1 - t0)
    out = {}
    for n in names:
        ratio = (statistics.median(b / t for b, t in zip(times[base], times[n]))
                 if base is not None else None)
        out[n] = (statistics.median(times[n]), ratio)
    return out


def _rows(rounds: int):
    by_case: dict = {}
    for r in _records:
        by_case.setdefault(r["case"], []).append(r)
    rows = []
    for case, recs in by_case.items():
        base = next((r for r in recs if r["baseline"]), None)
        inter = interleaved(case, rounds)
        for r in recs:
            speedup = base["median_s"] / r["median_s"] if base else None
            t, ratio = inter[r["impl"]]
            rows.append(dict(r, speedup_sequential=speedup, baseline_impl=base["impl"] if base else None,
                             interleaved_median_s=t, speedup=ratio, interleaved_rounds=rounds))
    return rows


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def _git_revision() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": _device(),
        "cuda": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "lipkernels": lipkernels.__version__,
        "git": _git_revision(),
        "backends": lipkernels.available_backends(),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _records:
        return
    quick = config.getoption("--bench-quick")
    rows = _rows(3 if quick else INTERLEAVED_ROUNDS)
    tr = terminalreporter
    tr.section("lipkernels speedups over each case's baseline")
    tr.write_line("speedup: median over rounds of (baseline time / time), all implementations of a "
                  "case run in alternation; sequential: ratio of the pytest-benchmark medians")
    width = max(len(r["case"]) for r in rows)
    iwidth = max(len(r["impl"]) for r in rows)
    tr.write_line(f"{'case':<{width}}  {'implementation':<{iwidth}}  {'median':>12}  "
                  f"{'speedup':>8}  {'sequential':>10}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        seq = f"{r['speedup_sequential']:.2f}x" if r["speedup_sequential"] is not None else "-"
        tag = "  (baseline)" if r["baseline"] else ""
        tr.write_line(f"{r['case']:<{width}}  {r['impl']:<{iwidth}}  "
                      f"{r['interleaved_median_s'] * 1e3:9.3f} ms  {sp:>8}  {seq:>10}{tag}")
    if quick:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    meta = provenance()
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    path = os.path.join(RESULTS_DIR, f"{slug}-{meta['date'][:10]}.json")
    with open(path, "w") as f:
        json.dump({"provenance": meta, "results": rows}, f, indent=1)
    tr.write_line(f"results written to {os.path.relpath(path)}")


@pytest.fixture
def run(benchmark, request):
    """``run(case, impl, fn, baseline=False)``: time fn with pytest-benchmark and record it."""
    quick = request.config.getoption("--bench-quick")

    def _run(case, impl, fn, baseline=False):
        benchmark.group = case
        benchmark.extra_info["impl"] = impl
        if quick:
            benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
        else:
            benchmark.pedantic(fn, rounds=200, warmup_rounds=20, iterations=1)
        record(case, impl, baseline, benchmark)
        _registry.setdefault(case, {})[impl] = (fn, baseline)

    return _run
