"""Nsight Compute's counters of every GPU kernel, beside the GPU cost model's prediction.

``make gpu-check`` (tools/gpu_check.py) runs, under ``ncu``, the calls that
``lipkernels bench --gpu-model`` counts (:func:`gpu_model.run_cases`: the per-sample ops
at the first benchmark shape and the spectral norm of the SNGAN CNN discriminator, on
the cuda and the triton backend, in the model's order), then puts each measured launch
beside the model's count of the same launch:

* DRAM bytes read and written (``dram__bytes_read.sum``, ``dram__bytes_write.sum``)
  against the model's ``dram_load_bytes`` and ``dram_store_bytes``;
* global-load sectors per request (``l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum`` /
  ``..._requests_...``) against the emulation's per-warp coalescing (CUDA kernels; the
  interpreter counts a Triton ``tl.load`` of a whole program as one request, so the
  Triton model's ratio is not per warp and is not compared);
* achieved occupancy (``sm__warps_active.avg.pct_of_peak_sustained_active``) and the
  theoretical one ncu computes (``sm__maximum_warps_per_active_cycle_pct``) against the
  model's theoretical occupancy from ptxas's registers and shared memory;
* the kernel's duration (``gpu__time_duration.sum``) against ``max(bytes / bandwidth,
  launch time)``.

A ratio predicted / measured outside [0.5, 2] is flagged (the issue's "a model off by
more than 2x"). Without a GPU nothing here is measured: :func:`main` ``workload
--dry-run`` runs the same calls on the cpu backend (the rehearsal), and the parser and
comparison are tested on a CSV written as ncu writes it (tests/test_gpu_check.py).

    python -m lipkernels.benchmark.ncu workload [--dry-run]
    python -m lipkernels.benchmark.ncu kernel-regex --model bench/results/gpu-model-DATE.json
    python -m lipkernels.benchmark.ncu compare --csv ncu.csv --model MODEL.json --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import io
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum",
           "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
           "sm__warps_active.avg.pct_of_peak_sustained_active", "sm__maximum_warps_per_active_cycle_pct",
           "gpu__time_duration.sum")

#: The workload: the model's first per-sample shape and one discriminator.
SHAPE = (64, 3, 32, 32)
MODEL = "sngan_cnn"
BACKENDS = ("cuda", "triton")
OFF_BY = 2.0

_UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "nsecond": 1e-9, "usecond": 1e-6,
          "msecond": 1e-3, "second": 1, "%": 1, "": 1, "sector": 1, "request": 1}


def base_name(name: str) -> str:
    """A kernel's function name without return type, namespaces, template arguments and
    parameters: 'void lk::sample_reduce_kernel<float, false>(const float *, ...)' and
    'sample_reduce_kernel<float, false>' are both 'sample_reduce_kernel'."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    depth, out = 0, []
    for ch in name:   # drop everything inside <...> and (...)
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).split("::")[-1].strip()


def load_model(path: Optional[str] = None) -> dict:
    """The newest bench/results/gpu-model-*.json (or ``path``)."""
    if path is None:
        from .gpu_model import ROOT
        found = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "gpu-model-*.json")))
        if not found:
            raise FileNotFoundError("no bench/results/gpu-model-*.json (lipkernels bench --gpu-model writes one)")
        path = found[-1]
    with open(path) as f:
        model = json.load(f)
    model["path"] = path
    return model


def _workload_rows(model: dict, backend: str) -> List[dict]:
    from .gpu_model import SN_LABELS
    shape = "x".join(map(str, SHAPE))
    return [r for r in model["rows"] if r["backend"] == backend
            and (r["shape"] == shape or r["shape"].startswith(SN_LABELS[MODEL] + " "))]


def kernel_regex(model: dict) -> str:
    """ncu's --kernel-name filter: our kernels only (not torch's fills and copies)."""
    names = sorted({base_name(k) for r in model["rows"] for k in r["kernels"] if k != "cudaMemsetAsync"})
    return "regex:^(void )?(\\w+::)*(" + "|".join(re.escape(n) for n in names) + ")(<|\\(|$)"


