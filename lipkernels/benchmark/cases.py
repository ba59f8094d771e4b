"""What the benchmark measures: cases, each with a baseline and the implementations
compared against it, built for one device and preset.

* spectral norm of whole discriminators (SNGAN CNN, SNGAN/GN-GAN ResNet, BigGAN-scale):
  power iteration alone, the training-mode forward (iteration + W_sn), and forward +
  backward; baseline ``torch.nn.utils.parametrizations.spectral_norm`` (also under
  ``torch.compile`` where it compiles);
* per-sample norm with the GN, GraN, GP and R1 epilogues, forward and forward +
  backward; baseline the lipkernels reference, plus the formulas as the GN-GAN and
  WGAN-GP code writes them;
* training steps end to end (one discriminator and one generator step) for SNGAN,
  WGAN-GP, GN-GAN and GraN-GAN on the SNGAN CNN architecture;
* JVP steps: the WGAN-GP D step and the GN-GAN D and G steps (loss and its gradients)
  on the SNGAN CNN and ResNet discriminators with spectral norm, by a double backward
  (plain PyTorch, the baseline; lipkernels) and by the reverse-over-forward JVP
  (lipkernels eager, and under ``torch.compile``; on CUDA also its CUDA-graph replay),
  with the peak memory of each.

``bytes`` is the traffic docs/math.md's cost model says a call must move (0 where it does
not apply); achieved bandwidth is bytes / median time.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .. import backends, losses, models
from ..nn import GradNorm, GraN, SpectralNormGroup, gradient_penalty, spectral_norm
from ..ops import gn_normalize, gradient_penalty as gp_op, gran_normalize, r1_penalty

Factory = Callable[[], Callable[[], object]]


@dataclasses.dataclass
class Case:
    kind: str                 # "spectral norm" | "per-sample" | "train step" | "JVP step"
    name: str
    shape: str
    baseline: str
    impls: Dict[str, Factory]
    bytes: int = 0
    # backend -> its calibration rows (floor, kernel ops, empty kernel ops): the per-call
    # overhead of the backend's row, op / (floor + kernels), is computed from them
    calibrates: Dict[str, tuple] = dataclasses.field(default_factory=dict)
    # measure each implementation's peak memory (benchmark/memory.py) too
    memory: bool = False


@dataclasses.dataclass
class Preset:
    name: str
    sn_models: List[str]
    per_sample_shapes: List[tuple]
    batch: int
    gan_channels: Optional[tuple]   # None: the real SNGAN CNN widths
    budget_s: float     # seconds of calls per case and regime: sets the rounds ...
    min_rounds: int     # ... within these bounds (6 or more: a 95% interval of the median;
                        # the quick preset's 3 give a 75% one, which its table says)
    max_rounds: int
    warmup: int         # rounds before the timed ones
    attempts: int       # measurements of a case at most (re-measured while unstable) ...
    remeasure_share: float  # ... while re-measuring has taken less than this share of the
                            # first measurements' time (+ 30 s)
    compile_baseline: bool
    copy_megabytes: int


def preset(name: str, device: torch.device) -> Preset:
    gpu = device.type == "cuda"
    if name == "quick":
        return Preset("quick", ["sngan_cnn", "resnet"], [(64, 3, 32, 32)], 2, (8, 16, 16, 32),
                      budget_s=0.0, min_rounds=3, max_rounds=3, warmup=1, attempts=1,
                      remeasure_share=0.0, compile_baseline=False, copy_megabytes=64)
    if name == "short":   # make gpu-check's GPU rows: two shapes, two discriminators, under a minute
        return Preset("short", ["sngan_cnn", "resnet"], [(64, 3, 32, 32), (256, 3, 128, 128)],
                      64 if gpu else 16, None, budget_s=0.1, min_rounds=9, max_rounds=100,
                      warmup=3 if gpu else 1, attempts=2, remeasure_share=0.25, compile_baseline=False,
                      copy_megabytes=1024 if gpu else 256)
    if name == "default":
        shapes = [(64, 3, 32, 32), (64, 128, 16, 16), (256, 3, 128, 128)]
        return Preset("default", ["sngan_cnn", "resnet", "biggan"], shapes, 64 if gpu else 16, None,
                      budget_s=1.0 if gpu else 0.5, min_rounds=15 if gpu else 9,
                      max_rounds=500 if gpu else 200, warmup=5 if gpu else 1, attempts=3,
                      remeasure_share=0.5, compile_baseline=True, copy_megabytes=1024 if gpu else 256)
    if name == "full":
        shapes = [(64, 3, 32, 32), (64, 128, 16, 16), (8, 3, 256, 256), (256, 3, 128, 128)]
        return Preset("full", ["sngan_cnn", "resnet", "biggan"], shapes, 64, None,
                      budget_s=5.0 if gpu else 3.0, min_rounds=51 if gpu else 21,
                      max_rounds=2000 if gpu else 1000, warmup=10 if gpu else 3, attempts=3,
                      remeasure_share=1.0, compile_baseline=True, copy_megabytes=2048 if gpu else 512)
    raise ValueError(f"unknown preset {name!r}: quick, short, default or full")


def compiled_backends(device: torch.device) -> List[str]:
    """The lipkernels backends to measure on this device (the Triton interpreter is a
    correctness tool, not a speed one)."""
    out = []
    for name in backends.available_backends():
        if name == "reference" or (name == "triton" and device.type != "cuda"):
            continue
        if name in ("cuda", "triton") and device.type != "cuda":
            continue
        if name == "cpu" and device.type != "cpu":
            continue
        out.append(name)
    return out


def _with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with backend ``name`` selected during each call. The switch is timed with the
    call, for every implementation alike: it is backends.swap (about 0.1 us) rather than
    the use_backend context manager (about 1 us, which at 0.04 ms per call would take 2%
    off every speedup)."""
    backends._check_name(name)  # once, here

    def call():
        previous = backends.swap(name)
        try:
            return fn()
        finally:
            backends.swap(previous)
    return call


