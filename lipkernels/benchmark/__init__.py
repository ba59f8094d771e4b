"""``lipkernels bench``: the benchmark suite (cases in :mod:`.cases`, timing in
:mod:`.timing`, spread and contamination in :mod:`.noise`, tables, results files and
plots in :mod:`.report`).

    lipkernels bench [--quick | --full] [--only TEXT] [--output DIR] [--no-plot] [--no-save]
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from . import cases as cases_mod
from . import memory, noise, timing

#: Level of the speedups' confidence intervals.
LEVEL = 0.95


def _progress(total: int, enabled: Optional[bool]):
    """A tqdm bar over the cases on stderr: the case being measured, cases done / total,
    elapsed and ETA. ``enabled=None``: only when stderr is a terminal."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience: without tqdm, no bar
        return None
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    return tqdm(total=total, unit="case", file=sys.stderr, smoothing=0, dynamic_ncols=True,
                bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} cases [{elapsed}<{remaining}]")


def _stats(s: noise.Samples, suffix: str = "") -> dict:
    return {f"median{suffix}_ms": noise.median(s.wall) * 1e3,
            f"q1{suffix}_ms": noise.quantile(s.wall, 0.25) * 1e3,
            f"q3{suffix}_ms": noise.quantile(s.wall, 0.75) * 1e3,
            f"min{suffix}_ms": min(s.wall) * 1e3,
            f"rounds{suffix}": len(s.wall)}


def _measure(case: cases_mod.Case, fns: Dict[str, Callable], dev: torch.device,
             p: cases_mod.Preset, status: Callable[[str], None]):
    """One measurement of a case: interleaved samples, alone samples (ops only), and the
    verdict on them."""
    status("interleaved")
    inter = timing.interleaved(fns, dev, p.max_rounds, p.warmup, p.budget_s, p.min_rounds)
    alone: Dict[str, noise.Samples] = {}
    if case.kind not in ("train step", "JVP step"):
        # Each implementation alone too: its data stays in cache between calls (the
        # regime of a loop over one op), where interleaving evicts it.
        for name, fn in fns.items():
            status(f"alone: {name}")
            alone[name] = timing.interleaved({name: fn}, dev, p.max_rounds, p.warmup,
                                             p.budget_s / len(fns), p.min_rounds)[name]
    samples = {f"{name} (interleaved)": s for name, s in inter.items()}
    samples.update({f"{name} (alone)": s for name, s in alone.items()})
    ratios = {name: timing.ratios(inter[case.baseline].wall, inter[name].wall)
              for name in fns if name != case.baseline}
    return inter, alone, noise.judge(samples, ratios)


def _rows(case, fns, inter, alone, verdict, attempts, launches, copy_bw) -> List[dict]:
    rows = []
    base = inter[case.baseline].wall
    for name in fns:
        s = inter[name]
        r = timing.ratios(base, s.wall)
        lo, hi, cover = noise.median_interval(r, LEVEL)
        row = {"kind": case.kind, "case": case.name, "shape": case.shape, "impl": name,
               "baseline": name == case.baseline, "baseline_impl": case.baseline}
        row.update(_stats(s))
        row.update({"speedup": noise.median(r), "speedup_ci": [lo, hi], "speedup_ci_coverage": cover,
                    "speedup_iqr": [noise.quantile(r, 0.25), noise.quantile(r, 0.75)]})
        if alone:
            row.update(_stats(alone[name], "_alone"))
            # Independent runs: the ratio of the medians, and the interval from the two
            # medians' intervals (coverage at least the product of theirs).
            b_lo, b_hi, b_cov = noise.median_interval(alone[case.baseline].wall, LEVEL)
            i_lo, i_hi, i_cov = noise.median_interval(alone[name].wall, LEVEL)
            row.update({"speedup_alone": noise.median(alone[case.baseline].wall) / noise.median(alone[name].wall),
                        "speedup_alone_ci": [b_lo / i_hi, b_hi / i_lo],
                        "speedup_alone_ci_coverage": b_cov * i_cov})
        else:
            row.update({"median_alone_ms": None, "speedup_alone": None})
        median_s = row["median_ms"] / 1e3
        row.update({"bytes": case.bytes,
                    "bandwidth_fraction": (case.bytes / median_s / copy_bw) if case.bytes else None,
                    "launches": launches[name], "attempts": attempts,
                    "stable": verdict.stable, "unstable_reasons": verdict.reasons,
                    "disturbed_calls": {k: v for k, v in verdict.disturbed.items()
                                        if k.startswith(name + " (")}})
        rows.append(row)
    _overheads(case, rows)
    return rows


