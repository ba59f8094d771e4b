"""The WGAN-GP paper's Figure 1, with lipkernels' clipping and gradient penalty and the
official toy script's settings (``protocols.py``: wgangp-toy).

* **1(a)**, :func:`value_surfaces`: critics trained against a fixed "generator", the real
  data plus unit-variance Gaussian noise (the script's ``FIXED_GENERATOR``), on the three
  toy sets, with weight clipping (c = 0.01, RMSProp 5e-5) and with the gradient penalty
  (lambda = 0.1, Adam(1e-4, 0.5, 0.9)); their value surfaces over the script's plotting
  grid (128 x 128 points on ``[-3, 3]^2``). The paper: clipping's critics are "overly
  simple" functions that miss the data's structure, GP's follow it.
* **1(b)**, :func:`gradient_norms`: the paper's section 3.2: WGAN on the swiss roll with
  12-layer ReLU MLPs (no batch norm) for G and D, clipping at c = 0.1, 0.01, 0.001 and GP;
  the norm of the gradient of the critic loss with respect to the successive layers'
  activations. The paper: with clipping it "either grows or decays exponentially as we
  move farther back in the network", with GP it does not.

Each writes a JSON file (numbers, settings, provenance) and a PNG.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from typing import Dict, List, Optional

import torch
from torch import nn

from . import data as data_mod
from . import methods as methods_mod
from .protocols import TOY_METHODS, TOY_WIDTH, toy_mlp

GRID_POINTS = 128
GRID_RANGE = 3.0
CRITIC_STEPS = 2000        # 1(a): critic steps against the fixed generator
DEEP_LAYERS = 12           # 1(b): ReLU layers of the deep G and D, then a linear output
DEEP_ITERS = 100           # 1(b): generator iterations (each after 5 critic steps)
DEEP_CLIPS = (0.1, 0.01, 0.001)


def _critic_only(method: str, data: str, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    m = TOY_METHODS[method]
    G, D = toy_mlp(2, 2), toy_mlp(2, 1)
    return methods_mod.Trainer(m, G, D, 2, dtype), data_mod.Sampler(data, seed, dtype)


def grid(points: int = GRID_POINTS, extent: float = GRID_RANGE) -> torch.Tensor:
    """The script's plotting grid, ``(points * points, 2)``."""
    axis = torch.linspace(-extent, extent, points)
    return torch.cartesian_prod(axis, axis)


