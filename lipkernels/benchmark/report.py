"""Provenance, tables, results files, plots, and the README's tables.

    python -m lipkernels.benchmark.report [FILE]     print a results file as markdown
    python -m lipkernels.benchmark.report --readme   put the newest CPU and GPU tables into README.md
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys
from typing import Optional

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


def table(results: dict, markdown: bool = False) -> str:
    meta = results["provenance"]
    head = ["kind", "case", "shape", "implementation", "median", "speedup", "alone", "speedup alone",
            "% copy bw", "launches"]
    rows = []
    for r in results["results"]:
        if "skipped" in r:
            rows.append([r["kind"], r["case"], r["shape"], r["impl"], "-", "-", "-", "-", "-",
                         "not run: " + r["skipped"][:60]])
            continue
        frac = f"{100 * r['bandwidth_fraction']:.0f}%" if r.get("bandwidth_fraction") else "-"
        alone = f"{r['median_alone_ms']:.3f} ms" if r.get("median_alone_ms") else "-"
        sp_alone = f"{r['speedup_alone']:.2f}x" if r.get("speedup_alone") else "-"
        rows.append([r["kind"], r["case"], r["shape"], r["impl"] + (" (baseline)" if r["baseline"] else ""),
                     f"{r['median_ms']:.3f} ms", f"{r['speedup']:.2f}x", alone, sp_alone, frac,
                     str(r["launches"])])
    if markdown:
        out = [provenance_line(meta), "", "| " + " | ".join(head) + " |",
               "|" + "---|" * 3 + "---|" + "---:|" * 6]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    lines = [provenance_line(meta), "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append(LEGEND)
    return "\n".join(lines)


LEGEND = ("median, speedup: all implementations of a case called in alternation (each call finds "
          "its data evicted by the others), speedup = median over rounds of baseline time / time; "
          "alone, speedup alone: each implementation called repeatedly by itself (data warm in "
          "cache); % copy bw: bytes the cost model says must move / median (interleaved), over the "
          "copy bandwidth measured in the same run on buffers larger than the cache (above 100% "
          "when the data fits in cache); launches: CUDA kernel launches per call (GPU) or "
          "top-level operator calls (CPU)")


def _stem(meta: dict) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    slug = re.sub("-+", "-", slug)
    return f"{slug}-{meta['date'][:10]}" + ("" if meta["preset"] == "default" else f"-{meta['preset']}")


def save(results: dict, output: Optional[str] = None, plot: bool = True) -> str:
    out_dir = output or (RESULTS if os.path.isdir(os.path.dirname(RESULTS)) else "lipkernels-bench-results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, _stem(results["provenance"]) + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if plot:
        save_plot(results, path[:-5] + ".png")
    return path


def save_plot(results: dict, path: str) -> Optional[str]:
    """Speedup per case and implementation, and the bandwidth fraction, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    rows = [r for r in results["results"] if "skipped" not in r and not r["baseline"]]
    cases = list(dict.fromkeys(f"{r['case']} {r['shape']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(16, max(4, 0.32 * len(cases) + 1.5)), sharey=True)
    height = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ys, sp, bw = [], [], []
        for i, c in enumerate(cases):
            r = next((r for r in rows if f"{r['case']} {r['shape']}" == c and r["impl"] == impl), None)
            if r is not None:
                ys.append(i + j * height)
                sp.append(r["speedup"])
                bw.append(100 * (r.get("bandwidth_fraction") or 0.0))
        axes[0].barh(ys, sp, height=height, label=impl)
        axes[1].barh(ys, bw, height=height, label=impl)
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("speedup over the case's baseline (log)")
    axes[1].set_xlabel("% of measured copy bandwidth (cases with a cost model)")
    axes[0].set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    axes[0].set_yticklabels(cases, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(provenance_line(results["provenance"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def newest(kind: str) -> Optional[str]:
    """The newest default-or-full results file of a kind ('cpu' or 'gpu')."""
    best = None
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        with open(path) as f:
            meta = json.load(f)["provenance"]
        if ("gpu" if meta.get("device_type") == "cuda" else "cpu") != kind or meta.get("preset") == "quick":
            continue
        if best is None or meta["date"] > best[0]:
            best = (meta["date"], path)
    return best[1] if best else None


def update_readme(readme: str = os.path.join(REPO, "README.md")) -> None:
    with open(readme) as f:
        text = f.read()
    for kind in ("cpu", "gpu"):
        path = newest(kind)
        start, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
        if path is None or start not in text:
            continue
        with open(path) as f:
            results = json.load(f)
        rel = os.path.relpath(path, REPO)
        block = f"`{rel}`" + (f", plot `{rel[:-5]}.png`" if os.path.exists(path[:-5] + ".png") else "")
        if os.path.exists(path[:-5] + ".png"):
            block += f"\n\n![{kind} benchmark]({rel[:-5]}.png)"
        body = table(results, markdown=True) + "\n\n" + LEGEND
        text = re.sub(re.escape(start) + ".*?" + re.escape(end),
                      lambda _: f"{start}\n{block}\n\n{body}\n{end}", text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme()
        return 0
    path = args.path or newest("gpu") or newest("cpu")
    if path is None:
        print("no results in bench/results/", file=sys.stderr)
        return 1
    with open(path) as f:
        print(table(json.load(f), markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