def _overheads(case, rows: List[dict]) -> None:
    """Marks the calibration rows (no speedup of their own) and gives each calibrated
    backend's row its per-call overhead: op / (floor + kernels), with kernels = kernel
    ops - empty kernel ops, from the medians of each regime (cases.CALIBRATION)."""
    by_impl = {r["impl"]: r for r in rows}
    for backend, names in case.calibrates.items():
        for name in names:
            if name in by_impl:
                by_impl[name].update({"calibration": True, "speedup": None, "speedup_ci": None,
                                      "speedup_alone": None, "speedup_alone_ci": None,
                                      "bandwidth_fraction": None})
        row = by_impl.get(backend)
        if row is None or not all(n in by_impl for n in names):
            continue
        floor, kernels, empty = (by_impl[n] for n in names)
        for suffix in ("", "_alone"):
            key = f"median{suffix}_ms"
            if row.get(key) is None:
                continue
            k_ms = max(kernels[key] - empty[key], 0.0)
            row[f"overhead{suffix}"] = {"floor_ms": floor[key], "kernels_ms": k_ms,
                                        "ratio": row[key] / (floor[key] + k_ms)}


class _Spent:
    """Seconds spent measuring, first measurements and re-measurements apart: the run
    re-measures while re-measuring has taken less than ``share`` of the first
    measurements' time plus 30 s, so that a busy machine lengthens a run by about
    ``share`` at most."""

    def __init__(self, share: float):
        self.share, self.first_s, self.again_s, self.remeasured, self.ran_out = share, 0.0, 0.0, 0, False

    def may_remeasure(self) -> bool:
        ok = self.again_s < self.share * self.first_s + 30.0
        self.ran_out |= not ok
        return ok


def _until_stable(case, fns, dev, p: cases_mod.Preset, status, say, spent: _Spent):
    """Measures a case up to ``p.attempts`` times, until a measurement is stable (and
    while the run's re-measuring allowance lasts); returns the best measurement (the
    stable one, else the least disturbed) and the number of measurements made."""
    best = None
    label = f"{case.name} {case.shape}"
    attempt = 0
    while attempt < p.attempts:
        attempt += 1
        if attempt > 1:
            if not spent.may_remeasure():
                best[2].reasons.append("not measured again: the run's time for re-measuring is spent")
                attempt -= 1
                break
            spent.remeasured += 1
            say(f"  {label}: unstable ({best[2].reasons[0][:90]}...), measuring again "
                f"({attempt}/{p.attempts})")
            time.sleep(0.5)  # a burst of load on the machine may pass
        t0 = time.perf_counter()
        n = attempt
        inter, alone, verdict = _measure(case, fns, dev, p,
                                         lambda w: status(w if n == 1 else f"#{n} {w}"))
        if attempt == 1:
            spent.first_s += time.perf_counter() - t0
        else:
            spent.again_s += time.perf_counter() - t0
        if best is None or verdict.badness < best[2].badness:
            best = (inter, alone, verdict)
        if verdict.stable:
            break
    inter, alone, verdict = best
    if not verdict.stable:
        say(f"  {label}: UNSTABLE after {attempt} measurement(s), marked as such")
    return inter, alone, verdict, attempt


