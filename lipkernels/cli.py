"""The ``lipkernels`` command; ``USAGE`` is what ``lipkernels --help`` prints."""
from __future__ import annotations

USAGE = """\
The lipkernels command.

    lipkernels info     versions, the compiled library, and every backend: available or why not
    lipkernels check    every available backend against the reference on random inputs
                        (float64, float32, float16, bfloat16; every op, clip_ included)
    lipkernels bench    the benchmark suite (--quick for a smoke run, --full for more sizes)
    lipkernels train    train the seed papers' GANs with lipkernels (2-D mixtures, digits) and
                        measure them (--suite: every method x data x 3 seeds; --quick: smoke run)

lipkernels COMMAND --help describes a command's options.
"""

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from . import _extension, backends, ops
from ._version import __version__


def _versions() -> Dict[str, str]:
    out = {
        "lipkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
        "CPU threads": str(torch.get_num_threads()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    try:
        import triton  # noqa: F401
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    if torch.cuda.is_available():
        out["GPU"] = torch.cuda.get_device_name()
    return out


def cmd_info(args) -> int:
    print("lipkernels info")
    for key, value in _versions().items():
        print(f"  {key:<14} {value}")
    print(f"  {'library':<14} {_extension.path() or '-'}")
    if _extension.loaded():
        info = _extension.build_info()
        if info.get("cuda"):
            cuda = f"CUDA kernels for {', '.join(_extension.cuda_archs())}"
        elif info.get("cuda_emulation"):
            emu = json.loads(torch.ops.lipkernels_cuda_emu._emu_info())
            cuda = ("CUDA kernels emulated on the CPU ("
                    + (emu["sanitizer"] or ("traffic counted" if emu["traffic_counted"] else "plain")) + ")")
        else:
            cuda = "no CUDA kernels"
        print(f"  {'compiled':<14} CPU kernels (OpenMP: {'yes' if info.get('openmp') else 'no'}); {cuda}")
        if not info.get("cuda") and not info.get("cuda_emulation"):
            print(f"  {'no CUDA':<14} {_extension.cuda_reason()}")
        cached = torch.ops.lipkernels._cpu_output_cache_bytes()
        print(f"  {'output cache':<14} {cached / 2**20:.1f} MiB held")
    else:
        print(f"  {'compiled':<14} not loaded: {_extension.error()}")
    print("backends (auto order: cpu tensors -> "
          + ", ".join(backends.AUTO_ORDER["cpu"]) + "; cuda tensors -> "
          + ", ".join(backends.AUTO_ORDER["cuda"]) + ")")
    for name in backends.BACKENDS:
        print(f"  {name:<10} {backends.describe(name)}")
    return 0


# ---------------------------------------------------------------- check

def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# Largest accepted max rel err of each dtype. float64 and float32 are compared with the
# reference run in the same dtype; float16 and bfloat16 with the reference run in float64
# on the same (rounded) inputs: the backends accumulate in float32 and round once, so
# their error is a few units of the dtype's last place.
CHECK_LIMITS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
HALF = (torch.float16, torch.bfloat16)


def _cases(device: torch.device, dtype: torch.dtype) -> List[Tuple[str, Callable]]:
    """(name, make) with make(cast) -> list of tensors whose values and gradients are
    compared; cast maps each input (of ``dtype``) to the dtype the run computes in."""
    g0 = torch.randn(6, 3, 7, 5, device=device).to(dtype)
    f0 = torch.randn(6, device=device).to(dtype)
    shapes = [(16, 3, 3, 3), (1, 40), (9, 4, 2, 2)]
    w0 = [torch.randn(s, device=device).to(dtype) for s in shapes]
    u0 = [torch.nn.functional.normalize(torch.randn(s[0], device=device), dim=0).to(dtype) for s in shapes]
    v0 = [torch.nn.functional.normalize(torch.randn(torch.Size(s[1:]).numel(), device=device), dim=0).to(dtype)
          for s in shapes]
    # clip_: a contiguous tensor, a transposed one (the multi-tensor path and the other)
    c0 = [torch.randn(5, 7, device=device).to(dtype), torch.randn(4, 3, device=device).to(dtype).t()]

    def per_sample(fn):
        def make(cast):
            g = cast(g0).requires_grad_(True)
            f = cast(f0).requires_grad_(True)
            out = fn(f, g)
            grads = torch.autograd.grad(out.sum(), (f, g), allow_unused=True)
            return [out] + [x for x in grads if x is not None]
        return make

    def spectral(training, n):
        def make(cast):
            ws = [cast(w).requires_grad_(True) for w in w0]
            us = [cast(u) for u in u0]
            vs = [cast(v) for v in v0]
            out = ops.spectral_normalize(ws, us, vs, n, 1e-12, training)
            seeds = [torch.ones_like(o).cumsum(-1) for o in out]
            grads = torch.autograd.grad(out, ws, seeds)
            return list(out) + list(grads) + us + vs
        return make

    def power_iteration(n):
        def make(cast):
            us = [cast(u) for u in u0]
            vs = [cast(v) for v in v0]
            sigmas = ops.power_iteration([cast(w) for w in w0], us, vs, n, 1e-12)
            return [sigmas] + us + vs
        return make

    def clip(make_cast):
        ts = [make_cast(t) for t in c0]
        ops.clip_(ts, 0.5)
        return ts

    return [
        ("sample_norm", per_sample(lambda f, g: ops.sample_norm(g))),
        ("gn_normalize", per_sample(ops.gn_normalize)),
        ("gran_normalize", per_sample(lambda f, g: ops.gran_normalize(f, g, 1e-3))),
        ("gradient_penalty", per_sample(lambda f, g: ops.gradient_penalty(g))),
        ("r1_penalty", per_sample(lambda f, g: ops.r1_penalty(g))),
        ("power_iteration", power_iteration(2)),
        ("spectral_normalize train", spectral(True, 2)),
        ("spectral_normalize eval", spectral(False, 1)),
        ("clip_", clip),
    ]


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with t's strides (clip_ is checked on a transposed tensor too)."""
    return t.clone()


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).clone()


def cmd_check(args) -> int:
    rows = []
    failed = False
    for name in backends.available_backends():
        if name == "reference":
            continue
        device = torch.device("cuda" if name in ("cuda", "triton") and torch.cuda.is_available()
                              else "cpu")
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for op, make in _cases(device, dtype):
                with backends.use_backend("reference"):
                    expected = make(_float64 if dtype in HALF else _copy)
                with backends.use_backend(name):
                    actual = make(_copy)
                ok = all(a.dtype == e.dtype or dtype in HALF for a, e in zip(actual, expected))
                err = max(_max_rel(a, e) for a, e in zip(actual, expected))
                ok &= err <= CHECK_LIMITS[dtype] and all(bool(torch.isfinite(a).all()) for a in actual)
                failed |= not ok
                rows.append((op, name, str(dtype).replace("torch.", ""), f"{err:.2e}", "ok" if ok else "FAIL"))
    header = ("op", "backend", "dtype", "max rel err", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if not rows:
        print("no compiled backend is available:", backends.backend_status())
    limits = ", ".join(f"{str(d).replace('torch.', '')} {v:g}" for d, v in CHECK_LIMITS.items())
    print("max rel err: the largest |backend - reference| over the largest |reference| of each "
          "output, gradient and updated vector; float16/bfloat16 against the reference computed "
          f"in float64 on the same inputs; limits: {limits}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    if args.gpu_model:
        from .benchmark import gpu_model
        out = None if args.no_save else os.path.join(args.output or os.path.join("bench", "results"),
                                                     "gpu-model-" + datetime.date.today().isoformat() + ".json")
        if out:
            os.makedirs(os.path.dirname(out), exist_ok=True)
        return gpu_model.main(["--out", out] if out else [])
    from . import benchmark
    return benchmark.main(args)


def cmd_train(args) -> int:
    if args.figure:
        if args.protocol != "wgangp-toy":
            raise SystemExit("lipkernels train: --figure 1a / 1b are the WGAN-GP paper's: "
                             "use --protocol wgangp-toy")
        from .train import figures
        return figures.main(args)
    from .train import runner
    return runner.main(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lipkernels", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled library, backends").set_defaults(fn=cmd_info)
    sub.add_parser("check", help="every backend against the reference",
                   description="Every available backend against the reference on random inputs: "
                               "each op's outputs, gradients and updated vectors in float64, "
                               "float32, float16 and bfloat16.").set_defaults(fn=cmd_check)
    bench = sub.add_parser("bench", help="the benchmark suite: ops, training steps, bandwidth", allow_abbrev=False)
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: small sizes, few rounds")
    size.add_argument("--short", action="store_true",
                      help="two shapes, two discriminators, few rounds (make gpu-check's GPU rows)")
    size.add_argument("--full", action="store_true", help="more sizes and rounds")
    bench.add_argument("--only", help="only cases whose name or kind contains this text")
    bench.add_argument("--output", help="folder of the results file (default bench/results under the "
                            "current directory)")
    bench.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    bench.add_argument("--no-save", action="store_true", help="print the table only")
    bench.add_argument("--gpu-model", action="store_true",
                       help="instead: what each GPU kernel will cost, counted without a GPU (a model, "
                            "not a measurement; needs the emulation build, make build/emu/liblipkernels.so)")
    bench.set_defaults(fn=cmd_bench)
    train = sub.add_parser(
        "train", help="train the seed papers' GANs end to end with lipkernels",
        description="Train a GAN method of the seed papers on a data set that needs no download, "
                    "with lipkernels' layers and penalties, and measure it (README: Training). "
                    "Writes DIR/train-<date>.json (results, provenance), .md (table) and PNGs.")
    train.add_argument("--protocol", default="small",
                       help="small (lipkernels' own: ring8, grid25, digits; every method), "
                            "wgangp-toy (the WGAN-GP paper's toy experiment, its official settings: "
                            "8gaussians, 25gaussians, swissroll; wgangp, wgan) or pacgan (PacGAN's "
                            "mode-collapse experiment, its official code's settings: ring8, grid25) "
                            "(default small)")
    train.add_argument("--method", default=None,
                       help="small: nsgan, wgan, wgangp, sngan, gngan, gngan-fo, grand, granc, sagan, sagan-noattn (digits); "
                            "wgangp-toy: wgangp, wgan; pacgan: nsgan, pacgan2, pacgan3, pacgan4, "
                            "wgan, wgangp, sngan, gngan, grand, granc; a comma-separated list of "
                            "them, or all (default gngan / wgangp / nsgan)")
    train.add_argument("--data", default=None,
                       help="small: ring8, grid25, digits; wgangp-toy: 8gaussians, 25gaussians, "
                            "swissroll; pacgan: ring8, grid25; a comma-separated list of them, or "
                            "all (default: the protocol's first)")
    train.add_argument("--steps", type=int, default=None,
                       help="generator steps (default: the protocol's budget: small 2000 for the "
                            "2-D data, 400 for digits; wgangp-toy 2000; pacgan 5 epochs: 5000 D "
                            "steps, 1000 generator steps for the 5-critic-step methods)")
    train.add_argument("--long", action="store_true",
                       help="the protocol's long budget, of the committed runs (wgangp-toy: wgangp "
                            "5000 generator steps on 8gaussians, 8000 on 25gaussians, 2000 on "
                            "swissroll; wgan 2000 on each; pacgan: 10 epochs, 10000 D steps)")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted runs of this command from their checkpoints "
                            "in DIR/runs/ and reuse the finished ones (also: more --steps continue "
                            "a finished run)")
    train.add_argument("--checkpoint-every", type=int, default=None,
                       help="generator steps between checkpoints (default 500)")
    train.add_argument("--eval-every", type=int, default=None,
                       help="generator steps between metric evaluations (default: 10 per run)")
    train.add_argument("--impl", choices=["lipkernels", "plain", "both"], default="lipkernels",
                       help="train with lipkernels, with the plain-PyTorch twin (torch's spectral "
                            "norm, the papers' formulas written out), or both side by side "
                            "(default lipkernels)")
    train.add_argument("--gran-eps", type=float, default=None,
                       help="GraN's eps instead of the method's 1e-4 (a deliberate change, "
                            "recorded in the results)")
    train.add_argument("--gran-tau", type=float, default=None,
                       help="GraN's tau instead of the method's 1 (as --gran-eps)")
    train.add_argument("--diagnose", action="store_true",
                       help="at each evaluation also record the discriminator's median output, "
                            "input-gradient norm and normalized output on real and fake data")
    train.add_argument("--figure", choices=["1a", "1b"], default=None,
                       help="with --protocol wgangp-toy: the paper's Figure 1(a) (critics trained "
                            "against a fixed generator, value surfaces) or 1(b) (gradient norms "
                            "of a 12-layer critic per layer, clipping vs GP) instead of training")
    train.add_argument("--backend", default="auto",
                       help="lipkernels backend: auto, reference, cpu, cuda, triton (default auto)")
    train.add_argument("--seed", default=None,
                       help="a seed or a comma-separated list (default: 0; the protocol's seeds "
                            "with --suite: small 0, 1, 2)")
    train.add_argument("--suite", action="store_true",
                       help="every method x data set x seeds 0, 1, 2 (sized for under 30 minutes on "
                            "2 idle cores with --jobs 2)")
    train.add_argument("--quick", action="store_true",
                       help="smoke run: a few steps, one seed (with --suite: every method x data)")
    train.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                       help="dtype of the networks and data (default float32)")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads per run (default 1)")
    train.add_argument("--jobs", type=int, default=1,
                       help="runs trained at once, in worker processes (default 1; the suite's "
                            "30-minute budget assumes --jobs 2 on two idle cores)")
    train.add_argument("--out", default=os.path.join("bench", "results", "train"),
                       help="output folder (default bench/results/train under the current directory)")
    train.add_argument("--no-plot", action="store_true", help="do not write PNGs")
    train.add_argument("--grad-method", choices=["auto", "double_backward", "jvp"], default="auto",
                       help="how GP, GN and GraN differentiate the input gradient: a double "
                            "backward, or the reverse-over-forward JVP (auto: JVP when compiled)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile(fullgraph=True) the D and G losses of every step")
    train.set_defaults(fn=cmd_train)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
