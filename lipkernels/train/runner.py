"""``lipkernels train``: train the seed papers' GANs with lipkernels, measure them, and
write a results JSON (with provenance), PNGs of samples and curves, and a Markdown
report (method x data -> metrics, mean ± std over seeds).

    lipkernels train --method gngan[,M...] --data ring8[,D...] [--steps N] [--backend B] [--seed S[,S...]]
    lipkernels train --suite [--quick] [--out DIR]
"""
from __future__ import annotations

import dataclasses
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
from . import protocols as protocols_mod

#: How often the metrics are measured (EVALS times a run) and a run checkpoints; the
#: budgets and batch sizes are each protocol's (protocols.py).
EVALS = 10
CHECKPOINT_EVERY = 500
DIAGNOSE_SAMPLES = 256
QUICK_STEPS = 3
QUICK_DIGITS_EVAL = 256
CLASSIFIER_EPOCHS = 30
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _config(method, data, seed, batch, dtype, protocol) -> dict:
    """What a checkpoint must agree on to be continued by a run."""
    return {"method": method, "data": data, "seed": seed, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "protocol": protocol}


class Progress:
    """One line on a terminal (stderr), rewritten at most every ``every`` seconds:
    the run, its step / steps, elapsed time, ETA and its latest metrics. Silent off a
    terminal unless ``force``."""

    def __init__(self, label: str, total: int, every: float = 2.0, force: bool = False) -> None:
        import sys
        self.label, self.total, self.every = label, total, every
        self.stream = sys.stderr
        self.on = force or self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = -math.inf
        self.note = ""

    def __call__(self, step: int, first: int) -> None:
        now = time.perf_counter()
        if not self.on or (now - self.last < self.every and step != self.total):
            return
        self.last = now
        done = step - first + 1
        eta = (now - self.t0) / done * (self.total - step) if done > 0 else 0.0
        self.stream.write(f"\r{self.label}: step {step}/{self.total}, {now - self.t0:.0f} s, "
                          f"ETA {eta:.0f} s{self.note}\x1b[K")
        if step == self.total:
            self.stream.write("\n")
        self.stream.flush()