def run(preset: str = "default", only: Optional[str] = None, device: Optional[str] = None,
        log=print, progress: Optional[bool] = None) -> dict:
    """Run a preset; returns the results (provenance and one row per case and
    implementation). ``progress``: show the progress bar (None: when stderr is a terminal)."""
    from . import report  # imported here so that `python -m lipkernels.benchmark.report` runs cleanly

    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = cases_mod.preset(preset, dev)
    copy_bw = timing.copy_bandwidth(dev, p.copy_megabytes)
    log(f"lipkernels bench --{preset} on {report.device_name(dev)}: copy bandwidth "
        f"{copy_bw / 1e9:.1f} GB/s (read + write)")
    selected = [c for c in cases_mod.all_cases(p, dev) if only is None or only in c.name or only in c.kind]
    bar = _progress(len(selected), progress)
    # notes above the bar, on stderr (stdout has the table); quiet off a terminal
    say = (lambda msg: bar.write(msg[:200], file=sys.stderr)) if bar is not None else (lambda *_: None)
    rows: List[dict] = []
    spent = _Spent(p.remeasure_share)
    for case in selected:
        label = f"{case.name} {case.shape}"
        case_started = time.perf_counter()

        def status(what: str, label=label) -> None:
            if bar is not None:
                bar.set_description_str(f"{label[:48]} | {what[:28]}", refresh=True)

        status("setting up")
        fns, skipped = {}, {}
        for name, factory in case.impls.items():
            try:
                fn = factory()
                fn()  # first call: compiles, builds plans, checks that it runs
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            fns[name] = fn
        if case.baseline not in fns:
            say(f"  {case.name}: baseline {case.baseline} did not run ({skipped.get(case.baseline)})")
            if bar is not None:
                bar.update(1)
            continue
        inter, alone, verdict, attempt = _until_stable(case, fns, dev, p, status, say, spent)
        status("counting launches")
        launches = {name: timing.count_launches(fn, dev) for name, fn in fns.items()}
        new = _rows(case, fns, inter, alone, verdict, attempt, launches, copy_bw)
        if case.memory:
            status("peak memory")
            for r in new:
                peak = memory.peak_bytes(fns[r["impl"]], dev)
                r["peak_mib"] = None if peak is None else peak / 2 ** 20
        for r in new:
            r["case_seconds"] = time.perf_counter() - case_started
        rows += new
        for name, why in skipped.items():
            rows.append({"kind": case.kind, "case": case.name, "shape": case.shape, "impl": name,
                         "baseline": False, "baseline_impl": case.baseline, "skipped": why})
        del fns
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.set_description_str("done")
        bar.close()
    meta = report.provenance(dev, preset, copy_bw)
    unstable = list(dict.fromkeys(f"{r['case']} {r['shape']}" for r in rows
                                  if "skipped" not in r and not r["stable"]))
    meta.update({"elapsed_s": time.perf_counter() - started, "remeasured": spent.remeasured,
                 "remeasure_seconds": spent.again_s, "remeasure_budget_ran_out": spent.ran_out,
                 "unstable_cases": unstable, "all_stable": not unstable,
                 "load_average_before": load_before,
                 "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
                 "thresholds": vars(noise.DEFAULT), "attempts_max": p.attempts,
                 "budget_s": p.budget_s, "rounds_bounds": [p.min_rounds, p.max_rounds],
                 "ci_level": LEVEL})
    return {"provenance": meta, "results": rows}


def main(args) -> int:
    from . import report

    preset = "quick" if args.quick else ("full" if args.full else ("short" if getattr(args, "short", False)
                                                                    else "default"))
    results = run(preset, only=args.only)
    print(report.table(results))
    print(report.summary(results))
    if args.no_save:
        return 0
    path = report.save(results, args.output, plot=not args.no_plot)
    print(f"results: {path}" + ("" if args.no_plot else f" and {path[:-5]}.png"))
    return 0
