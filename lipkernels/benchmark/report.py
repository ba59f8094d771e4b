"""Provenance, tables, results files, plots, and the README's tables.

    python -m lipkernels.benchmark.report [FILE]     print a results file as markdown
    python -m lipkernels.benchmark.report --readme   put the newest CPU and GPU tables into README.md
    ... --results DIR --readme FILE                  the same from another results folder, into FILE
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional

import torch

from .._version import __version__

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "bench", "results")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device, preset: str, copy_bw: float) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import available_backends
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "preset": preset,
        "device": device_name(device),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "lipkernels": __version__,
        "git": _git_revision(),
        "backends": available_backends(),
        "copy_bandwidth_GBps": copy_bw / 1e9,
    }


def provenance_line(meta: dict) -> str:
    gpu = meta["device_type"] == "cuda"
    return (f"{meta['device']}" + (f" (CPU {meta['cpu']})" if gpu else f", {meta['cpu_count']} CPUs, "
                                   f"{meta['torch_threads']} torch threads")
            + f"; torch {meta['torch']}" + (f", CUDA {meta['torch_cuda']}" if gpu else "")
            + (f", triton {meta['triton']}" if meta.get("triton") else "")
            + f"; lipkernels {meta['lipkernels']} ({meta['git']}); preset {meta['preset']}; "
            f"{meta['date']}; copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s")


WIDTH = 120  # the terminal table's width at most


def _speedup(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 9.995 else (f"{x:.1f}" if x < 99.95 else f"{x:.0f}")


def _speedup_ci(r: dict, key: str) -> str:
    """"3.02x (2.91-3.12)": the median speedup and its confidence interval."""
    if r.get(key) is None:
        return "-"
    if r["baseline"]:
        return "baseline"
    ci = r.get(key + "_ci")
    return f"{_speedup(r[key])}x" + (f" ({_speedup(ci[0])}-{_speedup(ci[1])})" if ci else "")


def _coverage(results: dict, key: str) -> str:
    """The lowest coverage of the rows' intervals, as "95%"."""
    covs = [r[key] for r in results["results"] if r.get(key)]
    return f"{math.floor(100 * min(covs, default=0.95))}%"


def _ms(x: Optional[float], unit: bool = True) -> str:
    return "-" if x is None else f"{x:.3f}" + (" ms" if unit else "")


def _iqr(r: dict, suffix: str = "") -> str:
    """The interquartile range as a percentage of the median."""
    m, q1, q3 = (r.get(f"{k}{suffix}_ms") for k in ("median", "q1", "q3"))
    if m is None or q1 is None or q3 is None:
        return "-"
    pct = 100 * (q3 - q1) / m
    return f"{pct:.0f}%" if pct < 99.5 else ">99%"


def _cells(r: dict, unit: bool = True) -> List[str]:
    """implementation, interleaved median, IQR, speedup (CI), alone median, IQR, speedup
    (CI), % copy bw, launches, stability flag."""
    if "skipped" in r:
        return [r["impl"], "not run: " + r["skipped"][:70]]
    frac = f"{100 * r['bandwidth_fraction']:.0f}%" if r.get("bandwidth_fraction") else "-"
    return [r["impl"], _ms(r["median_ms"], unit), _iqr(r), _speedup_ci(r, "speedup"),
            _ms(r.get("median_alone_ms"), unit), _iqr(r, "_alone") if r.get("median_alone_ms") else "-",
            _speedup_ci(r, "speedup_alone"), frac, str(r["launches"]),
            "" if r.get("stable", True) else "!"]


