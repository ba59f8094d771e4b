"""``lipkernels train``: train the seed papers' GANs with lipkernels, measure them, and
write a results JSON (with provenance), PNGs of samples and curves, and a Markdown
report (method x data -> metrics, mean ± std over seeds).

    lipkernels train --method gngan --data ring8 [--steps N] [--backend B] [--seed S]
    lipkernels train --suite [--quick] [--out DIR]
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import backends, use_backend
from .._version import __version__
from . import data as data_mod
from . import methods as methods_mod
from . import metrics as metrics_mod

#: Generator steps of a suite run (each after ``n_critic`` D steps), batch sizes, and how
#: often the metrics are measured. Sized so that ``--suite`` (8 methods x 3 data x 3
#: seeds) finishes in under 30 minutes on two idle CPU cores.
STEPS = {"ring8": 2000, "grid25": 2000, "digits": 400}
BATCH = {"ring8": 128, "grid25": 128, "digits": 64}
EVALS = 10
QUICK_STEPS = 3
QUICK_DIGITS_EVAL = 256
SEEDS = (0, 1, 2)
CLASSIFIER_EPOCHS = 30
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def train_run(method: str, data: str, steps: int, seed: int = 0, backend: str = "auto",
              dtype: torch.dtype = torch.float32, batch: Optional[int] = None,
              eval_every: Optional[int] = None, evaluator=None, keep_trainer: bool = False,
              n_eval: Optional[int] = None, grad_method: str = "auto",
              compile: bool = False) -> dict:
    """One run: ``steps`` generator steps of ``method`` on ``data`` from ``seed`` with the
    lipkernels backend ``backend``. Returns losses per step, metrics every
    ``eval_every`` steps and at the end (over ``n_eval`` samples: default 2,500 for the
    2-D data, 1,797 for digits), and the wall time per step (metrics excluded);
    with ``keep_trainer`` also the :class:`~lipkernels.train.methods.Trainer`.
    ``grad_method`` and ``compile``: the Trainer's ``method`` and ``compile``."""
    m = methods_mod.method(method)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch = batch or BATCH[data]
    sampler = data_mod.Sampler(data, seed, dtype)
    if data == "digits" and evaluator is None:
        evaluator = metrics_mod.digits_evaluator(CLASSIFIER_EPOCHS)
    mix = sampler.mixture
    torch.manual_seed(seed)
    G, D, z_dim = methods_mod.build(m, data)
    trainer = methods_mod.Trainer(m, G, D, z_dim, dtype, method=grad_method, compile=compile)
    n_eval = n_eval or (metrics_mod.N_SAMPLES if data != "digits" else len(sampler.images))
    d_losses: List[float] = []
    g_losses: List[float] = []
    curve: List[dict] = []
    train_time = 0.0

    def measure(step: int) -> dict:
        with torch.random.fork_rng():
            torch.manual_seed(1_000_000 + seed)
            samples = trainer.sample(n_eval)
        return {"step": step, **metrics_mod.evaluate(data, samples, evaluator, mix)}

    with use_backend(backend):
        for step in range(1, steps + 1):
            reals = [sampler(batch) for _ in range(m.n_critic)]
            t0 = time.perf_counter()
            d_loss, g_loss = trainer.step(reals)
            train_time += time.perf_counter() - t0
            d_losses.append(d_loss)
            g_losses.append(g_loss)
            if eval_every and step % eval_every == 0 and step != steps:
                curve.append(measure(step))
        curve.append(measure(steps))
        with torch.random.fork_rng():
            torch.manual_seed(2_000_000 + seed)
            samples = trainer.sample(metrics_mod.N_SAMPLES if data != "digits" else 64)
    out = {
        "method": method, "data": data, "seed": seed, "steps": steps, "batch": batch,
        "backend": backend, "dtype": str(dtype).replace("torch.", ""),
        "n_critic": m.n_critic, "d_loss": d_losses, "g_loss": g_losses,
        "curve": curve, "final": {k: v for k, v in curve[-1].items() if k != "step"},
        "seconds_per_step": train_time / steps,
        "finite": all(math.isfinite(x) for x in d_losses + g_losses),
        "samples": samples.detach().float().cpu(),
    }
    if keep_trainer:
        out["trainer"] = trainer
    return out


# ------------------------------------------------------------------ provenance, files

def _resolved(backend: str) -> str:
    """The backend that runs the ops on CPU tensors when ``backend`` is selected."""
    with use_backend(backend):
        return backends.select(torch.device("cpu"))


