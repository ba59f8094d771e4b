"""``lipkernels bench --gpu-model``: what each GPU kernel will cost, counted without a GPU.

THIS IS A MODEL, NOT A MEASUREMENT. Nothing here ran on a GPU. It puts together:

* launches and global-memory traffic per call of every op, counted by running the GPU
  backends' kernels on the CPU: the CUDA kernels in the traffic-counting emulation build
  (``build/emu``, see ``counting``), the Triton kernels under the interpreter; with the
  32-byte sectors their loads touch (coalescing: the share of fetched bytes used);
* each op's minimum traffic by the cost model of ``docs/math.md`` section 8;
* registers, spills and static shared memory of every kernel for sm_90: the CUDA kernels
  from ``ptxas -v`` (``make cuda-check`` keeps its report, ``build/nvcc/*.ptxas.txt``), the
  Triton kernels compiled ahead of time (``lipkernels/triton/kernel_specs.py``) and fed to
  Triton's ptxas; dynamic shared memory from the emulated launches at the benchmark
  shapes; the theoretical occupancy those give on an H100;
* a predicted H100 time per op, ``max(bytes / BANDWIDTH, launches * LAUNCH_S)``, with the
  constants below, and the same model applied to torch's eager spectral norm, whose
  kernels and bytes come from tracing its ATen ops (each op one kernel that reads its
  inputs and writes its outputs once).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The model's constants (H100 SXM5 80 GB).
BANDWIDTH = 3.35e12      # bytes/s: the HBM3 peak of the data sheet (a copy reaches ~90 % of it)
LAUNCH_S = 2.5e-6        # s per kernel launch, back to back from the host (an assumed constant)
SM90 = dict(regs_per_sm=65536, reg_unit=256, max_warps=64, max_blocks=32, smem_per_sm=233472,
            smem_reserved=1024, smem_unit=128)

PER_SAMPLE_OPS = ("sample_norm", "gn_normalize", "gran_normalize", "gradient_penalty", "r1_penalty")
PER_SAMPLE_SHAPES = ((64, 3, 32, 32), (64, 128, 16, 16), (256, 3, 128, 128))
SN_MODELS = ("sngan_cnn", "resnet")
SN_LABELS = {"sngan_cnn": "SNGAN CNN D", "resnet": "SNGAN ResNet D"}


# ----------------------------------------------------------------- the cases

def _sn_model(key: str):
    from .. import models
    make = {"sngan_cnn": models.sngan_cnn_discriminator, "resnet": models.sngan_resnet_discriminator}[key]
    return make()


def _sn_weights(key: str):
    torch.manual_seed(0)
    model = _sn_model(key)
    ws = [m.weight.detach().clone() for m in model.modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0]), dim=0) for w in ws]
    vs = [torch.nn.functional.normalize(torch.randn(w[0].numel()), dim=0) for w in ws]
    return ws, us, vs


def _minimum(kind: str, nbytes: int, extra: int = 0) -> int:
    """docs/math.md section 8: per-sample forward one read of g; backward one read of g and
    one write of dL/dg; power iteration one read of W per iteration; W_sn one read of W and
    one write; the spectral-norm backward two reads of G, one of W, one write of dL/dW.
    `extra`: the small vectors an op must read or write besides (outputs, u, v)."""
    factor = {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "power_iteration": 1, "sn fwd": 3, "sn fwd+bwd": 7}[kind]
    return factor * nbytes + extra


#: The per-kernel counts a row keeps (``per_kernel``), in launch order: what
#: ``lipkernels.benchmark.ncu`` puts beside Nsight Compute's counters of the same launch.
KERNEL_FIELDS = ("dram_load_bytes", "dram_store_bytes", "dram_scratch_bytes", "load_requests", "load_sectors",
                 "load_bytes", "store_bytes")


def run_cases(backend: str, record=None, device: str = "cpu", shapes=PER_SAMPLE_SHAPES,
              models=SN_MODELS) -> List[dict]:
    """Counts of every case on `backend` ('cuda': emulation build; 'triton': interpreter).

    ``record(backend)``: the context manager that counts (default ``counting.record``);
    ``lipkernels.benchmark.ncu`` runs the same calls, in the same order, on CUDA tensors
    under Nsight Compute with a recorder that counts nothing."""
    import lipkernels
    from lipkernels import ops
    from . import counting

    record = record or counting.record
    rows = []

    def count(fn):
        with record(backend) as rec:
            fn()
        return rec

    def row(op, shape, mode, rec, minimum):
        calls = [c for c in rec.calls]
        rows.append(dict(
            backend=backend, op=op, shape=shape, mode=mode, launches=len(calls),
            kernels=[c.name for c in calls], minimum=minimum,
            dynamic_smem={c.name: c.dynamic_smem for c in calls},
            per_kernel=[dict(name=c.name, **{k: getattr(c, k) for k in KERNEL_FIELDS})
                        for c in calls if not c.is_memset],
            **{k: sum(getattr(c, k) for c in calls) for k in (
                "load_bytes", "store_bytes", "load_requests", "load_unique_bytes", "load_sectors",
                "dram_load_bytes", "dram_store_bytes", "dram_scratch_bytes")}))

    with lipkernels.use_backend(backend), torch.device(device):
        for shape in shapes:
            torch.manual_seed(0)
            g = torch.randn(shape)
            f = torch.randn(shape[0])
            nbytes = g.numel() * g.element_size()
            out_bytes = shape[0] * 4
            for op in PER_SAMPLE_OPS:
                uses_f = op in ("gn_normalize", "gran_normalize")

                def call(gg, ff, op=op):
                    fn = getattr(ops, op)
                    if op == "gran_normalize":
                        return fn(ff, gg, 1e-4)
                    return fn(ff, gg) if uses_f else fn(gg)

                label = "x".join(map(str, shape))
                row(op, label, "fwd", count(lambda: call(g, f)), _minimum("fwd", nbytes, out_bytes))
                gr = g.clone().requires_grad_(True)
                fr = f.clone().requires_grad_(uses_f)
                held = []
                fwd = count(lambda: held.append(call(gr, fr)))
                bwd = count(lambda: torch.autograd.grad(held[0].sum(), [gr] + ([fr] if uses_f else [])))
                both = counting.Record(backend, fwd.calls + bwd.calls)
                extra = out_bytes * (3 if uses_f else 1)
                row(op, label, "fwd+bwd", both, _minimum("fwd+bwd", nbytes, extra))
        for key in models:
            ws, us, vs = _sn_weights(key)
            wbytes = sum(w.numel() * w.element_size() for w in ws)
            vbytes = sum((u.numel() + v.numel()) * 4 for u, v in zip(us, vs))
            label = f"{SN_LABELS[key]} ({len(ws)} layers)"
            row("power_iteration", label, "1 iteration",
                count(lambda: ops.power_iteration(ws, us, vs, 1)), _minimum("power_iteration", wbytes, 2 * vbytes))
            wr = [w.clone().requires_grad_(True) for w in ws]
            held = []
            fwd = count(lambda: held.extend(ops.spectral_normalize(wr, us, vs, 1, 1e-12, True)))
            row("spectral_normalize", label, "fwd", fwd, _minimum("sn fwd", wbytes, 2 * vbytes))
            bwd = count(lambda: torch.autograd.grad(held, wr, [torch.ones_like(h) for h in held]))
            row("spectral_normalize", label, "fwd+bwd", counting.Record(backend, fwd.calls + bwd.calls),
                _minimum("sn fwd+bwd", wbytes, 3 * vbytes))
    return rows


# ----------------------------------------------------------------- torch's eager spectral norm

_NO_KERNEL = {"empty", "empty_like", "new_empty", "empty_strided", "detach", "lift_fresh", "alias",
              "_to_copy_noop"}


def torch_eager_model(key: str) -> dict:
    """Kernels and bytes of one training step of torch.nn.utils.parametrizations.spectral_norm
    (forward with one power iteration, then backward) over the model's layers: the ATen ops
    it runs, traced on CPU tensors; each op that is not a view or an allocation counts as
    one kernel reading its tensor inputs and writing its tensor outputs once."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = 0
            self.bytes = 0
            self.ops: Dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not (func.is_view or name in _NO_KERNEL):
                ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
                self.kernels += 1
                self.bytes += sum(t.numel() * t.element_size() for t in ins + outs)
                self.ops[name] = self.ops.get(name, 0) + 1
            return out

    torch.manual_seed(0)
    model = _sn_model(key)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for m in layers:
        torch.nn.utils.parametrizations.spectral_norm(m)
    model.train()
    originals = [m.parametrizations.weight.original for m in layers]
    trace = Trace()
    with trace:
        w_sn = [m.weight for m in layers]
        torch.autograd.grad(w_sn, originals, [torch.ones_like(w) for w in w_sn])
    return dict(kernels=trace.kernels, bytes=trace.bytes, ops=trace.ops, layers=len(layers))


