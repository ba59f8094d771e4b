"""Render a benchmark results file as a markdown table, and put the latest CPU (and
GPU) table into README.md between its ``<!-- bench:KIND -->`` markers.

    python bench/report.py                      # print the table of the newest results file
    python bench/report.py --readme             # update README.md
    python bench/report.py bench/results/X.json # print the table of one file
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def newest(kind: str) -> str | None:
    """The newest results file of a kind ('cpu' or 'gpu'), by its recorded date."""
    best = None
    for path in glob.glob(os.path.join(HERE, "results", "*.json")):
        meta = load(path)["provenance"]
        if ("gpu" if meta.get("cuda") else "cpu") != kind:
            continue
        if best is None or meta["date"] > best[0]:
            best = (meta["date"], path)
    return best[1] if best else None


def table(path: str) -> str:
    data = load(path)
    meta = data["provenance"]
    lines = [
        f"{meta['device']}, {meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads; "
        f"torch {meta['torch']}, lipkernels {meta['lipkernels']} ({meta['git']}); "
        f"{meta['date']}; `{os.path.relpath(path, os.path.dirname(HERE))}`",
        "",
        "| case | implementation | median (interleaved) | speedup (interleaved) | speedup (sequential) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in data["results"]:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        seq = f"{r['speedup_sequential']:.2f}x" if r.get("speedup_sequential") else "-"
        name = r["impl"] + (" (baseline)" if r["baseline"] else "")
        lines.append(f"| {r['case']} | {name} | {r['interleaved_median_s'] * 1e3:.3f} ms | {sp} | {seq} |")
    return "\n".join(lines)


def update_readme() -> None:
    with open(README) as f:
        text = f.read()
    for kind in ("cpu", "gpu"):
        path = newest(kind)
        start, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
        if path is None or start not in text:
            continue
        text = re.sub(re.escape(start) + ".*?" + re.escape(end),
                      lambda _: f"{start}\n{table(path)}\n{end}", text, flags=re.S)
    with open(README, "w") as f:
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
    print(table(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