def provenance(args_dict: dict, backend: str) -> dict:
    from ..benchmark.report import _cpu_model, _git_revision
    try:
        import sklearn
        sk = sklearn.__version__
    except ImportError:
        sk = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_revision(), "lipkernels": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "scikit-learn": sk,
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backend_requested": backend,
        "backend_resolved": _resolved(backend),
        "backends_available": backends.available_backends(),
        "args": args_dict,
    }


def _mean_std(xs: Sequence[float]):
    xs = [float(x) for x in xs]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def summarize(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """``{data: {method: {metric: [mean, std], "ms_per_step": [mean, std], ...}}}``."""
    table: Dict[str, Dict[str, dict]] = {}
    for r in runs:
        table.setdefault(r["data"], {}).setdefault(r["method"], []).append(r)
    out: Dict[str, Dict[str, dict]] = {}
    for d, by_m in table.items():
        out[d] = {}
        for meth, rs in by_m.items():
            cell = {}
            for key in metrics_mod.metric_names(d):
                cell[key] = list(_mean_std([r["final"][key] for r in rs]))
            cell["ms_per_step"] = list(_mean_std([1e3 * r["seconds_per_step"] for r in rs]))
            cell["seeds"] = [r["seed"] for r in rs]
            cell["diverged"] = sum(not r["finite"] for r in rs)
            out[d][meth] = cell
    return out


def _fmt(ms, digits: int = 1) -> str:
    mean, std = ms
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


HEADERS = {"modes": ("modes", 1), "hq": ("HQ %", 1), "kl": ("KL", 2),
           "fdd": ("FDD", 2), "classes": ("classes", 1), "entropy": ("entropy (bits)", 2)}


def markdown(results: dict, picture: Optional[str] = None) -> str:
    """The report: one table per data set (method -> metrics, ms per step), mean ± std."""
    meta, summ = results["meta"], results["summary"]
    lines = [f"lipkernels {meta['lipkernels']} (git {meta['git']}), torch {meta['torch']}, "
             f"backend {meta['backend_requested']}, {meta['cpu']} ({meta['cpu_count']} CPUs visible, "
             f"{meta['torch_threads']} torch threads), {meta['date']}; seeds "
             f"{', '.join(map(str, results['seeds']))}; mean ± std over seeds.", ""]
    ev = results.get("digits_classifier")
    for d in [x for x in data_mod.DATASETS if x in summ]:
        steps = results["steps"][d]
        names = metrics_mod.metric_names(d)
        head = ["method"] + [HEADERS[n][0] for n in names] + ["ms / G step", "diverged"]
        if d in data_mod.MIXTURES:
            k = len(data_mod.mixture(d).centers)
            title = (f"**{d}** ({k} modes, sigma {data_mod.mixture(d).sigma}; {steps} generator "
                     f"steps, batch {BATCH[d]}; metrics over {metrics_mod.N_SAMPLES} samples)")
        else:
            title = (f"**digits** (16x16; {steps} generator steps, batch {BATCH[d]}; classifier "
                     f"held-out accuracy {100 * ev['accuracy']:.1f}%, FDD of held-out real digits "
                     f"{ev['real_floor']:.2f})" if ev else f"**digits** ({steps} generator steps)")
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for meth in [x for x in methods_mod.METHOD_NAMES if x in summ[d]]:
            c = summ[d][meth]
            cells = [meth] + [_fmt(c[n], HEADERS[n][1]) for n in names]
            cells += [_fmt(c["ms_per_step"], 1), f"{c['diverged']}/{len(c['seeds'])}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("modes: modes with >= 20 high-quality samples; HQ %: samples within 3 sigma of "
                 "their nearest mode; KL: KL(mode histogram || uniform), nats. FDD: Fréchet digit "
                 "distance (penultimate features of the small digits classifier; not FID); "
                 "classes: classes predicted for >= 2% of samples; entropy of the predicted "
                 "classes (max 3.32 bits). ms / G step: wall time of one generator step "
                 "with its n_critic discriminator steps.")
    if picture:
        lines += ["", f"![samples]({picture})"]
    return "\n".join(lines) + "\n"


def _plot(results: dict, runs: List[dict], stem: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    datas = [d for d in data_mod.DATASETS if any(r["data"] == d for r in runs)]
    meths = [m for m in methods_mod.METHOD_NAMES if any(r["method"] == m for r in runs)]
    first = {}
    for r in runs:
        first.setdefault((r["method"], r["data"]), r)
    paths = []
    # Samples: rows = methods, columns = data sets (the lowest seed of each pair).
    fig, axes = plt.subplots(len(meths), len(datas), figsize=(2.4 * len(datas), 2.4 * len(meths)),
                             squeeze=False)
    for i, meth in enumerate(meths):
        for j, d in enumerate(datas):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            r = first.get((meth, d))
            if j == 0:
                ax.set_ylabel(meth, fontsize=9)
            if i == 0:
                ax.set_title(d, fontsize=9)
            if r is None:
                continue
            s = r["samples"]
            if d in data_mod.MIXTURES:
                mix = data_mod.mixture(d)
                real = mix.sample(2500, torch.Generator().manual_seed(0), torch.float64)
                ax.scatter(real[:, 0], real[:, 1], s=1, c="0.75")
                s = s[torch.isfinite(s).all(1)]
                ax.scatter(s[:, 0], s[:, 1], s=1, c="C3", alpha=0.5)
                lim = 1.5 if d == "ring8" else 5.5
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
            else:
                img = s[:64].clamp(-1, 1).reshape(8, 8, 16, 16).permute(0, 2, 1, 3).reshape(128, 128)
                ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
    fig.tight_layout()
    path = stem + "-samples.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
    # Curves: per data set, the G and D losses (smoothed) and the first metric over steps.
    fig, axes = plt.subplots(2, len(datas), figsize=(4.5 * len(datas), 6.5), squeeze=False)
    for j, d in enumerate(datas):
        key = metrics_mod.metric_names(d)[0]
        for meth in meths:
            rs = [r for r in runs if r["method"] == meth and r["data"] == d]
            if not rs:
                continue
            r = rs[0]
            w = max(1, len(r["g_loss"]) // 50)
            g = torch.tensor(r["g_loss"])
            g = g[: len(g) // w * w].reshape(-1, w).mean(1)
            axes[0][j].plot(torch.arange(len(g)) * w + w, g, label=meth, lw=1)
            axes[1][j].plot([c["step"] for c in r["curve"]], [c[key] for c in r["curve"]],
                            label=meth, lw=1, marker=".")
        axes[0][j].set_title(f"{d}: generator loss (seed {results['seeds'][0]})", fontsize=9)
        axes[1][j].set_title(f"{d}: {HEADERS[key][0]}", fontsize=9)
        axes[1][j].set_xlabel("generator step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = stem + "-curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
    return paths


LOSS_POINTS = 200


def compact(results: dict, points: int = LOSS_POINTS) -> dict:
    """Each run's per-step losses as means over windows of ``loss_window`` steps (at most
    ``points`` values), 6 significant digits: the results file stays small."""
    for r in results["runs"]:
        if "loss_window" in r:
            continue
        w = max(1, -(-len(r["g_loss"]) // points))
        r["loss_window"] = w
        for key in ("d_loss", "g_loss"):
            xs = r[key]
            r[key] = [float(f"{sum(xs[i:i + w]) / len(xs[i:i + w]):.6g}") for i in range(0, len(xs), w)]
    return results


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_task(task: dict, evaluator) -> dict:
    t0 = time.perf_counter()
    r = train_run(evaluator=evaluator if task["data"] == "digits" else None, **task)
    r["run_seconds"] = time.perf_counter() - t0
    return r


def _report(r: dict) -> dict:
    fin = ", ".join(f"{k} {v:.3g}" for k, v in r["final"].items())
    print(f"{r['method']:>9} {r['data']:>7} seed {r['seed']}: {fin}; "
          f"{1e3 * r['seconds_per_step']:.1f} ms/step, {r['run_seconds']:.1f} s"
          f"{'' if r['finite'] else ' (non-finite loss)'}", flush=True)
    return r


def main(args) -> int:
    datas = list(data_mod.DATASETS) if (args.suite or args.data == "all") else [args.data]
    meths = list(methods_mod.METHOD_NAMES) if (args.suite or args.method == "all") else [args.method]
    for d in datas:
        if d not in data_mod.DATASETS:
            raise SystemExit(f"lipkernels train: --data must be one of {', '.join(data_mod.DATASETS)} or all")
    for m in meths:
        methods_mod.method(m)
    if args.seed is not None:
        seeds = [args.seed]
    else:
        seeds = [0] if args.quick else (list(SEEDS) if args.suite else [0])
    steps = {d: args.steps or (QUICK_STEPS if args.quick else STEPS[d]) for d in datas}
    dtype = DTYPES[args.dtype]
    # One thread by default: these networks are too small for more to help, and the
    # suite's timing is meant for a shared machine.
    torch.set_num_threads(args.threads or 1)
    evaluator = None
    t_start = time.perf_counter()
    # Provenance at the start: the code that runs (the tree may change during a long run).
    meta = provenance({k: v for k, v in vars(args).items() if k != "fn"}, args.backend)
    if "digits" in datas:
        t0 = time.perf_counter()
        evaluator = metrics_mod.digits_evaluator(3 if args.quick else CLASSIFIER_EPOCHS)
        print(f"digits classifier: held-out accuracy {100 * evaluator.accuracy:.1f}% "
              f"({time.perf_counter() - t0:.1f} s); FDD of held-out real digits "
              f"{evaluator.real_floor:.2f}", flush=True)
    tasks = [dict(method=m, data=d, steps=steps[d], seed=seed, backend=args.backend, dtype=dtype,
                  eval_every=max(1, steps[d] // EVALS),
                  grad_method=getattr(args, "grad_method", "auto"),
                  compile=getattr(args, "compile", False),
                  n_eval=QUICK_DIGITS_EVAL if (args.quick and d == "digits") else None)
             for d in datas for m in meths for seed in seeds]
    jobs = max(1, args.jobs or 1)
    runs: List[dict] = []
    if jobs == 1 or len(tasks) == 1:
        for task in tasks:
            runs.append(_report(_run_task(task, evaluator)))
    else:
        import concurrent.futures
        import multiprocessing
        # Longest first (digits, then the methods with 5 critic steps) for load balance.
        order = sorted(range(len(tasks)), key=lambda i: (tasks[i]["data"] != "digits",
                                                           -methods_mod.method(tasks[i]["method"]).n_critic))
        done: Dict[int, dict] = {}
        with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(args.threads or 1,)) as pool:
            futures = {pool.submit(_run_task, tasks[i], evaluator): i for i in order}
            for fut in concurrent.futures.as_completed(futures):
                done[futures[fut]] = _report(fut.result())
        runs = [done[i] for i in range(len(tasks))]
    meta["wall_seconds"] = time.perf_counter() - t_start
    results = {
        "meta": meta,
        "seeds": seeds, "steps": steps, "batch": {d: BATCH[d] for d in datas},
        "methods": {m: {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in methods_mod.method(m).__dict__.items() if k != "loss"}
                    for m in meths},
        "data": {d: ({"centers": data_mod.mixture(d).centers.tolist(), "sigma": data_mod.mixture(d).sigma}
                     if d in data_mod.MIXTURES else {"images": 1797, "size": data_mod.IMAGE_SIZE})
                 for d in datas},
        "digits_classifier": ({"accuracy": evaluator.accuracy, "real_floor": evaluator.real_floor}
                              if evaluator else None),
        "summary": summarize(runs),
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
        "total_seconds": time.perf_counter() - t_start,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "train-" + datetime.date.today().isoformat()
                        + ("-quick" if args.quick else ""))
    pngs = [] if args.no_plot else _plot(results, runs, stem)
    md = markdown(results, os.path.basename(pngs[0]) if pngs else None)
    with open(stem + ".json", "w") as f:
        json.dump(compact(results), f, indent=None, separators=(",", ":"))
    with open(stem + ".md", "w") as f:
        f.write(md)
    print()
    print(md)
    print("wrote", ", ".join([stem + ".json", stem + ".md"] + pngs))
    bad = [f"{r['method']}/{r['data']}/{r['seed']}" for r in runs if not r["finite"]]
    if bad:
        print("non-finite losses in:", ", ".join(bad))
    return 0


README_BEGIN, README_END = "<!-- train:results -->", "<!-- /train:results -->"


def update_readme(results_path: str, readme: Optional[str] = None) -> None:
    """Put the tables of the results file ``results_path`` (and its samples PNG) into
    README.md between the ``<!-- train:results -->`` markers."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = readme or os.path.join(repo, "README.md")
    with open(results_path) as f:
        results = json.load(f)
    stem = os.path.splitext(results_path)[0]
    rel = os.path.relpath(stem, os.path.dirname(os.path.abspath(readme)))
    picture = rel + "-samples.png" if os.path.exists(stem + "-samples.png") else None
    block = (f"{README_BEGIN}\n`{rel}.json` (`{rel}.md`; curves `{rel}-curves.png`)\n\n"
             + markdown(results, picture) + README_END)
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(readme, "w") as f:
        f.write(head + block + tail)


if __name__ == "__main__":
    import argparse
    import sys
    p = argparse.ArgumentParser(description="python -m lipkernels.train.runner --readme RESULTS.json "
                                            "[--file README.md]: a results file's tables into the README")
    p.add_argument("--readme", required=True, metavar="RESULTS.json")
    p.add_argument("--file", default=None, help="the README to edit (default: the repository's)")
    a = p.parse_args()
    update_readme(a.readme, a.file)
    sys.exit(0)