def train_run(method: str, data: str, steps: int, seed: int = 0, backend: str = "auto",
              dtype: torch.dtype = torch.float32, batch: Optional[int] = None,
              eval_every: Optional[int] = None, evaluator=None, keep_trainer: bool = False,
              n_eval: Optional[int] = None, grad_method: str = "auto",
              compile: bool = False, protocol: Optional[str] = None,
              checkpoint: Optional[str] = None, checkpoint_every: int = 0,
              progress: bool = False, overrides: Optional[dict] = None,
              diagnose: bool = False, impl: str = "lipkernels") -> dict:
    """One run: ``steps`` generator steps of ``method`` on ``data`` from ``seed`` with the
    lipkernels backend ``backend``, under ``protocol`` (default: the protocol that holds
    ``data``). Returns losses per step, metrics every ``eval_every`` steps and at the end
    (over ``n_eval`` samples: default 2,500 for the 2-D data, 1,797 for digits), and the
    wall time per step (metrics excluded); with ``keep_trainer`` also the
    :class:`~lipkernels.train.methods.Trainer`. ``grad_method`` and ``compile``: the
    Trainer's ``method`` and ``compile``.

    ``checkpoint``: a file the run's whole state (networks, optimizers, the random
    streams, the data position, losses and metrics so far) is saved to every
    ``checkpoint_every`` steps and at the end; when it exists, the run continues from
    it (the same run: its settings must match) up to ``steps``, and gives what an
    uninterrupted run gives.

    ``overrides``: Method fields to change (``{"gran_eps": 1e-8}``: a deliberate change
    of the method's setting, recorded in the result). ``diagnose``: at every evaluation
    also :meth:`Trainer.diagnose` on a fixed draw of real data (key ``"d"``).

    ``impl="plain"``: train the plain-PyTorch twin instead (``plain.PlainTrainer``: torch's
    spectral norm, the papers' formulas written out, nothing of lipkernels), from the
    same initial networks and random draws."""
    p, m = protocols_mod.find(method, data, protocol)
    if overrides:
        m = dataclasses.replace(m, **overrides)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch = batch or p.batch[data]
    # PacGAN's packing: a batch is ``batch`` packs of ``m.pack`` samples each.
    points = batch * m.pack
    sampler = data_mod.Sampler(data, seed, dtype,
                               points=p.data_points * m.pack if p.data_points else None)
    if data == "digits" and evaluator is None:
        evaluator = metrics_mod.digits_evaluator(CLASSIFIER_EPOCHS)
    mix = sampler.target
    torch.manual_seed(seed)
    G, D, z_dim = p.build(m, data)
    trainer = methods_mod.Trainer(m, G, D, z_dim, dtype, method=grad_method, compile=compile)
    if impl == "plain":
        from .plain import PlainTrainer
        trainer = PlainTrainer.twin_of(trainer)
        diagnose = False
    elif impl != "lipkernels":
        raise ValueError(f"impl must be 'lipkernels' or 'plain', got {impl!r}")
    trainer.sample_eval = p.sample_eval
    n_eval = n_eval or (metrics_mod.N_SAMPLES if data != "digits" else len(sampler.images))
    config = _config(method, data, seed, batch, dtype, p.name)
    if impl != "lipkernels":
        config["impl"] = impl
    if overrides:
        config["overrides"] = dict(overrides)
    diag_data = data_mod.Sampler(data, seed + 777, dtype) if diagnose else None
    log = {"d_loss": [], "g_loss": [], "curve": [], "train_time": 0.0}
    first = 1
    if checkpoint and os.path.exists(checkpoint):
        ck = torch.load(checkpoint, weights_only=False)
        if ck["config"] != config:
            raise ValueError(f"checkpoint {checkpoint} is of another run: {ck['config']} "
                             f"(this one: {config})")
        if ck["step"] > steps:
            raise ValueError(f"checkpoint {checkpoint} is at step {ck['step']}, beyond the "
                             f"{steps} steps asked for")
        methods_mod.load_trainer_state(trainer, ck["trainer"])
        sampler.load_state_dict(ck["sampler"])
        torch.set_rng_state(ck["rng"])
        log = ck["log"]
        first = ck["step"] + 1
        # The end-of-run measurement of a run now continued is off the schedule: dropped,
        # so a continued run gives what an uninterrupted one gives.
        log["curve"] = [c for c in log["curve"]
                        if c["step"] != ck["step"] or (eval_every and c["step"] % eval_every == 0)]
    curve = log["curve"]

    def measure(step: int) -> dict:
        with torch.random.fork_rng():
            torch.manual_seed(1_000_000 + seed)
            samples = trainer.sample(n_eval)
        if data != "digits":   # kept in the checkpoint: other metrics can be computed later
            log.setdefault("eval_samples", {})[step] = samples.detach().float().cpu()
        point = {"step": step, **metrics_mod.evaluate(data, samples, evaluator, mix)}
        if diagnose:
            with torch.random.fork_rng():
                torch.manual_seed(3_000_000 + seed)
                reals = diag_data(DIAGNOSE_SAMPLES)
                point["d"] = trainer.diagnose(reals, DIAGNOSE_SAMPLES)
        return point

    def save(step: int) -> None:
        tmp = checkpoint + ".tmp"
        torch.save({"config": config, "step": step, "trainer": methods_mod.trainer_state(trainer),
                    "sampler": sampler.state_dict(), "rng": torch.get_rng_state(), "log": log},
                   tmp)
        os.replace(tmp, checkpoint)

    show = Progress(f"{method} {data} seed {seed}", steps, force=False) if progress else None
    with use_backend(backend):
        for step in range(first, steps + 1):
            reals = [sampler(points) for _ in range(m.n_critic)]
            t0 = time.perf_counter()
            d_loss, g_loss = trainer.step(reals)
            log["train_time"] += time.perf_counter() - t0
            log["d_loss"].append(d_loss)
            log["g_loss"].append(g_loss)
            if eval_every and step % eval_every == 0 and step != steps:
                curve.append(measure(step))
                if show:
                    show.note = ", " + ", ".join(f"{k} {v:.3g}" for k, v in curve[-1].items()
                                                 if k not in ("step", "d"))
            if checkpoint and checkpoint_every and step % checkpoint_every == 0 and step != steps:
                save(step)
            if show:
                show(step, first)
        if not curve or curve[-1]["step"] != steps:
            curve.append(measure(steps))
        if checkpoint:
            save(steps)
        with torch.random.fork_rng():
            torch.manual_seed(2_000_000 + seed)
            samples = trainer.sample(metrics_mod.N_SAMPLES if data != "digits" else 64)
    d_losses, g_losses = log["d_loss"], log["g_loss"]
    out = {
        "method": method, "data": data, "seed": seed, "steps": steps, "batch": batch,
        "protocol": p.name, "backend": backend, "dtype": config["dtype"], "impl": impl,
        "n_critic": m.n_critic, "overrides": dict(overrides or {}),
        "d_loss": d_losses, "g_loss": g_losses,
        "curve": curve,
        "final": {k: v for k, v in curve[-1].items() if k not in ("step", "d")},
        "seconds_per_step": log["train_time"] / max(len(log["d_loss"]), 1),
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
        table.setdefault(r["data"], {}).setdefault(label(r), []).append(r)
    out: Dict[str, Dict[str, dict]] = {}
    for d, by_m in table.items():
        out[d] = {}
        for meth, rs in by_m.items():
            cell = {}
            for key in metrics_mod.metric_names(d, rs[0].get("protocol")):
                cell[key] = list(_mean_std([r["final"][key] for r in rs]))
            cell["ms_per_step"] = list(_mean_std([1e3 * r["seconds_per_step"] for r in rs]))
            cell["seeds"] = [r["seed"] for r in rs]
            cell["steps"] = max(r["steps"] for r in rs)
            cell["diverged"] = sum(not r["finite"] for r in rs)
            out[d][meth] = cell
    return out


def _fmt(ms, digits: int = 1) -> str:
    mean, std = ms
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


HEADERS = {"modes": ("modes", 1), "modes1": ("modes (1 HQ)", 1), "hq": ("HQ %", 1), "kl": ("KL", 2),
           "modes10": ("modes (10σ)", 1), "spread": ("median dist. (σ)", 1),
           "fdd": ("FDD", 2), "classes": ("classes", 1), "entropy": ("entropy (bits)", 2)}


def label(r: dict) -> str:
    """A run's row in the tables: its method, marked ``(plain)`` for the plain twin."""
    return r["method"] + (" (plain)" if r.get("impl", "lipkernels") == "plain" else "")


def _method_order(results: dict) -> List[str]:
    p = protocols_mod.PROTOCOLS.get(results.get("protocol", "small"))
    names = list(p.methods) if p else list(results["methods"])
    return [x for n in names for x in (n, n + " (plain)")]


def markdown(results: dict, picture: Optional[str] = None) -> str:
    """The report: one table per data set (method -> metrics, ms per step), mean ± std."""
    meta, summ = results["meta"], results["summary"]
    lines = [f"lipkernels {meta['lipkernels']} (git {meta['git']}), torch {meta['torch']}, "
             f"backend {meta['backend_requested']}, {meta['cpu']} ({meta['cpu_count']} CPUs visible, "
             f"{meta['torch_threads']} torch threads), {meta['date']}; seeds "
             f"{', '.join(map(str, results['seeds']))}; mean ± std over seeds.", ""]
    if results.get("protocol", "small") != "small":
        lines[0] = f"Protocol **{results['protocol']}** ({results['protocol_source']}). " + lines[0]
    if results.get("overrides"):
        lines.insert(1, "Settings changed on the command line (not the methods' defaults): "
                     + ", ".join(f"{k} = {v:g}" for k, v in results["overrides"].items()) + ".")
    ev = results.get("digits_classifier")
    for d in [x for x in data_mod.DATASETS if x in summ]:
        names = metrics_mod.metric_names(d, results.get("protocol"))
        per = sorted({c.get("steps", results["steps"][d]) for c in summ[d].values()})
        mixed = len(per) > 1     # the methods ran different budgets: a column says which
        steps = results["steps"][d] if not mixed else " / ".join(map(str, per))
        head = (["method"] + (["G steps"] if mixed else []) + [HEADERS[n][0] for n in names]
                + ["ms / G step", "diverged"])
        batch = results["batch"][d]
        if d != "digits":
            t = data_mod.target(d)
            what = (f"{t.segments} segments" if isinstance(t, data_mod.SwissRoll)
                    else f"{len(t.centers)} modes")
            title = (f"**{d}** ({what}, sigma {t.sigma:.3g}; {steps} generator "
                     f"steps, batch {batch}; metrics over {metrics_mod.N_SAMPLES} samples)")
        else:
            title = (f"**digits** (16x16; {steps} generator steps, batch {batch}; classifier "
                     f"held-out accuracy {100 * ev['accuracy']:.1f}%, FDD of held-out real digits "
                     f"{ev['real_floor']:.2f})" if ev else f"**digits** ({steps} generator steps)")
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for meth in [x for x in _method_order(results) if x in summ[d]]:
            c = summ[d][meth]
            cells = ([meth] + ([str(c["steps"])] if mixed else [])
                     + [_fmt(c[n], HEADERS[n][1]) for n in names])
            cells += [_fmt(c["ms_per_step"], 1), f"{c['diverged']}/{len(c['seeds'])}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = []
    if any(d != "digits" for d in summ):
        notes.append("modes: modes with >= 20 high-quality samples; HQ %: samples within 3 sigma "
                     "of their nearest mode; KL: KL(mode histogram || uniform), nats.")
    if "swissroll" in summ:
        notes.append("swissroll: the modes are 20 equal segments of the roll's parameter t, HQ "
                     "within 3 sigma of the noiseless curve.")
    if any(d in data_mod.TOY for d in summ):
        notes.append("modes (10σ): modes with >= 20 samples within 10 sigma (coverage apart "
                     "from sharpness); median dist. (σ): the median distance of a sample to its "
                     "nearest mode (swissroll: to the curve), in sigma (true samples: 1.2; swissroll 0.7).")
    if "digits" in summ:
        notes.append("FDD: Fréchet digit distance (penultimate features of the small digits "
                     "classifier; not FID); classes: classes predicted for >= 2% of samples; "
                     "entropy of the predicted classes (max 3.32 bits).")
    notes.append("ms / G step: wall time of one generator step with its n_critic "
                 "discriminator steps.")
    lines.append(" ".join(notes))
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
    meths = [m for m in _method_order(results) if any(label(r) == m for r in runs)]
    first = {}
    for r in runs:
        first.setdefault((label(r), r["data"]), r)
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
            if d != "digits":
                mix = data_mod.target(d)
                real = mix.sample(2500, torch.Generator().manual_seed(0), torch.float64)
                ax.scatter(real[:, 0], real[:, 1], s=1, c="0.75")
                s = s[torch.isfinite(s).all(1)]
                ax.scatter(s[:, 0], s[:, 1], s=1, c="C3", alpha=0.5)
                lim = {"ring8": 1.5, "grid25": 5.5}.get(d, 2.2)
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
    # PacGAN's budgets are in D steps (epochs): its curves are drawn over D steps.
    in_d_steps = results.get("protocol") == "pacgan"
    for j, d in enumerate(datas):
        key = metrics_mod.metric_names(d)[0]
        for meth in meths:
            rs = [r for r in runs if label(r) == meth and r["data"] == d]
            if not rs:
                continue
            r = rs[0]
            x = r.get("n_critic", 1) if in_d_steps else 1
            w = max(1, len(r["g_loss"]) // 50)
            g = torch.tensor(r["g_loss"])
            g = g[: len(g) // w * w].reshape(-1, w).mean(1)
            axes[0][j].plot((torch.arange(len(g)) * w + w) * x, g, label=meth, lw=1)
            axes[1][j].plot([c["step"] * x for c in r["curve"]], [c[key] for c in r["curve"]],
                            label=meth, lw=1, marker=".")
        seed = results["seeds"][0]
        axes[0][j].set_title(f"{d}: generator loss (seed {seed})", fontsize=9)
        axes[1][j].set_title(f"{d}: {HEADERS[key][0]} (seed {seed})", fontsize=9)
        axes[1][j].set_xlabel("D step" if in_d_steps else "generator step")
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
    """One task of a command line; its record is left beside its checkpoint."""
    task = dict(task)
    record = task.pop("record", None)
    t0 = time.perf_counter()
    r = train_run(evaluator=evaluator if task["data"] == "digits" else None, **task)
    r["run_seconds"] = time.perf_counter() - t0
    if record:
        torch.save(r, record + ".tmp")
        os.replace(record + ".tmp", record)
    return r


def _report(r: dict) -> dict:
    fin = ", ".join(f"{k} {v:.3g}" for k, v in r["final"].items())
    print(f"{label(r):>17} {r['data']:>11} seed {r['seed']}: {fin}; "
          f"{1e3 * r['seconds_per_step']:.1f} ms/step, {r['run_seconds']:.1f} s"
          f"{'' if r['finite'] else ' (non-finite loss)'}", flush=True)
    return r


def _fail(msg: str):
    raise SystemExit(f"lipkernels train: {msg}")


def _names(text: str, flag: str) -> list:
    """The names of a comma-separated ``--data`` / ``--method`` value, each once, in order."""
    names = [x.strip() for x in str(text).split(",")]
    if not all(names):
        _fail(f"{flag} must be a name or a comma-separated list of names, got {text!r}")
    return list(dict.fromkeys(names))


def plan(args) -> tuple:
    """``(protocol, tasks, seeds, steps)`` of a command line, or a clear error for a
    method, data set or protocol that do not belong together."""
    try:
        p = protocols_mod.protocol(getattr(args, "protocol", None) or "small")
    except ValueError as e:
        _fail(str(e))
    datas = (list(p.datasets) if (args.suite or args.data == "all")
             else _names(args.data, "--data") if args.data else [p.datasets[0]])
    meths = (list(p.methods) if (args.suite or args.method == "all")
             else _names(args.method, "--method") if args.method else [p.default_method])
    try:
        for d in datas:
            p.check_data(d)
        for m in meths:
            p.method(m)
        if (len(datas) == 1 and len(meths) == 1) or not p.pairs(meths, datas):
            p.check(meths[0], datas[0])
    except ValueError as e:
        others = [q.name for q in protocols_mod.PROTOCOLS.values()
                  if q is not p and all(d in q.datasets for d in datas)
                  and (args.method is None or all(m in q.methods for m in meths))]
        _fail(str(e) + (f"; it is in --protocol {others[0]}" if others else ""))
    if args.seed is not None:
        try:
            seeds = [int(x) for x in str(args.seed).split(",")]
        except ValueError:
            _fail(f"--seed must be an integer or a comma-separated list, got {args.seed!r}")
    else:
        seeds = [p.seeds[0]] if args.quick else (list(p.seeds) if args.suite else [p.seeds[0]])
    long = getattr(args, "long", False)
    if long and p.long_steps is None:
        _fail(f"the {p.name} protocol has no --long budget")

    def budget(m: str, d: str) -> int:
        if args.steps or args.quick:
            return args.steps or QUICK_STEPS
        return p.long_budget(m, d) if long else p.budget(m, d)
    steps = {d: max(budget(m, d) for m in meths) for d in datas}
    dtype = DTYPES[args.dtype]
    every = getattr(args, "eval_every", None)
    which = getattr(args, "impl", "lipkernels") or "lipkernels"
    impls = ["lipkernels", "plain"] if which == "both" else [which]
    tasks = [dict(method=m, data=d, steps=budget(m, d), seed=seed, backend=args.backend, dtype=dtype,
                  protocol=p.name, eval_every=every or max(1, budget(m, d) // EVALS),
                  grad_method=getattr(args, "grad_method", "auto"),
                  compile=getattr(args, "compile", False),
                  n_eval=QUICK_DIGITS_EVAL if (args.quick and d == "digits") else None,
                  overrides=_overrides(args), diagnose=getattr(args, "diagnose", False),
                  impl=impl)
             for m, d in p.pairs(meths, datas) for impl in impls for seed in seeds]
    return p, tasks, seeds, steps


def remeasure(r: dict, checkpoint: str) -> dict:
    """A finished 2-D run's metrics computed again, by the current metrics code, from the
    evaluation samples its checkpoint keeps (so a run trained before a metric was added
    reports it too); digits runs and runs without a checkpoint are returned as they are."""
    if r["data"] == "digits" or not os.path.exists(checkpoint):
        return r
    samples = torch.load(checkpoint, weights_only=False)["log"].get("eval_samples")
    if not samples:
        return r
    curve = [dict(c, **metrics_mod.evaluate(r["data"], samples[c["step"]]))
             if c["step"] in samples else c for c in r["curve"]]
    return dict(r, curve=curve, final={k: v for k, v in curve[-1].items() if k not in ("step", "d")})


def _overrides(args) -> dict:
    """The method settings changed on the command line (``--gran-eps``, ``--gran-tau``)."""
    out = {}
    for flag, field in (("gran_eps", "gran_eps"), ("gran_tau", "gran_tau")):
        v = getattr(args, flag, None)
        if v is not None:
            if not v > 0:
                _fail(f"--{flag.replace('_', '-')} must be > 0, got {v}")
            out[field] = v
    return out


def _task_files(task: dict, folder: str):
    extra = "".join(f"-{k}{v:g}" for k, v in sorted((task.get("overrides") or {}).items()))
    if task.get("impl", "lipkernels") != "lipkernels":
        extra += "-" + task["impl"]
    key = f"{task['protocol']}-{task['method']}-{task['data']}-seed{task['seed']}{extra}"
    return os.path.join(folder, key + ".ckpt"), os.path.join(folder, key + ".run.pt")


def _cost(p, task: dict) -> float:
    m = p.method(task["method"])
    double = m.gp_weight is not None or m.wrap is not None
    return task["steps"] * (m.n_critic + 1) * (2 if double else 1) * (20 if task["data"] == "digits" else 1)


def main(args) -> int:
    p, tasks, seeds, steps = plan(args)
    datas = list(steps)
    meths = list(dict.fromkeys(t["method"] for t in tasks))
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
    # Every run checkpoints into DIR/runs/ and leaves its record there when it ends:
    # --resume continues the unfinished runs and reuses the finished ones.
    folder = os.path.join(args.out, "runs")
    os.makedirs(folder, exist_ok=True)
    every = getattr(args, "checkpoint_every", None)
    runs_done: Dict[int, dict] = {}
    for i, task in enumerate(tasks):
        ckpt, record = _task_files(task, folder)
        task.update(checkpoint=ckpt, record=record, checkpoint_every=every if every is not None else CHECKPOINT_EVERY)
        if getattr(args, "resume", False):
            if os.path.exists(record):
                r = torch.load(record, weights_only=False)
                if r["steps"] == task["steps"]:
                    runs_done[i] = remeasure(r, ckpt)
                    print(f"{task['method']:>9} {task['data']:>11} seed {task['seed']}: "
                          f"finished earlier ({r['steps']} steps), reused", flush=True)
        else:
            for f in (ckpt, record):
                if os.path.exists(f):
                    os.remove(f)
    todo = [i for i in range(len(tasks)) if i not in runs_done]
    jobs = max(1, args.jobs or 1)
    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            runs_done[i] = _report(_run_task(dict(tasks[i], progress=True), evaluator))
    else:
        import concurrent.futures
        import multiprocessing
        # Longest first for load balance (a rough cost: D steps, double for a penalty or
        # a normalization's double backward, 20 times for digits).
        order = sorted(todo, key=lambda i: -_cost(p, tasks[i]))
        with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(args.threads or 1,)) as pool:
            futures = {pool.submit(_run_task, tasks[i], evaluator): i for i in order}
            for fut in concurrent.futures.as_completed(futures):
                runs_done[futures[fut]] = _report(fut.result())
    runs = [runs_done[i] for i in range(len(tasks))]
    meta["wall_seconds"] = time.perf_counter() - t_start
    results = {
        "meta": meta, "protocol": p.name, "protocol_title": p.title, "protocol_source": p.source,
        "overrides": _overrides(args),
        "seeds": seeds, "steps": steps, "batch": {d: p.batch[d] for d in datas},
        "methods": {m: {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in p.method(m).__dict__.items() if k != "loss"}
                    for m in meths},
        "data": {d: _data_info(d) for d in datas},
        "digits_classifier": ({"accuracy": evaluator.accuracy, "real_floor": evaluator.real_floor}
                              if evaluator else None),
        "summary": summarize(runs),
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
        "total_seconds": time.perf_counter() - t_start,
    }
    stem = os.path.join(args.out, ("train" if p.name == "small" else p.name) + "-"
                        + datetime.date.today().isoformat() + ("-quick" if args.quick else ""))
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


def _data_info(d: str) -> dict:
    if d == "digits":
        return {"images": 1797, "size": data_mod.IMAGE_SIZE}
    t = data_mod.target(d)
    if isinstance(t, data_mod.SwissRoll):
        return {"sigma": t.sigma, "segments": t.segments}
    return {"centers": t.centers.tolist(), "sigma": t.sigma}


README_BEGIN, README_END = "<!-- train:results -->", "<!-- /train:results -->"


def readme_markers(protocol: str = "small"):
    """The README's markers of a protocol's results block (the small protocol's are
    ``<!-- train:results -->``, another's ``<!-- train:<protocol> -->``)."""
    if protocol == "small":
        return README_BEGIN, README_END
    return f"<!-- train:{protocol} -->", f"<!-- /train:{protocol} -->"


def update_readme(results_path: str, readme: Optional[str] = None) -> None:
    """Put the tables of the results file ``results_path`` (and its samples PNG) into
    README.md between its protocol's markers (:func:`readme_markers`)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = readme or os.path.join(repo, "README.md")
    with open(results_path) as f:
        results = json.load(f)
    begin, end = readme_markers(results.get("protocol", "small"))
    stem = os.path.splitext(results_path)[0]
    rel = os.path.relpath(stem, os.path.dirname(os.path.abspath(readme)))
    picture = rel + "-samples.png" if os.path.exists(stem + "-samples.png") else None
    block = (f"{begin}\n`{rel}.json` (`{rel}.md`; curves `{rel}-curves.png`)\n\n"
             + markdown(results, picture) + end)
    with open(readme) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
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