# ----------------------------------------------------------------- resources and occupancy

def occupancy(threads: int, regs: int, smem: int) -> dict:
    """Theoretical occupancy on an sm_90 SM of a kernel with `threads` per block, `regs`
    registers per thread and `smem` bytes of shared memory per block (static + dynamic)."""
    warps = math.ceil(threads / 32)
    limits = {"threads": SM90["max_warps"] // warps, "blocks": SM90["max_blocks"]}
    if regs:
        per_warp = math.ceil(regs * 32 / SM90["reg_unit"]) * SM90["reg_unit"]
        limits["registers"] = (SM90["regs_per_sm"] // per_warp) // warps
    if smem:
        per_block = math.ceil((smem + SM90["smem_reserved"]) / SM90["smem_unit"]) * SM90["smem_unit"]
        limits["shared memory"] = SM90["smem_per_sm"] // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return dict(blocks_per_sm=blocks, occupancy=blocks * warps / SM90["max_warps"], limiter=limiter)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str, arch: int = 90) -> Dict[str, dict]:
    """{mangled name: registers, spill bytes, stack, static smem} of the sm_{arch} entries of
    a `ptxas -v` report."""
    out: Dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = m.group(1) if int(m.group(2)) == arch else None
            if current:
                out[current] = dict(regs=0, spill_stores=0, spill_loads=0, stack=0, smem=0)
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            out[current].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    """mangled -> the emulation's kernel name (`sample_reduce_kernel<float, false>`)."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    out = {}
    for mangled, full in zip(names, res.stdout.splitlines()):
        for prefix in ("(anonymous namespace)::", "lipkernels::cuda::"):
            full = full.replace(prefix, "")
        out[mangled] = re.sub(r"^void ", "", full.split("(")[0]).strip()
    return out


def cuda_resources(nvcc_dir: Optional[str] = None) -> Dict[str, dict]:
    """sm_90 resources of every CUDA kernel from make cuda-check's ptxas reports."""
    nvcc_dir = nvcc_dir or os.path.join(ROOT, "build", "nvcc")
    found: Dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(nvcc_dir, "*.ptxas.txt"))):
        with open(path) as f:
            found.update(parse_ptxas(f.read()))
    names = _demangle(list(found))
    return {names[k]: dict(v, threads=256) for k, v in found.items()}