def parse_csv(text: str) -> List[dict]:
    """ncu --csv output (one row per kernel and metric, ``--page details``, or one row per
    kernel with a column per metric, ``--page raw``), as [{id, name, metrics}] in launch
    order, values in base units (bytes, seconds, percent)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    kernels: Dict[int, dict] = {}
    for row in reader:
        try:
            kid = int(row["ID"])
        except (KeyError, TypeError, ValueError):
            continue   # the units row of --page raw
        k = kernels.setdefault(kid, {"id": kid, "name": row.get("Kernel Name", ""), "metrics": {}})
        if "Metric Name" in row:
            value = _number(row.get("Metric Value", ""))
            if value is not None:
                k["metrics"][row["Metric Name"]] = value * _UNITS.get(row.get("Metric Unit", "").lower(), 1)
        else:
            for m in METRICS:
                if m in row and _number(row[m]) is not None:
                    k["metrics"][m] = _number(row[m])
    return [kernels[i] for i in sorted(kernels)]


def _number(text: str) -> Optional[float]:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return None


def _ratio(predicted: Optional[float], measured: Optional[float]) -> Optional[float]:
    if predicted is None or measured is None:
        return None
    if measured == 0:
        return 1.0 if predicted == 0 else math.inf
    return predicted / measured


def compare(measured: List[dict], model: dict) -> dict:
    """Each measured launch beside the model's count of the same launch: the launches of
    each backend are matched in order with the model rows' ``per_kernel`` entries."""
    from .gpu_model import BANDWIDTH, LAUNCH_S, occupancy
    out = {"model": model.get("path"), "model_date": model.get("date"), "model_git": model.get("git"),
           "rows": [], "problems": []}
    names_of = {b: {base_name(k) for r in model["rows"] if r["backend"] == b for k in r["kernels"]}
                for b in BACKENDS}
    for backend in BACKENDS:
        expected = []
        for r in _workload_rows(model, backend):
            entries = r.get("per_kernel") or [dict(name=k) for k in r["kernels"] if k != "cudaMemsetAsync"]
            expected += [dict(e, op=r["op"], shape=r["shape"], mode=r["mode"]) for e in entries]
        got = [k for k in measured if base_name(k["name"]) in names_of[backend]
               and not (backend == "triton" and base_name(k["name"]) in names_of["cuda"])]
        if not got:
            out["problems"].append(f"{backend}: no launch measured")
            continue
        if len(got) != len(expected):
            out["problems"].append(f"{backend}: {len(got)} launches measured, the model has {len(expected)}")
        resources = model.get("resources", {}).get(backend, {})
        for e, k in zip(expected, got):
            m = k["metrics"]
            row = dict(backend=backend, op=e["op"], shape=e["shape"], mode=e["mode"], kernel=e["name"],
                       measured_name=k["name"], matched=base_name(e["name"]) == base_name(k["name"]))
            if not row["matched"]:
                out["problems"].append(f"{backend}: launch {k['id']} is {k['name']}, the model has {e['name']}")
            for what, pred_key, metric in (("dram_read", "dram_load_bytes", "dram__bytes_read.sum"),
                                           ("dram_write", "dram_store_bytes", "dram__bytes_write.sum")):
                pred, meas = e.get(pred_key), m.get(metric)
                row[what] = dict(predicted=pred, measured=meas, ratio=_ratio(pred, meas))
            sectors = m.get("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum")
            requests = m.get("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum")
            meas_spr = sectors / requests if sectors is not None and requests else None
            pred_spr = (e["load_sectors"] / e["load_requests"] if backend == "cuda" and e.get("load_requests")
                        else None)
            row["sectors_per_request"] = dict(predicted=pred_spr, measured=meas_spr, ratio=_ratio(pred_spr, meas_spr))
            res = resources.get(e["name"]) or resources.get(base_name(e["name"]))
            theo = None
            if res and res.get("threads"):
                theo = 100 * occupancy(res["threads"], res.get("regs", 0), res.get("smem", 0))["occupancy"]
            row["occupancy"] = dict(model_theoretical=theo,
                                    ncu_theoretical=m.get("sm__maximum_warps_per_active_cycle_pct"),
                                    achieved=m.get("sm__warps_active.avg.pct_of_peak_sustained_active"))
            pred_bytes = (e.get("dram_load_bytes") or 0) + (e.get("dram_store_bytes") or 0)
            pred_t = max(pred_bytes / BANDWIDTH, LAUNCH_S) if "dram_load_bytes" in e else None
            row["time_s"] = dict(predicted=pred_t, measured=m.get("gpu__time_duration.sum"),
                                 ratio=_ratio(pred_t, m.get("gpu__time_duration.sum")))
            row["off_by_more_than_2x"] = [w for w in ("dram_read", "dram_write", "sectors_per_request")
                                          if row[w]["ratio"] is not None and row[w]["ratio"] > 0
                                          and not (1 / OFF_BY <= row[w]["ratio"] <= OFF_BY)
                                          and max(row[w]["predicted"] or 0, row[w]["measured"] or 0) > 4096]
            out["rows"].append(row)
    return out