def _groups(results: dict):
    """(case label, rows) in order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in results["results"]:
        groups.setdefault((r["kind"], r["case"], r["shape"]), []).append(r)
    return groups.items()


def _case_reasons(rows: List[dict]) -> Optional[str]:
    bad = next((r for r in rows if "skipped" not in r and not r.get("stable", True)), None)
    if bad is None:
        return None
    return (f"unstable after {bad.get('attempts', 1)} measurement(s): "
            + "; ".join(bad.get("unstable_reasons") or ["no reason recorded"]))


def _overhead_text(r: dict) -> Optional[str]:
    """"cpu: 1.31x (floor 0.018 ms + kernels 0.011 ms) alone; ... interleaved" for a row
    with a per-call overhead (benchmark._overheads), else None."""
    parts = []
    for suffix, regime in (("_alone", "alone"), ("", "interleaved")):
        o = r.get("overhead" + suffix)
        if o:
            parts.append(f"{_speedup(o['ratio'])}x the floor + kernels ({r['median' + suffix + '_ms']:.4f} ms; "
                         f"floor {o['floor_ms']:.4f} + kernels {o['kernels_ms']:.4f}) {regime}")
    return f"per-call overhead of {r['impl']}: " + "; ".join(parts) if parts else None


def _peak_text(rows: List[dict]) -> Optional[str]:
    peaks = [(r["impl"], r["peak_mib"]) for r in rows if r.get("peak_mib") is not None]
    if not peaks:
        return None
    return "peak memory: " + "; ".join(f"{name} {mib:.1f} MiB" for name, mib in peaks)


def _wrap(text: str, indent: str = "") -> List[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False) or [indent]


def table(results: dict, markdown: bool = False) -> str:
    """The results as a terminal table (at most WIDTH columns) or a Markdown table."""
    if markdown:
        return _markdown(results)
    meta = results["provenance"]
    head = ["implementation", "inter. ms", "IQR", f"speedup ({_coverage(results, 'speedup_ci_coverage')} CI)",
            "alone ms", "IQR", f"speedup ({_coverage(results, 'speedup_alone_ci_coverage')} CI)", "%bw",
            "launch", ""]
    right = {1, 2, 4, 5, 7, 8}
    measured = [_cells(r, unit=False) for r in results["results"] if "skipped" not in r]
    widths = [max([len(head[i])] + [len(c[i]) for c in measured]) for i in range(len(head))]
    # The implementation column gives way if the others need the room.
    widths[0] = max(12, min(widths[0], WIDTH - 2 - sum(widths[1:]) - 2 * (len(head) - 1)))

    def line(cells: List[str]) -> str:
        if len(cells) == 2:  # not run
            text = "  " + cells[0][:widths[0]].ljust(widths[0]) + "  " + " ".join(cells[1].split())
            return text if len(text) <= WIDTH else text[:WIDTH - 3] + "..."
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            c = c if len(c) <= w else c[:w - 1] + "~"
            out.append(c.rjust(w) if i in right else c.ljust(w))
        return ("  " + "  ".join(out)).rstrip()

    lines = _wrap(provenance_line(meta))
    for (kind, case, shape), rows in _groups(results):
        base = rows[0].get("baseline_impl") or next((r["impl"] for r in rows if r["baseline"]), "?")
        lines += ["", textwrap.shorten(f"{kind}: {case}, {shape}; baseline {base}", WIDTH),
                  line(head)]
        lines += [line(_cells(r, unit=False)) for r in rows]
        for r in rows:
            text = _overhead_text(r)
            if text:
                lines += _wrap(text, "  ")
        peaks = _peak_text(rows)
        if peaks:
            lines += _wrap(peaks, "  ")
        why = _case_reasons(rows)
        if why:
            lines += _wrap("! " + why, "  ")
    lines += [""] + _wrap(LEGEND)
    return "\n".join(lines)


def _markdown(results: dict) -> str:
    head = ["kind", "case", "shape", "implementation", "median (IQR)", "min",
            f"speedup ({_coverage(results, 'speedup_ci_coverage')} CI)", "alone: median (IQR)",
            f"alone: speedup ({_coverage(results, 'speedup_alone_ci_coverage')} CI)", "% copy bw",
            "launches", "stable"]
    out = [provenance_line(results["provenance"]), "", "| " + " | ".join(head) + " |",
           "|" + "---|" * 4 + "---:|" * 7 + ":---:|"]
    for r in results["results"]:
        if "skipped" in r:
            out.append(f"| {r['kind']} | {r['case']} | {r['shape']} | {r['impl']} | not run: "
                       f"{r['skipped'][:80]} |" + " |" * 7)
            continue
        c = _cells(r)
        alone = f"{c[4]} ({c[5]})" if r.get("median_alone_ms") else "-"
        stable = "yes" if r.get("stable", True) else "**no**"
        out.append("| " + " | ".join([r["kind"], r["case"], r["shape"],
                                      c[0] + (" (baseline)" if r["baseline"] else "")
                                      + (" (calibration)" if r.get("calibration") else ""),
                                      f"{c[1]} ({c[2]})",
                                      _ms(r.get("min_ms")), c[3], alone, c[6], c[7], c[8], stable])
                   + " |")
    reasons = []
    for (kind, case, shape), rows in _groups(results):
        why = _case_reasons(rows)
        if why:
            reasons.append(f"* {case} {shape}: {why}")
    if reasons:
        out += ["", "Unstable rows (not clean numbers: measure again on a quiet machine):", ""] + reasons
    overheads = [f"* {r['case']} {r['shape']}, {text}" for r in results["results"]
                 for text in [_overhead_text(r)] if text]
    peaks = [f"* {case} {shape}: {text}" for (kind, case, shape), rows in _groups(results)
             for text in [_peak_text(rows)] if text]
    if peaks:
        out += ["", "Peak memory of one call (what its allocations add at their highest; "
                "lipkernels/benchmark/memory.py):", ""] + peaks
    if overheads:
        out += ["", "Per-call overhead (rows marked calibration: the floor is the same op through the "
                "same dispatch and autograd with kernels that only allocate their outputs; kernels = "
                "kernel ops - empty kernel ops, each called directly; docs/math.md section 12):", ""]
        out += overheads
    return "\n".join(out)


def summary(results: dict, width: Optional[int] = WIDTH) -> str:
    """One paragraph: time taken, cases re-measured, cases still unstable (wrapped to
    ``width`` columns, or one line)."""
    meta = results["provenance"]
    groups = [(k, rows) for k, rows in _groups(results) if any("skipped" not in r for r in rows)]
    unstable = [f"{case} {shape}" for (kind, case, shape), rows in groups if _case_reasons(rows)]
    text = f"{len(groups)} cases"
    if meta.get("elapsed_s") is not None:
        text += f" in {meta['elapsed_s'] / 60:.1f} min"
    if meta.get("remeasured"):
        text += f"; {meta['remeasured']} re-measurement(s) of disturbed cases"
    if meta.get("remeasure_budget_ran_out"):
        text += " (then the run's time for re-measuring was spent)"
    if unstable:
        named = ", ".join(unstable[:4]) + (f" and {len(unstable) - 4} more" if len(unstable) > 4 else "")
        text += (f"; {len(unstable)} case(s) UNSTABLE (marked as such; not clean numbers, measure "
                 f"again on a quiet machine): {named}")
    else:
        text += "; every case stable"
    return text if width is None else "\n".join(_wrap(text))


LEGEND = ("inter. (interleaved): all implementations of a case called in turn, one call each per "
          "round (each call finds its data evicted by the others); its speedup = median over rounds "
          "of baseline time / time, with the confidence interval of that median (order statistics; "
          "the header gives the lowest coverage of any row); "
          "alone: each implementation called repeatedly by itself (data warm in cache); its "
          "speedup is the ratio of the medians, its interval from the two medians' intervals; "
          "times: medians of the calls in ms, IQR = their interquartile range over the median; "
          "%bw: bytes the cost model says must move / median (interleaved), over the copy "
          "bandwidth measured in the same run on buffers larger than the cache (above 100% when "
          "the data fits in cache); launch: CUDA kernel launches per call (GPU) or top-level "
          "operator calls (CPU); !: unstable, the case stayed disturbed (process off CPU, threads "
          "waiting for a CPU, calls stretched to scheduler ticks) or spread out (IQR over 25%) "
          "after re-measuring: not a clean number")


MARKDOWN_LEGEND = ("median (IQR), min: of the calls' times with all implementations of a case called "
                   "in turn, one call each per round (each call finds its data evicted by the others); "
                   "IQR = interquartile range over the median; speedup = median over rounds of "
                   "baseline time / time, with the confidence interval of that median (order "
                   "statistics; the header gives the lowest coverage of any row); alone: each "
                   "implementation called repeatedly by itself (data warm in cache), its speedup the "
                   "ratio of the medians with the interval the two medians' intervals give; % copy "
                   "bw: bytes the cost model says must move / median (interleaved), over the copy "
                   "bandwidth measured in the same run on buffers larger than the cache (above 100% "
                   "when the data fits in cache); launches: CUDA kernel launches per call (GPU) or "
                   "top-level operator calls (CPU); stable: no when the case stayed disturbed "
                   "(process off CPU, threads waiting for a CPU, calls stretched to scheduler ticks) "
                   "or spread out (IQR over 25%) after re-measuring: not a clean number")


def _stem(meta: dict) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    slug = re.sub("-+", "-", slug)
    return f"{slug}-{meta['date'][:10]}" + ("" if meta["preset"] == "default" else f"-{meta['preset']}")


#: Where ``lipkernels bench`` writes without ``--output``: under the current directory
#: (bench/results of a checkout when run from its root, as ``make bench`` does), never
#: into the installed package's own tree.
DEFAULT_OUTPUT = os.path.join("bench", "results")


def save(results: dict, output: Optional[str] = None, plot: bool = True) -> str:
    out_dir = os.path.abspath(output or DEFAULT_OUTPUT)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, _stem(results["provenance"]) + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if plot:
        save_plot(results, path[:-5] + ".png")
    return path


_PANELS = {
    "spectral norm": "Spectral norm of whole discriminators (power iteration; forward; forward + backward)",
    "per-sample": "Per-sample gradient norm with the GN / GraN / GP / R1 epilogue",
    "train step": "Training steps end to end (one D step and one G step)",
    "JVP step": "Steps through an input gradient: double backward vs reverse-over-forward JVP",
}
_REGIMES = {
    "": ("interleaved", "implementations called in turn: each call finds its data evicted"),
    "_alone": ("alone", "each implementation called repeatedly: its data warm in cache"),
}


def save_plot(results: dict, path: str) -> Optional[str]:
    """The speedups as a PNG (see :func:`plot_figure`); None without matplotlib."""
    try:
        fig = plot_figure(results)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path


def plot_figure(results: dict):
    """The speedups as a matplotlib figure: one row of panels per kind of case (spectral
    norm, per-sample, training steps), one column per regime (interleaved, alone); each
    group of bars is a case (its heading), each bar labelled "implementation vs baseline";
    whiskers are the speedups' confidence intervals;
    hatched bars are unstable measurements."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in results["results"]
            if "skipped" not in r and not r["baseline"] and not r.get("calibration")]
    if not rows:
        return None
    kinds = [k for k in _PANELS if any(r["kind"] == k for r in rows)]
    kinds += list(dict.fromkeys(r["kind"] for r in rows if r["kind"] not in kinds))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: matplotlib.colormaps["tab10"](i % 10) for i, impl in enumerate(impls)}
    # each kind: its cases in order, each with its bars
    layout = {}
    for kind in kinds:
        cases = list(dict.fromkeys((r["case"], r["shape"]) for r in rows if r["kind"] == kind))
        layout[kind] = [(c, [r for r in rows if r["kind"] == kind and (r["case"], r["shape"]) == c])
                        for c in cases]
    bar_h = 0.22  # inches per bar
    heights = [sum(len(bars) + 1.4 for _, bars in layout[k]) * bar_h + 1.2 for k in kinds]
    fig = Figure(figsize=(17, sum(heights) + 1.6), layout="constrained")
    grid = fig.add_gridspec(len(kinds), 2, height_ratios=heights)
    for k, kind in enumerate(kinds):
        regimes = [""] + (["_alone"] if any(r.get("speedup_alone") for _, bars in layout[kind]
                                            for r in bars) else [])
        values = [v for _, bars in layout[kind] for r in bars for key in ("speedup_ci", "speedup_alone_ci")
                  for v in (r.get(key) or [])]
        values += [r.get(key) for _, bars in layout[kind] for r in bars
                   for key in ("speedup", "speedup_alone") if r.get(key)]
        lo, hi = min(values + [1.0]) / 1.4, max(values + [1.0]) * 1.8
        ax0 = None
        for j, regime in enumerate(regimes):
            ax = fig.add_subplot(grid[k, j] if len(regimes) == 2 else grid[k, :], sharey=ax0)
            ax0 = ax0 or ax
            ticks, labels, heads, y = [], [], [], 0.0
            for (case, shape), bars in layout[kind]:
                base = bars[0].get("baseline_impl") or "the baseline"
                ticks.append(y)
                heads.append(len(labels))
                labels.append(f"{case}, {shape}")
                y += 1
                for r in bars:
                    ticks.append(y)
                    labels.append(f"{r['impl']} vs {base}")
                    sp = r.get("speedup" + regime)
                    if sp:
                        ci = r.get("speedup" + regime + "_ci") or [sp, sp]
                        unstable = not r.get("stable", True)
                        ax.barh(y, sp, height=0.8, left=0, color=colors[r["impl"]],
                                alpha=0.45 if unstable else 1.0, hatch="////" if unstable else None,
                                edgecolor="black" if unstable else colors[r["impl"]], linewidth=0.5)
                        ax.errorbar(sp, y, xerr=[[max(sp - ci[0], 0)], [max(ci[1] - sp, 0)]],
                                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
                        ax.text(max(ci[1], sp) * 1.04, y, f"{_speedup(sp)}x" + (" unstable" if unstable else ""),
                                va="center", fontsize=6.5, color="firebrick" if unstable else "black")
                    y += 1
                y += 0.4
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            decades = math.log10(hi / lo)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2.5 else
                                                  ((1.0, 3.0) if decades < 4 else (1.0,))))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(y - 0.2, -0.8)
            ax.axvline(1.0, color="black", lw=0.9)
            ax.text(1.0, -0.75, " baseline = 1x", fontsize=7, va="top")
            ax.grid(axis="x", which="both", lw=0.3, alpha=0.5)
            ax.set_yticks(ticks)
            if j == 0:
                ax.set_yticklabels(labels, fontsize=7)
                for i in heads:  # the case: a heading over its bars
                    ax.get_yticklabels()[i].set(fontweight="bold", fontsize=7.5)
                ax.tick_params(axis="y", length=0)
            else:
                ax.tick_params(labelleft=False)
            name, what = _REGIMES[regime]
            ax.set_title(f"{_PANELS.get(kind, kind)}\n{name}: {what}", fontsize=9, loc="left")
            ax.set_xlabel(f"speedup over the baseline named in the bar's label ({name}; log scale; "
                          f"whisker: {_coverage(results, 'speedup' + regime + '_ci_coverage')} "
                          "confidence interval)", fontsize=7.5)
            ax.tick_params(axis="x", labelsize=7)
            if kind in ("train step", "JVP step") and len(regimes) == 1:
                ax.text(0.99, 0.02, "(steps are timed interleaved only)", transform=ax.transAxes,
                        ha="right", va="bottom", fontsize=7, color="dimgray")
    handles = [Patch(color=colors[i], label=i) for i in impls]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="////",
                         label="hatched: unstable (disturbed or spread out after re-measuring)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8,
               title="bar: an implementation of the case named above it, against that case's baseline")
    meta = results["provenance"]
    unstable = meta.get("unstable_cases")
    title = "\n".join(textwrap.wrap(provenance_line(meta), 190))
    if unstable:
        title += f"\n{len(unstable)} unstable case(s), hatched: not clean numbers"
    fig.suptitle(title, fontsize=8)
    return fig