def triton_resources() -> Dict[str, dict]:
    """sm_90 resources of every Triton kernel (float32 variants), compiled ahead of time."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nv

    from ..triton.kernel_specs import DTYPES, compile_kernel, sample_norm_kernels, spectral_norm_kernels
    t, acc = DTYPES["fp32"]
    ptxas = nv.get_ptxas(90).path
    out: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fn, sig, const in list(sample_norm_kernels(t, acc)) + list(spectral_norm_kernels(t, acc)):
            kernel = compile_kernel(fn, sig, const, GPUTarget("cuda", 90, 32))
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(kernel.asm["ptx"])
            res = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            info = next(iter(parse_ptxas(res.stdout + res.stderr).values()), {})
            name = fn.__name__
            worst = out.get(name)
            entry = dict(info, smem=int(kernel.metadata.shared), threads=32 * int(kernel.metadata.num_warps))
            if worst is None or (entry.get("regs", 0), entry["smem"]) > (worst.get("regs", 0), worst["smem"]):
                out[name] = entry  # the variant with the most registers / shared memory
    return out


# ----------------------------------------------------------------- the report

def predicted_s(nbytes: int, launches: int) -> float:
    return max(nbytes / BANDWIDTH, launches * LAUNCH_S)


def _emulation_library() -> Optional[str]:
    from .. import _extension
    if _extension.cuda_emulated():
        return _extension.path()
    for cand in (os.environ.get("LIPKERNELS_EMU_LIBRARY"), os.path.join(ROOT, "build", "emu", "liblipkernels.so")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _measure_in_subprocess(backend: str, env: dict) -> List[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, "-m", "lipkernels.benchmark.gpu_model", "--measure", backend, "--out", out]
        res = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"measuring {backend} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def build_report() -> dict:
    from .. import __version__
    from .report import _git_revision
    report = dict(kind="gpu-model", label="MODEL, not a measurement: counted on the CPU, no GPU ran",
                  date=datetime.datetime.now().isoformat(timespec="seconds"), lipkernels=__version__,
                  git=_git_revision(),
                  torch=torch.__version__, constants=dict(bandwidth_bytes_per_s=BANDWIDTH, launch_s=LAUNCH_S,
                                                          device="H100 SXM5 (data-sheet bandwidth)"),
                  rows=[], resources={}, eager_torch={}, notes=[])
    lib = _emulation_library()
    if lib is None:
        report["notes"].append("cuda: no emulation build of the CUDA kernels found (make build/emu/liblipkernels.so)")
    else:
        report["rows"] += _measure_in_subprocess("cuda", {"LIPKERNELS_LIBRARY": lib})
    try:
        import triton  # noqa: F401
        report["rows"] += _measure_in_subprocess("triton", {"TRITON_INTERPRET": "1"})
        report["resources"]["triton"] = triton_resources()
    except ImportError:
        report["notes"].append("triton: not installed")
    report["resources"]["cuda"] = cuda_resources()
    if not report["resources"]["cuda"]:
        report["notes"].append("cuda: no ptxas reports in build/nvcc (make cuda-check writes them)")
    for key in SN_MODELS:
        report["eager_torch"][SN_LABELS[key]] = torch_eager_model(key)
    return report


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def tables(report: dict) -> Dict[str, List[List[str]]]:
    """The report as tables (header row first): per op, per kernel, per spectral-norm step."""
    ops_rows = [["op", "shape", "mode", "backend", "launches", "DRAM bytes", "x minimum", "loads used",
                 "H100 model", "bound by"]]
    for r in report["rows"]:
        nbytes = r["dram_load_bytes"] + r["dram_store_bytes"]
        fetched = 32 * r["load_sectors"]
        t = predicted_s(nbytes, r["launches"])
        bound = "launches" if r["launches"] * LAUNCH_S >= nbytes / BANDWIDTH else "memory"
        used = f"{100 * r['load_unique_bytes'] / fetched:.0f}%" if fetched else "-"
        ops_rows.append([r["op"], r["shape"], r["mode"], r["backend"], str(r["launches"]), _fmt_bytes(nbytes),
                         f"{nbytes / r['minimum']:.2f}", used, f"{t * 1e6:.1f} us", bound])
    dyn: Dict[str, int] = {}
    for r in report["rows"]:
        if r["backend"] == "cuda":
            for name, smem in r["dynamic_smem"].items():
                dyn[name] = max(dyn.get(name, 0), smem)
    kern_rows = [["backend", "kernel", "regs", "spills", "smem static", "smem dynamic", "threads",
                  "occupancy", "limited by"]]
    for backend, res in sorted(report["resources"].items()):
        for name, r in sorted(res.items()):
            if backend == "cuda" and "<float" not in name and "<" in name:
                continue  # one element type per kernel: float32
            smem_dyn = dyn.get(name, 0) if backend == "cuda" else 0
            occ = occupancy(r["threads"], r.get("regs", 0), r.get("smem", 0) + smem_dyn)
            spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
            kern_rows.append([backend, name, str(r.get("regs", "?")), str(spills), str(r.get("smem", 0)),
                              str(smem_dyn), str(r["threads"]), f"{100 * occ['occupancy']:.0f}%", occ["limiter"]])
    step_rows = [["model", "implementation", "launches", "bytes", "H100 model"]]
    for key in SN_MODELS:
        label = SN_LABELS[key]
        eager = report["eager_torch"].get(label)
        if eager:
            step_rows.append([label, "torch spectral_norm, eager (traced ATen ops)", str(eager["kernels"]),
                              _fmt_bytes(eager["bytes"]), f"{predicted_s(eager['bytes'], eager['kernels']) * 1e6:.1f} us"])
        for r in report["rows"]:
            if r["op"] == "spectral_normalize" and r["mode"] == "fwd+bwd" and r["shape"].startswith(label):
                nbytes = r["dram_load_bytes"] + r["dram_store_bytes"]
                step_rows.append([label, f"lipkernels {r['backend']}", str(r["launches"]), _fmt_bytes(nbytes),
                                  f"{predicted_s(nbytes, r['launches']) * 1e6:.1f} us"])
    return {"ops": ops_rows, "kernels": kern_rows, "steps": step_rows}


def _text_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    t = tables(report)
    out = [f"**{report['label']}.** Constants: bandwidth {BANDWIDTH / 1e12:.2f} TB/s (H100 SXM5 data sheet), "
           f"{LAUNCH_S * 1e6:.1f} us per launch; predicted time = max(bytes / bandwidth, launches x launch cost). "
           f"lipkernels {report['lipkernels']}, torch {report['torch']}, {report['date']}."]
    for key, title in (("steps", "Spectral-norm training step (forward with 1 power iteration + backward)"),
                       ("ops", "Per op"), ("kernels", "Per kernel, sm_90 (float32 variants)")):
        rows = t[key]
        out.append(f"\n{title}:\n")
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "|".join("---" for _ in rows[0]) + "|")
        out.extend("| " + " | ".join(r) + " |" for r in rows[1:])
    for note in report["notes"]:
        out.append(f"\nNote: {note}")
    return "\n".join(out) + "\n"


def update_readme(readme: str = os.path.join(ROOT, "README.md")) -> str:
    """Put the newest bench/results/gpu-model-*.md between the README's gpu-model markers."""
    found = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "gpu-model-*.md")))
    if not found:
        raise FileNotFoundError("no bench/results/gpu-model-*.md: run lipkernels bench --gpu-model first")
    with open(found[-1]) as f:
        body = f.read()
    with open(readme) as f:
        text = f.read()
    start, end = "<!-- gpu-model -->", "<!-- /gpu-model -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers")
    rel = os.path.relpath(found[-1], ROOT)
    # The per-op table (every op, shape, mode and backend) stays in the file.
    if "\nPer op:" in body and "\nPer kernel" in body:
        head, rest = body.split("\nPer op:", 1)
        body = (head + f"\nPer op (launches, DRAM bytes against the minimum, share of fetched sectors "
                f"used, model time, for every op, shape and backend): see `{rel}`.\n"
                + "\nPer kernel" + rest.split("\nPer kernel", 1)[1])
    text = (text[:text.index(start) + len(start)] + f"\n`{rel}` (and its .json)\n\n" + body
            + text[text.index(end):])
    with open(readme, "w") as f:
        f.write(text)
    return found[-1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lipkernels bench --gpu-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", choices=["cuda", "triton"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the report (JSON) here; also a .md beside it")
    parser.add_argument("--readme", action="store_true",
                        help="put the newest bench/results/gpu-model-*.md into README.md and exit")
    args = parser.parse_args(argv)
    if args.readme:
        print("README.md updated from", update_readme())
        return 0
    if args.measure:
        rows = run_cases(args.measure)
        with open(args.out, "w") as f:
            json.dump(rows, f)
        return 0
    report = build_report()
    t = tables(report)
    print(f"lipkernels GPU cost model -- {report['label']}")
    print(f"constants: {BANDWIDTH / 1e12:.2f} TB/s, {LAUNCH_S * 1e6:.1f} us per launch\n")
    for key in ("steps", "ops", "kernels"):
        print(_text_table(t[key]) + "\n")
    for note in report["notes"]:
        print("note:", note)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(report))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