def value_surface(method: str, data: str, steps: int = CRITIC_STEPS, seed: int = 0,
                  batch: int = 256) -> dict:
    """One critic of Figure 1(a): ``steps`` critic steps against real + N(0, 1) noise;
    its values on :func:`grid`, the Wasserstein estimate (minus the critic loss without
    the penalty) over the run, and the input-gradient norms on real, fake and grid
    points at the end."""
    trainer, sampler = _critic_only(method, data, seed)
    estimate: List[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        real = sampler(batch)
        fake = sampler(batch) + torch.randn(batch, 2)
        trainer.d_step(real, fake)
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                estimate.append(float(trainer.D(real).mean() - trainer.D(fake).mean()))
    seconds = time.perf_counter() - t0
    xy = grid()
    with torch.no_grad():
        values = trainer.D(xy).reshape(GRID_POINTS, GRID_POINTS)
    real = sampler(2048)
    fake = sampler(2048) + torch.randn(2048, 2)
    norms = {k: _input_grad_norm(trainer.D, x) for k, x in
             (("real", real), ("fake", fake), ("grid", xy))}
    w = max(1, len(estimate) // 10)
    return {"method": method, "data": data, "steps": steps, "seed": seed,
            "values": [[round(float(v), 5) for v in row] for row in values],
            "estimate_every_10_steps": estimate,
            "estimate_last_tenth": sum(estimate[-w:]) / w,
            "estimate_previous_tenth": sum(estimate[-2 * w:-w]) / w,
            "grad_norm": norms, "seconds": seconds}


def _input_grad_norm(D: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x).sum(), x)
    n = g.norm(dim=1)
    return {"mean": float(n.mean()), "min": float(n.min()), "max": float(n.max())}


# ------------------------------------------------------------------ Figure 1(b)

def _activation_grad_norms(D: nn.Sequential, real: torch.Tensor, fake: torch.Tensor) -> List[float]:
    """``||d L / d a_l||`` for the output ``a_l`` of every linear layer of ``D`` (layer 1
    first, the critic's output last), ``L = mean D(fake) - mean D(real)`` on one batch
    (the penalty is computed on other points and adds nothing here)."""
    acts: List[torch.Tensor] = []
    h = torch.cat([real, fake])
    for layer in D:
        h = layer(h)
        if isinstance(layer, nn.Linear):
            h.retain_grad()
            acts.append(h)
    b = real.shape[0]
    loss = h[b:].mean() - h[:b].mean()
    loss.backward()
    out = [float(a.grad.double().norm()) for a in acts]   # float64: (1e-23)^2 underflows float32
    D.zero_grad(set_to_none=True)
    return out


def gradient_norms(iters: int = DEEP_ITERS, seed: int = 0, width: int = TOY_WIDTH,
                   layers: int = DEEP_LAYERS, batch: int = 256, every: int = 10) -> List[dict]:
    """Figure 1(b): for clipping at each of ``DEEP_CLIPS`` and for GP, a WGAN on the swiss
    roll with ``layers``-layer ReLU MLPs of ``width`` for G and D (the script's init, no
    batch norm), ``iters`` generator iterations; the per-layer activation-gradient norms
    (:func:`_activation_grad_norms`) every ``every`` iterations, on a fresh batch."""
    settings = [("wgan", c) for c in DEEP_CLIPS] + [("wgangp", None)]
    out = []
    for method, c in settings:
        m = TOY_METHODS[method] if c is None else replace(TOY_METHODS[method], clip=c)
        torch.manual_seed(seed)
        G, D = toy_mlp(2, 2, width, layers), toy_mlp(2, 1, width, layers)
        trainer = methods_mod.Trainer(m, G, D, 2)
        sampler = data_mod.Sampler("swissroll", seed)
        history = []
        t0 = time.perf_counter()
        for it in range(iters + 1):
            if it % every == 0 or it == iters:
                with torch.no_grad():
                    fake = G(trainer.z(batch))
                history.append({"iteration": it,
                                "norms": _activation_grad_norms(D, sampler(batch), fake)})
            if it < iters:
                trainer.step([sampler(batch) for _ in range(m.n_critic)])
        out.append({"method": method, "clip": c, "label": _label(method, c),
                    "history": history, "seconds": time.perf_counter() - t0,
                    "finite": all(math.isfinite(x) for h in history for x in h["norms"])})
    return out


def _label(method: str, c: Optional[float]) -> str:
    return "Gradient penalty" if c is None else f"Weight clipping (c = {c:g})"


# ------------------------------------------------------------------ the command

def main(args) -> int:
    from .runner import provenance
    torch.set_num_threads(args.threads or 1)
    meta = provenance({k: v for k, v in vars(args).items() if k != "fn"}, args.backend)
    os.makedirs(args.out, exist_ok=True)
    import datetime
    stem = os.path.join(args.out, f"wgangp-toy-figure{args.figure}-"
                        + datetime.date.today().isoformat() + ("-quick" if args.quick else ""))
    from .. import use_backend
    with use_backend(args.backend):
        if args.figure == "1a":
            steps = args.steps or (3 if args.quick else CRITIC_STEPS)
            runs = []
            for d in data_mod.TOY:
                for meth in ("wgan", "wgangp"):
                    r = value_surface(meth, d, steps, args.seed or 0)
                    print(f"{meth:>7} {d:>11}: {steps} critic steps, {r['seconds']:.0f} s, "
                          f"W estimate {r['estimate_last_tenth']:.4f} (previous tenth "
                          f"{r['estimate_previous_tenth']:.4f}), input-gradient norm on real "
                          f"data {r['grad_norm']['real']['mean']:.3f}", flush=True)
                    runs.append(r)
            results = {"meta": meta, "figure": "1a", "critic_steps": steps, "runs": runs}
            pictures = [] if args.no_plot else [_plot_1a(results, stem)]
        else:
            iters = args.steps or (2 if args.quick else DEEP_ITERS)
            runs = gradient_norms(iters, args.seed or 0)
            for r in runs:
                last = r["history"][-1]["norms"]
                print(f"{r['label']:>28}: layer 1 {last[0]:.3g}, layer {len(last)} {last[-1]:.3g} "
                      f"({r['seconds']:.0f} s)", flush=True)
            results = {"meta": meta, "figure": "1b", "iters": iters, "layers": DEEP_LAYERS,
                       "width": TOY_WIDTH, "runs": runs}
            pictures = [] if args.no_plot else [_plot_1b(results, stem)]
    with open(stem + ".json", "w") as f:
        json.dump(results, f, separators=(",", ":"))
    print("wrote", ", ".join([stem + ".json"] + pictures))
    return 0


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, stem: str) -> str:
    fig.tight_layout()
    path = stem + ".png"
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def _plot_1a(results: dict, stem: str) -> str:
    plt = _pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6), squeeze=False)
    axis = torch.linspace(-GRID_RANGE, GRID_RANGE, GRID_POINTS)
    for j, d in enumerate(data_mod.TOY):
        real = data_mod.Sampler(d, 0)(512)
        for i, meth in enumerate(("wgan", "wgangp")):
            r = next(x for x in runs if x["data"] == d and x["method"] == meth)
            ax = axes[i][j]
            v = torch.tensor(r["values"])
            ax.contour(axis, axis, v.T, levels=20, linewidths=0.8)
            ax.scatter(real[:, 0], real[:, 1], s=2, c="C1")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(d, fontsize=10)
            if j == 0:
                ax.set_ylabel("weight clipping" if meth == "wgan" else "gradient penalty")
    fig.suptitle(f"Critics trained {results['critic_steps']} steps against real data + N(0, 1) "
                 "noise (WGAN-GP paper, Figure 1(a))", fontsize=10)
    return _save(fig, stem)


def _plot_1b(results: dict, stem: str) -> str:
    fig, ax = _pyplot().subplots(figsize=(5.5, 4))
    for r in results["runs"]:
        norms = r["history"][-1]["norms"]
        layers = list(range(1, len(norms) + 1))
        ax.plot(layers, [math.log10(max(n, 1e-300)) for n in norms], marker="o", label=r["label"])
    ax.set_xlabel("discriminator layer (1 = input side)")
    ax.set_ylabel("log10 gradient norm")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.set_title(f"Swiss roll, {results['layers']}-layer ReLU critic, after {results['iters']} "
                 "generator iterations", fontsize=9)
    return _save(fig, stem)