# ------------------------------------------------------------------ spectral norm

_SN_MODELS = {
    "sngan_cnn": ("SNGAN CNN D", lambda norm: models.sngan_cnn_discriminator(norm=norm)),
    "resnet": ("ResNet CIFAR-10 D", lambda norm: models.resnet_discriminator(norm=norm)),
    "biggan": ("BigGAN-scale D", lambda norm: models.biggan_discriminator(norm=norm)),
}


class _Weights(nn.Module):
    """A discriminator's normalized weights: its forward is the spectral-norm work of one
    discriminator forward, without the convolutions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(m for m in model.modules()
                                    if isinstance(m, (nn.Conv2d, nn.Linear)))

    def forward(self):
        return [m.weight for m in self.layers]


def _sn_model(key: str, norm, device, cache: Dict[str, _Weights]) -> _Weights:
    """The layers of discriminator ``key`` with ``norm`` applied to each, on ``device``.
    The plain layers are built once per ``cache`` (initializing a BigGAN-scale model takes
    seconds) and copied for each implementation."""
    if key not in cache:
        torch.manual_seed(0)
        cache[key] = _Weights(_SN_MODELS[key][1](None))
    model = copy.deepcopy(cache[key])
    torch.manual_seed(0)
    if norm is not None:
        for layer in model.layers:
            norm(layer)
    return model.to(device)


def spectral_norm_cases(p: Preset, device: torch.device) -> List[Case]:
    cases = []
    cache: Dict[str, _Weights] = {}
    for key in p.sn_models:
        label = _SN_MODELS[key][0]
        if p.name == "quick" and key == "biggan":
            continue
        probe = _sn_model(key, None, device, cache)
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in probe.layers)
        n_layers = len(probe.layers)
        shape = f"{n_layers} layers, {weight_bytes / 2**20:.1f} MiB"
        del probe

        def torch_sn(mode, compiled=False, key=key):
            def build():
                model = _sn_model(key, torch.nn.utils.parametrizations.spectral_norm, device, cache)
                return _sn_call(model, mode, compiled)
            return build

        def lk_sn(backend, mode, group=False, key=key):
            def build():
                model = _sn_model(key, spectral_norm, device, cache)
                if group:
                    SpectralNormGroup(model)
                return _with_backend(backend, _sn_call(model, mode, False))
            return build

        def lk_power_iteration(backend, key=key):
            def build():
                model = _sn_model(key, spectral_norm, device, cache)
                from ..ops import power_iteration
                ws = [m.parametrizations.weight.original for m in model.layers]
                us = [m.parametrizations.weight[0]._u for m in model.layers]
                vs = [m.parametrizations.weight[0]._v for m in model.layers]
                return _with_backend(backend, lambda: power_iteration(ws, us, vs, 1))
            return build

        names = compiled_backends(device)
        impls = {"reference": lk_power_iteration("reference")}
        impls.update({b: lk_power_iteration(b) for b in names})
        cases.append(Case("spectral norm", f"power_iteration {label}", shape, "reference", impls,
                          bytes=weight_bytes))
        for mode, traffic in (("fwd", 3), ("fwd+bwd", 7)):
            impls = {"torch spectral_norm": torch_sn(mode)}
            if p.compile_baseline:
                impls["torch spectral_norm, compiled"] = torch_sn(mode, compiled=True)
            impls["reference"] = lk_sn("reference", mode)
            for b in names:
                impls[b] = lk_sn(b, mode)
                impls[f"{b} SpectralNormGroup"] = lk_sn(b, mode, group=True)
            cases.append(Case("spectral norm", f"spectral_normalize {mode} {label}", shape,
                              "torch spectral_norm", impls, bytes=traffic * weight_bytes))
    return cases


def _sn_call(model: _Weights, mode: str, compiled: bool) -> Callable[[], object]:
    forward = torch.compile(model) if compiled else model
    params = [p for p in model.parameters()]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return forward()
        return call
    grads = [torch.randn_like(w) for w in model()]

    def call():
        for p in params:
            p.grad = None
        torch.autograd.backward(forward(), grads)
    return call


# ------------------------------------------------------------------ per-sample norm

_PER_SAMPLE = {
    "gn": lambda f, g: gn_normalize(f, g),
    "gran": lambda f, g: gran_normalize(f, g, 1e-4),
    "gp": lambda f, g: gp_op(g, 1.0),
    "r1": lambda f, g: r1_penalty(g),
}
# As the papers' code writes them (no edge-case guards).
_PLAIN = {
    "gn": lambda f, g: f / (torch.flatten(g, 1).norm(2, dim=1) + f.abs()),
    "gp": lambda f, g: ((g.view(g.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean(),
}


# Per-call overhead (docs/math.md section 12): beside a C++ backend's op, at the first
# (smallest) shape, forward + backward, three calibration rows timed in the same run:
#   floor: the same public op of the lipkernels_floor namespace, the same dispatch and
#     autograd with kernel ops that only allocate their outputs, called the same way;
#   kernel ops: the op's forward and backward kernel ops called directly;
#   kernel ops, empty: the same calls into the floor's kernel ops.
# kernels = kernel ops - kernel ops, empty (the kernels' own time), and the overhead
# ratio of the op is op / (floor + kernels): 1 means no cost beyond an empty C++
# autograd op and the kernels.
CALIBRATION = ("floor (empty kernels)", "kernel ops", "kernel ops, empty")
# op -> (public op, epilogue, its parameter, takes f)
_KERNEL_CALLS = {"gn": ("gn_normalize", "gn", 0.0, True), "gran": ("gran_normalize", "gran", 1e-4, True),
                 "gp": ("gradient_penalty", "gp", 1.0, False), "r1": ("r1_penalty", "r1", 0.0, False)}


def calibration_names(backend: str) -> tuple:
    return tuple(f"{backend}: {what}" for what in CALIBRATION)


def _per_sample_inputs(shape, device: torch.device, grad: bool):
    """(f, g) of a per-sample case: the same values for every implementation."""
    torch.manual_seed(0)
    g = torch.randn(shape, device=device, requires_grad=grad)
    f = torch.randn(shape[0], device=device, requires_grad=grad)
    return f, g


def _calibration(op: str, shape: tuple, device: torch.device) -> Dict[str, Factory]:
    public, epilogue, param, takes_f = _KERNEL_CALLS[op]
    floor_ns, main_ns = torch.ops.lipkernels_floor, torch.ops.lipkernels

    def floor():
        f, g = _per_sample_inputs(shape, device, True)
        args = ((f, g) if takes_f else (g,)) + ((param,) if op in ("gran", "gp") else ())
        inputs = (f, g) if takes_f else (g,)
        fn = getattr(floor_ns, public)
        return lambda: torch.autograd.grad(fn(*args).sum(), inputs)

    def kernels(ns):
        def factory():
            f, g = _per_sample_inputs(shape, device, False)
            fo = f if takes_f else None
            go = torch.ones(shape[0], device=device)

            def call():
                _, norm = ns._norm_epilogue(g, fo, epilogue, param)
                return ns._norm_epilogue_backward(go, g, fo, norm, epilogue, param)
            return call
        return factory
    return dict(zip(CALIBRATION, (floor, kernels(main_ns), kernels(floor_ns))))


def per_sample_cases(p: Preset, device: torch.device) -> List[Case]:
    cases = []
    names = compiled_backends(device)
    for shape in p.per_sample_shapes:
        nbytes = torch.Size(shape).numel() * 4
        for op, fn in _PER_SAMPLE.items():
            for mode, traffic in (("fwd", 1), ("fwd+bwd", 3)):
                def build(backend, formula, mode=mode, shape=shape, op=op):
                    def factory():
                        f, g = _per_sample_inputs(shape, device, mode == "fwd+bwd")
                        inputs = (f, g) if op in ("gn", "gran") else (g,)

                        def call():
                            if mode == "fwd":
                                with torch.no_grad():
                                    return formula(f, g)
                            return torch.autograd.grad(formula(f, g).sum(), inputs)
                        return _with_backend(backend, call)
                    return factory

                impls = {"reference": build("reference", fn)}
                impls.update({b: build(b, fn) for b in names})
                if op in _PLAIN:
                    impls["plain PyTorch (paper code)"] = build("reference", _PLAIN[op])
                calibrates = {}
                if mode == "fwd+bwd" and shape == p.per_sample_shapes[0]:
                    for b in names:
                        if b in ("cpu", "cuda") and hasattr(torch.ops.lipkernels_floor, "gn_normalize"):
                            found = _calibration(op, tuple(shape), device)
                            calibrates[b] = calibration_names(b)
                            impls.update(zip(calibrates[b], found.values()))
                cases.append(Case("per-sample", f"{op} {mode}", str(tuple(shape)), "reference",
                                  impls, bytes=traffic * nbytes, calibrates=calibrates))
    return cases


# ------------------------------------------------------------------ training steps

def _gan(method: str, p: Preset, device: torch.device, sn: Callable):
    torch.manual_seed(0)
    kw = {} if p.gan_channels is None else {"channels": p.gan_channels}
    norm = sn if method == "sngan" else None
    D = models.sngan_cnn_discriminator(norm=norm, **kw).to(device)
    gkw = {} if p.gan_channels is None else {"channels": tuple(reversed(p.gan_channels))}
    G = models.sngan_cnn_generator(**gkw).to(device)
    if method == "gngan":
        D = GradNorm(D)
    elif method == "gran":
        D = GraN(D, tau=1.0)
    return D, G


def train_step_cases(p: Preset, device: torch.device) -> List[Case]:
    cases = []
    names = compiled_backends(device)
    batch = p.batch
    for method, label in (("sngan", "SNGAN (hinge)"), ("wgangp", "WGAN-GP"), ("gngan", "GN-GAN"),
                          ("gran", "GraN-GAN")):
        def build(backend, sn=spectral_norm, group=False, method=method):
            def factory():
                D, G = _gan(method, p, device, sn)
                if group:
                    SpectralNormGroup(D)
                opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.0, 0.9))
                opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.9))
                real = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
                loss = losses.hinge if method == "sngan" else (
                    losses.wasserstein if method == "wgangp" else losses.nonsaturating)

                def call():
                    z = torch.randn(batch, 128, device=device)
                    fake = G(z)
                    d_loss = loss.d(D(real), D(fake.detach()))
                    if method == "wgangp":
                        d_loss = d_loss + gradient_penalty(D, real, fake, 10.0)
                    opt_d.zero_grad(set_to_none=True)
                    d_loss.backward()
                    opt_d.step()
                    g_loss = loss.g(D(G(z)))
                    opt_g.zero_grad(set_to_none=True)
                    g_loss.backward()
                    opt_g.step()
                return _with_backend(backend, call)
            return factory

        impls = {"reference": build("reference")}
        if method == "sngan":
            impls["torch spectral_norm"] = build("reference", torch.nn.utils.parametrizations.spectral_norm)
        for b in names:
            impls[b] = build(b, group=method == "sngan")
        cases.append(Case("train step", f"D+G step {label}", f"batch {batch}, SNGAN CNN", "reference",
                          impls))
    return cases


# ------------------------------------------------------------------ JVP steps

_JVP_DS = {
    "SNGAN CNN D": lambda norm, p: models.sngan_cnn_discriminator(
        norm=norm, **({} if p.gan_channels is None else {"channels": p.gan_channels})),
    "ResNet CIFAR-10 D": lambda norm, p: models.sngan_resnet_discriminator(
        norm=norm, **({} if p.gan_channels is None else {"width": p.gan_channels[0]})),
}


def _plain_gp(D, real, fake, alpha):
    """WGAN-GP's penalty as its official code writes it (double backward)."""
    a = alpha.view(-1, 1, 1, 1)
    x = (a * real + (1 - a) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return 10.0 * ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def _plain_gn(D, x):
    """GN-GAN's f / (||grad f|| + |f|) as its official code writes it."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    f = D(x).flatten()
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=True)
    n = g.flatten(1).norm(2, dim=1)
    return f / (n + f.abs())


def _jvp_losses(step: str, D, method: Optional[str]):
    """The loss of the step as a function of (real, fake, alpha, x): ``method`` None is
    plain PyTorch (D with torch's spectral_norm), else lipkernels' with that method."""
    if step == "GP D step":
        if method is None:
            return lambda real, fake, alpha, x: (D(fake).mean() - D(real).mean()
                                                 + _plain_gp(D, real, fake, alpha))
        return lambda real, fake, alpha, x: (
            losses.wasserstein.d(D(real), D(fake))
            + gradient_penalty(D, real, fake, 10.0, alpha=alpha, method=method))
    if method is None:
        def gn(x):
            return _plain_gn(D, x)
    else:
        gnd = GradNorm(D, method=method)

        def gn(x):
            return gnd(x).flatten()
    if step == "GN D step":
        def d_step(real, fake, alpha, x):
            out = gn(torch.cat([real, fake]))
            half = real.shape[0]
            return losses.nonsaturating.d(out[:half], out[half:])
        return d_step
    return lambda real, fake, alpha, x: losses.nonsaturating.g(gn(x))


def jvp_step_cases(p: Preset, device: torch.device) -> List[Case]:
    """The D and G steps that differentiate an input gradient, by each method (module
    docstring). The G step's input is a leaf that requires grad, standing in for G(z)
    (the generator's own cost is not what differs); D's weights are frozen there."""
    batch = 64 if p.gan_channels is None else p.batch
    names = compiled_backends(device)
    if not names:
        return []
    backend = names[0]
    cases = []
    # quick and short (make gpu-check's time box): one case, every implementation (each
    # compiled implementation compiles for tens of seconds)
    few = p.name in ("quick", "short")
    for arch, make in list(_JVP_DS.items())[:1 if few else None]:
        for step in ("GP D step",) if few else ("GP D step", "GN D step", "GN G step"):
            def build(kind, step=step, make=make):
                def factory():
                    torch.manual_seed(0)
                    if kind == "plain":
                        D = make(torch.nn.utils.parametrizations.spectral_norm, p).to(device)
                    else:
                        D = make(spectral_norm, p).to(device)
                        SpectralNormGroup(D)
                    g_step = step == "GN G step"
                    D.requires_grad_(not g_step)
                    real = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
                    fake = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
                    alpha = torch.rand(batch, device=device)
                    x = fake.clone().requires_grad_(True)
                    method = {"plain": None, "double": "double_backward"}.get(kind, "jvp")
                    loss = _jvp_losses(step, D, method)
                    if kind in ("compiled", "graphs"):
                        loss = torch.compile(loss, fullgraph=True,
                                             mode="reduce-overhead" if kind == "graphs" else None)
                    wrt = [x] if g_step else list(D.parameters())

                    def call():
                        value = loss(real, fake, alpha, x)
                        value.backward()
                        for t in wrt:
                            t.grad = None
                        return value
                    return _with_backend(backend, call) if kind != "plain" else call
                return factory

            impls = {"plain PyTorch, double backward": build("plain"),
                     f"{backend}, double backward": build("double"),
                     f"{backend}, JVP": build("jvp"),
                     f"{backend}, JVP compiled": build("compiled")}
            if device.type == "cuda":
                impls[f"{backend}, JVP compiled, CUDA graphs"] = build("graphs")
            cases.append(Case("JVP step", f"{step} {arch}", f"batch {batch}, float32",
                              "plain PyTorch, double backward", impls, memory=True))
    return cases


def all_cases(p: Preset, device: torch.device) -> List[Case]:
    return (spectral_norm_cases(p, device) + per_sample_cases(p, device)
            + train_step_cases(p, device) + jvp_step_cases(p, device))
