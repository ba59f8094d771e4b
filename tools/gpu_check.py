#!/usr/bin/env python3
"""``make gpu-check``: the first run of both GPU backends on a bare GPU machine, in one
command of at most 7 minutes (README "Checking the GPU backends").

Written for the GPU machines this project is lent (about 15 minutes in all, their start
included; their own Python 3.12, torch 2.11+cu130, Triton 3.6, nvcc, Nsight Compute and
compute-sanitizer; no network), and rehearsed on the CPU machines, where every step
detects the missing GPU, runs what can run and checks the rest of its path (the test
steps collect their tests, the profiler step runs its workload on the cpu backend).

Steps, each time-boxed (its process group is killed at its limit) within one overall
deadline, each with a summary line (passed / failed / skipped / timed out, and why):

  env        versions, the GPU, nvcc, ncu, compute-sanitizer
  venv       the Python to test with: this one if it is a virtualenv, else a virtualenv
             over the system's packages (the image's torch and Triton); test modules
             that are missing are installed from the wheelhouse .device/wheels
             (make gpu-wheels), never from the network
  build      pip install --no-build-isolation -e . for the GPU's architecture, all cores
  info       lipkernels info: cuda and triton must be available on a GPU
  then at once (one GPU, 16 cores):
  check      lipkernels check (every op, every dtype, against the reference)
  tests-cuda     the suites on CUDA tensors for the cuda backend (tests/test_cuda.py with
                 its GPU-only tests: streams, CUDA graphs, sync-debug mode)
  tests-triton   the same for the triton backend (tests/test_triton.py)
  memcheck   compute-sanitizer memcheck over -m sanitizer_subset (every kernel once)
  racecheck  compute-sanitizer racecheck over the same
  then alone:
  bench      lipkernels bench --short (GPU timings, with provenance)
  ncu        Nsight Compute counters of every kernel at one benchmark shape, beside the
             --gpu-model prediction of the same launch (lipkernels/benchmark/ncu.py)

Everything goes into one folder (default bench/results/gpu-check-<gpu>-<date>/):
summary.json and summary.md (provenance and the step lines), one log per step, the
benchmark's JSON, ncu's report, CSV and comparison.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 420
#: Modules the steps import, and the distribution that provides each.
NEEDED = {"pytest": "pytest", "hypothesis": "hypothesis", "numpy": "numpy", "setuptools": "setuptools",
          "wheel": "wheel", "ninja": "ninja", "tqdm": "tqdm", "matplotlib": "matplotlib"}
SANITIZER_TESTS = ["tests/test_cuda.py", "tests/test_triton.py", "-m", "sanitizer_subset"]
PYTEST = ["-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]


class Step:
    def __init__(self, name: str, box_s: float, what: str):
        self.name, self.box_s, self.what = name, box_s, what
        self.status, self.why, self.seconds, self.log = "not run", "", 0.0, None

    def line(self) -> str:
        return f"gpu-check: {self.name:<13} {self.status.upper():<9} {self.seconds:6.1f} s  {self.why}"

    def as_dict(self) -> dict:
        return dict(name=self.name, status=self.status, why=self.why, seconds=round(self.seconds, 1),
                    limit_s=self.box_s, log=self.log, what=self.what)


class Check:
    def __init__(self, out: str, python: str, wheels: str, budget_s: float):
        self.out, self.python, self.wheels = out, python, wheels
        self.deadline = time.monotonic() + budget_s
        self.steps: List[Step] = []
        self.env = dict(os.environ)
        self.facts: Dict[str, object] = {}
        os.makedirs(out, exist_ok=True)

    # ------------------------------------------------------------ running a step's commands

    def start(self, step: Step, cmd: List[str], env: Optional[dict] = None, log: Optional[str] = None):
        step.log = log or f"{step.name}.log"
        f = open(os.path.join(self.out, step.log), "w")
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return proc, f, time.monotonic()

    def wait(self, step: Step, running, extra_limit: Optional[float] = None) -> Optional[int]:
        proc, f, t0 = running
        limit = min(step.box_s if extra_limit is None else extra_limit, max(1.0, self.deadline - t0))
        try:
            rc = proc.wait(timeout=max(0.0, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
            step.status, step.why = "timed out", f"killed at its limit of {limit:.0f} s"
        step.seconds += time.monotonic() - t0
        f.close()
        return rc

    def run(self, step: Step, cmd: List[str], env: Optional[dict] = None, log: Optional[str] = None) -> Optional[int]:
        return self.wait(step, self.start(step, cmd, env, log))

    def tail(self, step: Step, n: int = 1) -> str:
        with open(os.path.join(self.out, step.log)) as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
        return " | ".join(lines[-n:])[-300:]

    def finish(self, step: Step, rc: Optional[int], ok_why: str = "", fail_why: str = "") -> bool:
        if rc is None:
            pass  # timed out, said so
        elif rc == 0:
            step.status, step.why = "passed", ok_why or self.tail(step)
        else:
            step.status, step.why = "failed", fail_why or f"exit {rc}: {self.tail(step)}"
        self.report(step)
        return step.status == "passed"

    def skip(self, step: Step, why: str) -> None:
        step.status, step.why = "skipped", why
        self.report(step)

    def report(self, step: Step) -> None:
        if step not in self.steps:
            self.steps.append(step)
        print(step.line(), flush=True)

    def py(self, code: str) -> str:
        res = subprocess.run([self.python, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    # ------------------------------------------------------------ the steps

    def step_env(self) -> None:
        step = Step("env", 10, "versions, GPU and tools")
        t0 = time.monotonic()
        facts = self.facts
        facts["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        facts["host_cpus"] = os.cpu_count()
        facts["machine"] = f"{platform.machine()} {platform.processor()}".strip()
        facts["git"] = _git("rev-parse", "--short", "HEAD")
        facts["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
        facts["python"] = self.py("import platform; print(platform.python_version())")
        facts["torch"] = self.py("import torch; print(torch.__version__, torch.version.cuda)")
        facts["triton"] = self.py("import triton; print(triton.__version__)") or "not installed"
        facts["gpu"] = self.py("import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')")
        facts["capability"] = self.py("import torch; c = torch.cuda.get_device_capability() "
                                      "if torch.cuda.is_available() else ''; print('%d.%d' % c if c else '')")
        for tool in ("nvcc", "ncu", "compute-sanitizer", "nvidia-smi"):
            path = shutil.which(tool) or next((p for p in (f"/usr/local/cuda/bin/{tool}",) if os.path.exists(p)), None)
            facts[tool] = path
        if facts["nvcc"]:
            facts["nvcc_version"] = _first_line([facts["nvcc"], "--version"], last=True)
        if facts["nvidia-smi"]:
            facts["nvidia_smi"] = _first_line([facts["nvidia-smi"], "-L"])
        with open(os.path.join(self.out, "env.json"), "w") as f:
            json.dump(facts, f, indent=1)
        step.log = "env.json"
        step.seconds = time.monotonic() - t0
        step.status = "passed" if facts["torch"] else "failed"
        step.why = (f"python {facts['python']}, torch {facts['torch']}, triton {facts['triton']}, "
                    f"GPU {facts['gpu'] or 'none'}; nvcc {'yes' if facts['nvcc'] else 'NO'}, "
                    f"ncu {'yes' if facts['ncu'] else 'no'}, compute-sanitizer "
                    f"{'yes' if facts['compute-sanitizer'] else 'no'}")
        self.report(step)

    @property
    def gpu(self) -> bool:
        return bool(self.facts.get("gpu"))

    def step_venv(self) -> bool:
        step = Step("venv", 20, "the Python to test with, and the test modules")
        in_venv = self.py("import sys; print(sys.prefix != sys.base_prefix)") == "True"
        if not in_venv:
            venv = os.path.join(ROOT, "build", "gpu-check", "venv")
            if not os.path.exists(os.path.join(venv, "bin", "python")):
                rc = self.run(step, [self.python, "-m", "venv", "--system-site-packages", venv])
                if rc != 0:
                    return self.finish(step, rc)
            self.python = os.path.join(venv, "bin", "python")
        self.env["PATH"] = os.path.dirname(self.python) + os.pathsep + self.env.get("PATH", "")
        missing = [dist for mod, dist in NEEDED.items()
                   if self.py(f"import importlib.util as u; print(u.find_spec({mod!r}) is not None)") != "True"]
        if missing:
            if not os.path.isdir(self.wheels):
                step.status = "failed" if {"pytest", "setuptools"} & set(missing) else "passed"
                step.why = f"missing {', '.join(missing)} and no wheelhouse {self.wheels} (make gpu-wheels)"
                self.report(step)
                return step.status == "passed"
            rc = self.run(step, [self.python, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                                 self.wheels] + missing, log="venv.log")
            return self.finish(step, rc, ok_why=f"{self.python}; installed from {self.wheels}: {', '.join(missing)}")
        step.status, step.why = "passed", f"{self.python}; every test module present"
        self.report(step)
        return True

    def step_build(self) -> bool:
        step = Step("build", 150, "pip install --no-build-isolation -e . for this GPU, all cores")
        env = dict(self.env, MAX_JOBS=str(os.cpu_count() or 2))
        env["TORCH_CUDA_ARCH_LIST"] = self.facts.get("capability") or "9.0"
        if self.facts.get("nvcc") and not env.get("CUDA_HOME"):
            env["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(self.facts["nvcc"])))
        rc = self.run(step, [self.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."],
                      env=env)
        arch = env["TORCH_CUDA_ARCH_LIST"]
        return self.finish(step, rc, ok_why=f"built for {arch} with {env['MAX_JOBS']} jobs"
                           + ("" if self.gpu else " (no GPU: the architecture is the default sm_90)"))

    def step_info(self) -> bool:
        step = Step("info", 15, "lipkernels info")
        rc = self.run(step, [self.python, "-m", "lipkernels.cli", "info"])
        with open(os.path.join(self.out, step.log)) as f:
            text = f.read()
        status = {m.group(1): m.group(2) for m in re.finditer(r"^  (reference|cpu|cuda|triton)\s+(.*)$", text, re.M)}
        self.facts["backends"] = status
        bad = [b for b in ("cuda", "triton") if self.gpu and not status.get(b, "").startswith("available")]
        if rc == 0 and bad:
            return self.finish(step, 1, fail_why="on a GPU but unavailable: " + "; ".join(
                f"{b}: {status.get(b)}" for b in bad))
        return self.finish(step, rc, ok_why="; ".join(f"{k}: {v[:70]}" for k, v in status.items()))

    def parallel(self) -> None:
        """check, the two suites and the two sanitizers, at once."""
        gpu = self.gpu
        san = self.facts.get("compute-sanitizer")
        cuda_env = dict(self.env, LIPKERNELS_TEST_BACKENDS="cuda")
        triton_env = dict(self.env, LIPKERNELS_TEST_BACKENDS="triton")
        box = 120
        jobs = []
        check = Step("check", box, "lipkernels check: every op and dtype against the reference")
        jobs.append((check, [self.python, "-m", "lipkernels.cli", "check"], self.env, True))
        suites = [("tests-cuda", ["tests", "--ignore=tests/test_triton.py", "--ignore=tests/test_triton_compile.py"],
                   cuda_env, "the suites on CUDA tensors, cuda backend"),
                  ("tests-triton", ["tests", "--ignore=tests/test_cuda.py"], triton_env,
                   "the suites on CUDA tensors, triton backend")]
        for name, args, env, what in suites:
            step = Step(name, box, what)
            if gpu:
                jobs.append((step, [self.python] + PYTEST + args, env, True))
            else:  # the rehearsal: the same selection, collected
                jobs.append((step, [self.python] + PYTEST + ["--collect-only"] + args, env, False))
        for tool in ("memcheck", "racecheck"):
            step = Step(tool, box, f"compute-sanitizer --tool {tool} over -m sanitizer_subset")
            cmd = [self.python] + PYTEST + SANITIZER_TESTS
            if gpu and san:
                # Without torch's caching allocator every tensor is its own allocation: an
                # access past a tensor's end is then outside any allocation, which memcheck sees.
                env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
                jobs.append((step, [san, "--tool", tool, "--error-exitcode", "99", "--target-processes", "all"]
                             + cmd, env, True))
            else:
                jobs.append((step, cmd + ["--collect-only"], dict(self.env, LIPKERNELS_TEST_BACKENDS="cuda"), False))
        running = [(step, self.start(step, cmd, env), real) for step, cmd, env, real in jobs]
        # Waited in turn: a step's seconds run to when it was seen done (at most its real time
        # plus the wait for the steps before it).
        for step, r, real in running:
            rc = self.wait(step, r)
            if step.name == "check" and rc is not None:
                with open(os.path.join(self.out, step.log)) as f:
                    verdicts = [ln.split()[-1] for ln in f if ln.rstrip().endswith((" ok", " FAIL"))]
                self.finish(step, rc, ok_why=f"{len(verdicts)} op x backend x dtype rows, all ok",
                            fail_why=f"{verdicts.count('FAIL')} of {len(verdicts)} rows FAIL (see check.log)")
            elif real:
                self.finish(step, rc)
            elif rc == 0 and step.name != "check":
                step.status = "skipped"
                step.why = ("no GPU" if not gpu else "no compute-sanitizer") + \
                    f"; rehearsed: {self.tail(step)} (the same selection, collected only)"
                self.report(step)
            else:
                self.finish(step, rc)

    def step_bench(self) -> None:
        step = Step("bench", 40, "lipkernels bench --short (GPU timings)")
        out = os.path.join(self.out, "bench")
        if self.gpu:
            rc = self.run(step, [self.python, "-m", "lipkernels.cli", "bench", "--short", "--output", out])
            self.finish(step, rc)
            return
        rc = self.run(step, [self.python, "-m", "lipkernels.cli", "bench", "--quick", "--only", "gn fwd",
                             "--no-plot", "--output", out])
        if rc == 0:
            step.status, step.why = "skipped", "no GPU; rehearsed: the quick preset's gn fwd rows on the CPU"
            self.report(step)
        else:
            self.finish(step, rc)

    def step_ncu(self) -> None:
        step = Step("ncu", 70, "Nsight Compute counters of every kernel beside the GPU cost model")
        ncu = self.facts.get("ncu")
        regex = self.py("from lipkernels.benchmark import ncu; print(ncu.kernel_regex(ncu.load_model()))")
        if not regex:
            return self.finish(step, 1, fail_why="no GPU cost model in bench/results (lipkernels bench --gpu-model)")
        if not (self.gpu and ncu):
            rc = self.run(step, [self.python, "-m", "lipkernels.benchmark.ncu", "workload", "--dry-run"])
            if rc == 0:
                step.status = "skipped"
                step.why = ("no GPU" if not self.gpu else "no ncu") + "; rehearsed: the workload on the cpu backend"
                self.report(step)
            else:
                self.finish(step, rc)
            return
        from_deadline = self.deadline - time.monotonic()
        rep = os.path.join(self.out, "ncu")
        metrics = self.py("from lipkernels.benchmark.ncu import METRICS; print(','.join(METRICS))")
        rc = self.run(step, [ncu, "--metrics", metrics, "--kernel-name", regex,
                             "--target-processes", "all", "-f", "-o", rep,
                             self.python, "-m", "lipkernels.benchmark.ncu", "workload"])
        if rc != 0:
            return self.finish(step, rc)
        csv_path = os.path.join(self.out, "ncu.csv")
        with open(csv_path, "w") as f:
            subprocess.run([ncu, "--import", rep + ".ncu-rep", "--csv", "--page", "details", "--print-units", "base"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=max(5, min(30, from_deadline)))
        rc = self.run(step, [self.python, "-m", "lipkernels.benchmark.ncu", "compare", "--csv", csv_path,
                             "--out", self.out], log="ncu-compare.log")
        self.finish(step, rc)

    # ------------------------------------------------------------ all of it

    def main(self) -> int:
        t0 = time.monotonic()
        self.step_env()
        ok = self.step_venv()
        ok = ok and self.step_build()
        if ok:
            self.step_info()   # a backend it finds unavailable fails it; the steps after still run
            self.parallel()
            self.step_bench()
            self.step_ncu()
        else:
            for name in ("info", "check", "tests-cuda", "tests-triton", "memcheck", "racecheck", "bench", "ncu"):
                self.skip(Step(name, 0, ""), "an earlier step failed")
        self.facts["wall_s"] = round(time.monotonic() - t0, 1)
        self.write_summary()
        failed = [s.name for s in self.steps if s.status in ("failed", "timed out")]
        print(f"gpu-check: {len(self.steps)} steps in {self.facts['wall_s']:.0f} s; "
              + (f"FAILED: {', '.join(failed)}" if failed else "nothing failed") + f"; results in {self.out}")
        return 1 if failed else 0

    def write_summary(self) -> None:
        summary = dict(kind="gpu-check", provenance=self.facts, steps=[s.as_dict() for s in self.steps],
                       budget_s=BUDGET_S)
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        f = self.facts
        lines = [f"# gpu-check, {f.get('date')}", "",
                 f"GPU: {f.get('gpu') or 'none (a rehearsal on the CPU)'}; python {f.get('python')}, torch "
                 f"{f.get('torch')}, triton {f.get('triton')}; git {f.get('git')}"
                 f"{' (dirty)' if f.get('git_dirty') else ''}; {f.get('host_cpus')} CPUs; "
                 f"{f.get('wall_s')} s wall (limit {BUDGET_S} s).", "",
                 "| step | status | seconds | limit | why |", "|---|---|---|---|---|"]
        for s in self.steps:
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.box_s:.0f} | {s.why.replace('|', '/')} |")
        with open(os.path.join(self.out, "summary.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _first_line(cmd: List[str], last: bool = False) -> str:
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (lines[-1] if last else " / ".join(lines)) if lines else ""


def _slug(text: str) -> str:
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in text).strip("-").lower())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results folder (default bench/results/gpu-check-<gpu>-<date>)")
    p.add_argument("--python", default=sys.executable, help="the Python whose torch is tested (default this one)")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".device", "wheels"),
                   help="wheelhouse of the test modules (make gpu-wheels)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="overall deadline (default 420 s)")
    args = p.parse_args(argv)
    out = args.out
    if not out:
        gpu = subprocess.run([args.python, "-c", "import torch; print(torch.cuda.get_device_name() "
                              "if torch.cuda.is_available() else 'no-gpu')"], capture_output=True, text=True)
        name = _slug(gpu.stdout.strip() or "no-gpu")
        out = os.path.join(ROOT, "bench", "results", f"gpu-check-{name}-{datetime.date.today().isoformat()}")
    return Check(os.path.abspath(out), args.python, args.wheels, args.budget_s).main()


if __name__ == "__main__":
    sys.exit(main())