def newest(kind: str, results_dir: Optional[str] = None) -> Optional[str]:
    """The newest default-or-full results file of a kind ('cpu' or 'gpu')."""
    best = None
    for path in glob.glob(os.path.join(results_dir or RESULTS, "*.json")):
        with open(path) as f:
            meta = json.load(f).get("provenance")
        if meta is None:  # not a benchmark results file (e.g. the GPU cost model's)
            continue
        if ("gpu" if meta.get("device_type") == "cuda" else "cpu") != kind or meta.get("preset") == "quick":
            continue
        if best is None or meta["date"] > best[0]:
            best = (meta["date"], path)
    return best[1] if best else None


def update_readme(readme: Optional[str] = None, results_dir: Optional[str] = None) -> None:
    """Puts the newest CPU and GPU results of ``results_dir`` (default bench/results)
    between the ``<!-- bench:cpu -->`` / ``<!-- bench:gpu -->`` markers of ``readme``
    (default the repository's README.md): paths, plot, provenance, the Markdown table
    with its unstable rows marked, the legend and the run's summary."""
    readme = readme or os.path.join(REPO, "README.md")
    with open(readme) as f:
        text = f.read()
    for kind in ("cpu", "gpu"):
        path = newest(kind, results_dir)
        start, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
        if path is None or start not in text:
            continue
        with open(path) as f:
            results = json.load(f)
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(readme)))
        block = f"`{rel}`" + (f", plot `{rel[:-5]}.png`" if os.path.exists(path[:-5] + ".png") else "")
        if os.path.exists(path[:-5] + ".png"):
            block += f"\n\n![{kind} benchmark]({rel[:-5]}.png)"
        body = table(results, markdown=True) + "\n\n" + MARKDOWN_LEGEND + "\n\n" + summary(results, width=None)
        if not results["provenance"].get("all_stable", True):
            print(f"{rel}: unstable rows; the README marks them (stable: no)", file=sys.stderr)
        text = re.sub(re.escape(start) + ".*?" + re.escape(end),
                      lambda _: f"{start}\n{block}\n\n{body}\n{end}", text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipkernels.benchmark.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="a results file (default: the newest in the results folder)")
    parser.add_argument("--readme", nargs="?", const="", metavar="FILE",
                        help="put the newest tables into FILE (default README.md)")
    parser.add_argument("--results", metavar="DIR", help="the results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.readme is not None:
        update_readme(args.readme or None, args.results)
        return 0
    path = args.path or newest("gpu", args.results) or newest("cpu", args.results)
    if path is None:
        print(f"no results in {args.results or RESULTS}", file=sys.stderr)
        return 1
    with open(path) as f:
        print(table(json.load(f), markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
