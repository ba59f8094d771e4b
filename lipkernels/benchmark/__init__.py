"""``lipkernels bench``: the benchmark suite (cases in :mod:`.cases`, timing in
:mod:`.timing`, tables, results files and plots in :mod:`.report`).

    lipkernels bench [--quick | --full] [--only TEXT] [--output DIR] [--no-plot]
"""
from __future__ import annotations

import statistics
import sys
from typing import List, Optional

import torch

from . import cases as cases_mod
from . import timing


def _progress(i: int, n: int, label: str) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(preset: str = "default", only: Optional[str] = None, device: Optional[str] = None,
        log=print) -> dict:
    """Run a preset; returns the results (provenance and one row per case and
    implementation)."""
    from . import report  # imported here so that `python -m lipkernels.benchmark.report` runs cleanly

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = cases_mod.preset(preset, dev)
    copy_bw = timing.copy_bandwidth(dev, p.copy_megabytes)
    log(f"lipkernels bench --{preset} on {report.device_name(dev)}: copy bandwidth "
        f"{copy_bw / 1e9:.1f} GB/s (read + write)")
    selected = [c for c in cases_mod.all_cases(p, dev) if only is None or only in c.name or only in c.kind]
    rows: List[dict] = []
    for i, case in enumerate(selected):
        _progress(i, len(selected), case.name)
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
            log(f"  {case.name}: baseline {case.baseline} did not run ({skipped.get(case.baseline)})")
            continue
        times = timing.interleaved(fns, dev, p.rounds, p.warmup)
        # Each implementation alone too, for ops: its data stays in cache between calls
        # (the regime of a loop over one op), where interleaving evicts it.
        alone = ({name: statistics.median(timing.interleaved({name: fn}, dev, p.rounds, p.warmup)[name])
                  for name, fn in fns.items()} if case.kind != "train step" else None)
        for name, fn in fns.items():
            median = statistics.median(times[name])
            rows.append({
                "kind": case.kind, "case": case.name, "shape": case.shape, "impl": name,
                "baseline": name == case.baseline, "median_ms": median * 1e3,
                "speedup": timing.median_ratio(times[case.baseline], times[name]),
                "median_alone_ms": alone[name] * 1e3 if alone else None,
                "speedup_alone": alone[case.baseline] / alone[name] if alone else None,
                "bytes": case.bytes,
                "bandwidth_fraction": (case.bytes / median / copy_bw) if case.bytes else None,
                "launches": timing.count_launches(fn, dev),
                "rounds": p.rounds,
            })
        for name, why in skipped.items():
            rows.append({"kind": case.kind, "case": case.name, "shape": case.shape, "impl": name,
                         "baseline": False, "skipped": why})
        del fns
    _progress(len(selected), len(selected), "done")
    return {"provenance": report.provenance(dev, preset, copy_bw), "results": rows}


def main(args) -> int:
    from . import report

    preset = "quick" if args.quick else ("full" if args.full else "default")
    results = run(preset, only=args.only)
    print(report.table(results))
    if args.no_save:
        return 0
    path = report.save(results, args.output, plot=not args.no_plot)
    print(f"results: {path}")
    return 0
