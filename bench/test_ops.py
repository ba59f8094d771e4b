"""Op benchmarks (issue 2's suite; `lipkernels bench` will grow from it):

* whole-model spectral norm, forward + backward, on the SNGAN CIFAR-10 CNN
  discriminator's weights (MATH.md section 9), against
  ``torch.nn.utils.parametrizations.spectral_norm``;
* GN, GraN and GP forward + backward on per-sample gradients (64, 3, 32, 32) and
  (64, 128, 16, 16), against the plain-PyTorch reference.

Every implementation of a case runs back to back; the summary prints each one's
speedup over the case's baseline (medians).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipkernels
from lipkernels import ops
from lipkernels.models import sngan_cnn_discriminator

COMPILED = [b for b in lipkernels.available_backends() if b != "reference"]


def with_backend(name, fn):
    """fn run with backend ``name`` selected (also when the summary re-runs it)."""
    def call():
        with lipkernels.use_backend(name):
            fn()
    return call


class Weights(nn.Module):
    """A model whose forward is just reading every normalized weight: the spectral-norm
    work of one discriminator forward, without the convolutions."""

    def __init__(self, norm):
        super().__init__()
        d = sngan_cnn_discriminator(norm=norm)
        self.layers = nn.ModuleList(m for m in d if isinstance(m, (nn.Conv2d, nn.Linear)))

    def forward(self):
        return [m.weight for m in self.layers]


def _sn_step(model, grads):
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        torch.autograd.backward(model(), grads)
    return step


SN_IMPLS = ["torch spectral_norm", "lipkernels reference"] + \
    [f"lipkernels {b}" for b in COMPILED] + [f"lipkernels {b} SpectralNormGroup" for b in COMPILED]


@pytest.mark.parametrize("impl", SN_IMPLS)
def test_spectral_norm_model_forward_backward(run, impl):
    torch.manual_seed(0)
    if impl == "torch spectral_norm":
        model = Weights(torch.nn.utils.parametrizations.spectral_norm)
    else:
        model = Weights(lipkernels.spectral_norm)
    grads = [torch.randn_like(w) for w in model()]
    backend = impl.split()[1] if impl.startswith("lipkernels") else "auto"
    if impl.endswith("SpectralNormGroup"):
        lipkernels.nn.SpectralNormGroup(model)  # stays on the model, which only this case uses
    run("spectral norm, SNGAN CNN D, fwd+bwd", impl, with_backend(backend, _sn_step(model, grads)),
        baseline=impl == "torch spectral_norm")


def _gn_formula(f, g):
    """GN-GAN's official formula in plain PyTorch (no edge-case guard)."""
    return f / (torch.flatten(g, 1).norm(2, dim=1) + f.abs())


PER_SAMPLE = {
    "gn": lambda f, g: ops.gn_normalize(f, g),
    "gran": lambda f, g: ops.gran_normalize(f, g, 1e-4),
    "gp": lambda f, g: ops.gradient_penalty(g, 1.0),
}


PER_SAMPLE_CASES = [
    (op, shape, impl)
    for shape in [(64, 3, 32, 32), (64, 128, 16, 16)]
    for op in PER_SAMPLE
    for impl in ["reference"] + COMPILED + (["plain PyTorch formula"] if op == "gn" else [])
]


@pytest.mark.parametrize("op,shape,impl", PER_SAMPLE_CASES, ids=lambda x: str(x))
def test_per_sample_forward_backward(run, op, shape, impl):
    torch.manual_seed(0)
    g = torch.randn(shape, requires_grad=True)
    f = torch.randn(shape[0], requires_grad=True)
    fn = _gn_formula if impl == "plain PyTorch formula" else PER_SAMPLE[op]
    inputs = (g,) if op == "gp" else (f, g)

    def step():
        torch.autograd.grad(fn(f, g).sum(), inputs)

    backend = impl if impl in lipkernels.available_backends() else "reference"
    run(f"{op} {shape} fwd+bwd", impl, with_backend(backend, step), baseline=impl == "reference")