def _fmt(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "B":
        for u, s in (("MB", 1e6), ("kB", 1e3)):
            if abs(x) >= s:
                return f"{x / s:.3g} {u}"
        return f"{x:.0f} B"
    if unit == "us":
        return f"{x * 1e6:.2f}"
    return f"{x:.3g}"


def markdown(result: dict, header: str = "") -> str:
    lines = [header or "# Nsight Compute counters beside the GPU cost model", "",
             f"Model: `{result.get('model')}` ({result.get('model_date')}, git {result.get('model_git')}); "
             "predicted / measured, "
             f"**flagged** outside [{1 / OFF_BY:g}, {OFF_BY:g}] (ignoring counts under 4 kB).", "",
             "| backend | op | shape | mode | kernel | DRAM read pred / meas | ratio | DRAM write pred / meas | ratio "
             "| sectors/request pred / meas | occupancy % model theor. / ncu theor. / achieved "
             "| time us pred / meas | flagged |",
             "|" + "---|" * 13]
    for r in result["rows"]:
        oc = r["occupancy"]
        lines.append("| " + " | ".join([
            r["backend"], r["op"], r["shape"], r["mode"], f"`{r['kernel']}`" + ("" if r["matched"] else " (MISMATCH)"),
            f"{_fmt(r['dram_read']['predicted'], 'B')} / {_fmt(r['dram_read']['measured'], 'B')}",
            _fmt(r["dram_read"]["ratio"]),
            f"{_fmt(r['dram_write']['predicted'], 'B')} / {_fmt(r['dram_write']['measured'], 'B')}",
            _fmt(r["dram_write"]["ratio"]),
            f"{_fmt(r['sectors_per_request']['predicted'])} / {_fmt(r['sectors_per_request']['measured'])}",
            f"{_fmt(oc['model_theoretical'])} / {_fmt(oc['ncu_theoretical'])} / {_fmt(oc['achieved'])}",
            f"{_fmt(r['time_s']['predicted'], 'us')} / {_fmt(r['time_s']['measured'], 'us')}",
            ("**" + ", ".join(r["off_by_more_than_2x"]) + "**") if r["off_by_more_than_2x"] else ""]) + " |")
    for p in result["problems"]:
        lines.append(f"\nproblem: {p}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _no_count(backend: str):
    from .counting import Record
    yield Record(backend)


def workload(dry_run: bool = False) -> List[str]:
    """The model's calls on CUDA tensors, each backend in turn (``dry_run``: on the cpu
    backend and CPU tensors, the same calls: the rehearsal without a GPU)."""
    import torch

    from .. import backends
    from .gpu_model import run_cases
    ran = []
    for backend in (("cpu",) if dry_run else BACKENDS):
        if backend not in backends.available_backends():
            print(f"workload: {backend} unavailable: {backends.backend_status()[backend][1]}")
            continue
        run_cases(backend, record=_no_count, device="cpu" if dry_run else "cuda", shapes=[SHAPE], models=(MODEL,))
        if not dry_run:
            torch.cuda.synchronize()
        ran.append(backend)
    print("workload ran:", ", ".join(ran) or "nothing")
    return ran


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lipkernels.benchmark.ncu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("workload", help="run the model's calls (under ncu)")
    w.add_argument("--dry-run", action="store_true", help="the same calls on the cpu backend (no GPU)")
    r = sub.add_parser("kernel-regex", help="print ncu's --kernel-name filter")
    r.add_argument("--model")
    c = sub.add_parser("compare", help="ncu's CSV beside the model")
    c.add_argument("--csv", required=True)
    c.add_argument("--model")
    c.add_argument("--out", required=True, help="folder: ncu-vs-model.json and .md")
    args = p.parse_args(argv)
    if args.cmd == "workload":
        ran = workload(args.dry_run)
        return 0 if ran else 1
    model = load_model(args.model)
    if args.cmd == "kernel-regex":
        print(kernel_regex(model))
        return 0
    with open(args.csv) as f:
        result = compare(parse_csv(f.read()), model)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ncu-vs-model.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "ncu-vs-model.md"), "w") as f:
        f.write(text)
    print(text)
    flagged = sum(bool(r["off_by_more_than_2x"]) for r in result["rows"])
    print(f"{len(result['rows'])} launches compared, {flagged} off by more than {OFF_BY:g}x, "
          f"{len(result['problems'])} problems")
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
