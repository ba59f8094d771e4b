"""torch's function transforms and batched gradients through the ops and the layers, on
every backend: ``torch.func.vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
``functional_call``, ``torch.autograd.grad(..., is_grads_batched=True)`` and
``gradcheck``/``gradgradcheck`` with ``check_batched_grad=True``.

Each result is compared with something independent: the reference backend evaluated
slice by slice without transforms (plain autograd), closed-form Jacobians, or
``torch.nn.utils.parametrizations.spectral_norm`` holding the same vectors. Float64,
small shapes (the Triton cases run under the interpreter: ``TRITON_INTERPRET=1 pytest
-m triton``).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import lipkernels
from lipkernels import ops

from conftest import (COMPILED_BACKENDS, INTERPRETING, PER_SAMPLE_OPS, assert_close,
                      backend_context)

_ONLY = [b for b in os.environ.get("LIPKERNELS_TEST_BACKENDS", "").split(",") if b]
BACKENDS = ((["reference"] if not _ONLY else []) + COMPILED_BACKENDS +
            ([pytest.param("triton", marks=pytest.mark.triton)]
             if INTERPRETING and "triton" in lipkernels.available_backends()
             and (not _ONLY or "triton" in _ONLY) else []))

D = torch.float64


@pytest.fixture(params=BACKENDS)
def backend(request):
    with backend_context(request.param):
        yield request.param


@pytest.fixture(params=[b for b in BACKENDS if b != "reference"] or [pytest.param(
    "none", marks=pytest.mark.skip(reason="no compiled backend available"))])
def compiled_backend(request):
    with backend_context(request.param):
        yield request.param


def reference(fn, *args):
    with lipkernels.use_backend("reference"):
        return fn(*args)


def close(a, e, what):
    assert_close(a, e, dtype=D, what=what)


def each(fn, *batched):
    """fn applied slice by slice (no transform), stacked: what vmap must give."""
    return torch.stack([fn(*(t[i] for t in batched)) for i in range(batched[0].shape[0])])


# ================================================================== per-sample ops

NAMES = list(PER_SAMPLE_OPS)


def op_of(name):
    return PER_SAMPLE_OPS[name][0]


@pytest.mark.parametrize("name", NAMES)
def test_vmap_per_sample_ops(backend, name):
    op = op_of(name)
    g = torch.randn(3, 4, 2, 5, dtype=D)
    f = torch.randn(3, 4, dtype=D)
    g[1, 2] = 0  # a zero sample: n = 0
    expected = reference(each, op, f, g)
    close(vmap(op)(f, g), expected, f"{name} vmap")
    # The vmapped dim elsewhere, and an unbatched f.
    close(vmap(op, in_dims=(0, 2))(f, g.movedim(0, 2)), expected, f"{name} in_dims=2")
    expected_f0 = reference(each, lambda g: op(f[0], g), g)
    close(vmap(op, in_dims=(None, 0))(f[0], g), expected_f0, f"{name} f unbatched")
    # Nested vmap.
    close(vmap(vmap(op))(f.view(3, 1, 4).expand(3, 2, 4), g.view(3, 1, 4, 2, 5).expand(3, 2, 4, 2, 5)),
          expected.unsqueeze(1).expand((3, 2) + expected.shape[1:]), f"{name} nested vmap")


def _jacobian_reference(op, f, g, uses_f):
    """Jacobians by plain autograd on the reference backend (no transform)."""
    with lipkernels.use_backend("reference"):
        if uses_f:
            return torch.autograd.functional.jacobian(op, (f, g))
        return (torch.autograd.functional.jacobian(lambda g: op(f, g), g),)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_of_per_sample_ops(backend, name, transform):
    _, _, uses_f = PER_SAMPLE_OPS[name]
    op = op_of(name)
    g = torch.randn(3, 2, 3, dtype=D)
    f = torch.randn(3, dtype=D)
    g[1] = 0
    f[2] = 0
    expected = _jacobian_reference(op, f, g, uses_f)
    if uses_f:
        actual = transform(op, argnums=(0, 1))(f, g)
    else:
        actual = (transform(lambda g: op(f, g))(g),)
    for a, e, arg in zip(actual, expected, "fg"):
        close(a, e, f"{name} {transform.__name__} d/d{arg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["gn_normalize", "gradient_penalty"])
def test_transforms_in_lower_precision(backend, name, dtype):
    """vmap, jacrev and jacfwd in float32/float16 (float32 accumulation, the penalties'
    float32 output): against the float64 reference on the same rounded inputs."""
    op = op_of(name)
    g = torch.randn(2, 3, 4, dtype=D).to(dtype)
    f = torch.randn(2, 3, dtype=D).to(dtype)
    for transform in (lambda fn: fn, lambda fn: jacrev(fn, argnums=1),
                      lambda fn: jacfwd(fn, argnums=1)):
        actual = vmap(transform(op))(f, g)
        expected = reference(vmap(transform(op)), f.double(), g.double())
        assert actual.dtype == reference(vmap(transform(op)), f, g).dtype
        assert_close(actual, expected, dtype=dtype, what=f"{name} {dtype}")


@pytest.mark.parametrize("name", NAMES)
def test_hessian_of_per_sample_ops(backend, name):
    """jacfwd(jacrev): the backward differentiated under forward mode."""
    op = op_of(name)
    g = torch.randn(2, 3, dtype=D)
    f = torch.randn(2, dtype=D)
    loss = (lambda g: (op(f, g) * torch.tensor([0.5, -2.0], dtype=D)[:op(f, g).numel()]).sum())
    expected = reference(lambda: torch.autograd.functional.hessian(loss, g))
    close(hessian(loss)(g), expected, f"{name} hessian")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("create_graph", [False, True])
def test_is_grads_batched(backend, name, create_graph):
    _, _, uses_f = PER_SAMPLE_OPS[name]
    op = op_of(name)
    f0 = torch.randn(4, dtype=D)
    g0 = torch.randn(4, 2, 3, dtype=D)

    def run(vmapped):
        f = f0.clone().requires_grad_(uses_f)
        g = g0.clone().requires_grad_(True)
        out = vmap(op, in_dims=(None, 0))(f, g.expand(2, 4, 2, 3)) if vmapped else op(f, g)
        cotangents = torch.randn((5,) + out.shape, dtype=D, generator=torch.Generator().manual_seed(1))
        inputs = (f, g) if uses_f else (g,)
        return torch.autograd.grad(out, inputs, cotangents, is_grads_batched=True,
                                   create_graph=create_graph)

    for vmapped in (False, True):
        expected = reference(run, vmapped)
        for a, e in zip(run(vmapped), expected):
            close(a, e, f"{name} is_grads_batched vmapped={vmapped}")


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_batched_per_sample_ops(backend, name):
    _, _, uses_f = PER_SAMPLE_OPS[name]
    op = op_of(name)
    g = torch.randn(3, 2, dtype=D, requires_grad=True)
    f = torch.randn(3, dtype=D, requires_grad=uses_f)
    fn = op if uses_f else (lambda g: op(f, g))
    inputs = (f, g) if uses_f else (g,)
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, check_forward_ad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True)


def test_per_sample_gradients_of_a_penalty(backend):
    """The functorch recipe for per-sample gradients, through an op and a tiny network."""
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(5, 6, dtype=D)

    def loss(p, xi):
        xi = xi.unsqueeze(0)
        g = torch.func.grad(lambda x: functional_call(net, p, (x,)).sum())(xi)
        return ops.gradient_penalty(g, 1.0) + ops.gn_normalize(functional_call(net, p, (xi,)).view(1), g).sum()

    actual = vmap(grad(loss), in_dims=(None, 0))(params, x)
    with lipkernels.use_backend("reference"):
        expected = [grad(loss)(params, x[i]) for i in range(x.shape[0])]
    for k in params:
        close(actual[k], torch.stack([e[k] for e in expected]), f"per-sample grad {k}")


# ================================================================== spectral normalization

SHAPES = [(3, 4), (2, 3, 2, 2)]


def _layers(batch=None):
    torch.manual_seed(3)
    lead = () if batch is None else (batch,)
    ws = [torch.randn(lead + s, dtype=D) for s in SHAPES]
    us = [nn.functional.normalize(torch.randn(lead + (s[0],), dtype=D), dim=-1) for s in SHAPES]
    vs = [nn.functional.normalize(torch.randn(lead + (torch.Size(s[1:]).numel(),), dtype=D), dim=-1)
          for s in SHAPES]
    return ws, us, vs


def _sn(training, n_iter=2):
    def fn(*args):
        ws, us, vs = args[:2], args[2:4], args[4:]
        return tuple(ops.spectral_normalize(list(ws), list(us), list(vs), n_iter, 1e-12, training))
    return fn


@pytest.mark.parametrize("training", [False, True])
def test_vmap_spectral_normalize(backend, training):
    """Stacked weights (an ensemble): each slice normalized as a layer of its own; in
    training mode the batched vectors of each slice are updated in place."""
    ws, us, vs = _layers(batch=3)
    us_ref, vs_ref = [u.clone() for u in us], [v.clone() for v in vs]
    actual = vmap(_sn(training))(*ws, *us, *vs)
    expected = []
    with lipkernels.use_backend("reference"):
        for i in range(3):
            u_i, v_i = [u[i] for u in us_ref], [v[i] for v in vs_ref]  # views: updated in place
            expected.append(_sn(training)(*[w[i] for w in ws], *u_i, *v_i))
    for l in range(len(SHAPES)):
        close(actual[l], torch.stack([e[l] for e in expected]), f"W_sn[{l}] training={training}")
        close(us[l], us_ref[l], f"u[{l}]")
        close(vs[l], vs_ref[l], f"v[{l}]")
    if training:
        assert not torch.equal(us[0], _layers(batch=3)[1][0])  # the iteration ran


def test_vmap_spectral_normalize_other_in_dims(backend):
    ws, us, vs = _layers(batch=2)
    expected = reference(vmap(_sn(False)), *ws, *us, *vs)
    moved = [w.movedim(0, -1) for w in ws]
    actual = vmap(_sn(False), in_dims=(-1, -1) + (0,) * 4)(*moved, *us, *vs)
    for a, e in zip(actual, expected):
        close(a, e, "W_sn, weights vmapped over their last dim")
    # Unbatched vectors with batched weights: fine in eval mode...
    u0, v0 = [u[0] for u in us], [v[0] for v in vs]
    actual = vmap(_sn(False), in_dims=(0, 0) + (None,) * 4)(*ws, *u0, *v0)
    expected = reference(lambda: [torch.stack([_sn(False)(ws[0][i], ws[1][i], *u0, *v0)[l]
                                               for i in range(2)]) for l in range(2)])
    for a, e in zip(actual, expected):
        close(a, e, "W_sn, unbatched vectors")


def test_vmap_training_needs_batched_vectors(backend):
    """... but in training mode a batched result cannot be stored in an unbatched
    vector: a clear error (torch's spectral_norm fails there too)."""
    ws, us, vs = _layers(batch=2)
    u0, v0 = [u[0].clone() for u in us], [v[0].clone() for v in vs]
    before = [u.clone() for u in u0]
    with pytest.raises(RuntimeError, match=r"us\[0\] is not batched .* batch them too"):
        vmap(_sn(True), in_dims=(0, 0) + (None,) * 4)(*ws, *u0, *v0)
    for a, b in zip(u0, before):
        assert torch.equal(a, b)


def _sn_jacobian_reference(ws, us, vs, training):
    """d W_sn / d W by plain autograd on the reference backend, the same vectors."""
    out = []
    with lipkernels.use_backend("reference"):
        for l in range(len(ws)):
            def fn(w, l=l):
                args = list(ws)
                args[l] = w
                return _sn(training)(*args, *[u.clone() for u in us], *[v.clone() for v in vs])
            out.append(torch.autograd.functional.jacobian(fn, ws[l]))
    return out


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
@pytest.mark.parametrize("training", [False, True])
def test_jacobians_of_spectral_normalize(backend, transform, training):
    ws, us, vs = _layers()
    expected = _sn_jacobian_reference(ws, us, vs, training)
    u0 = [u.clone() for u in us]

    def fn(w0, w1):
        return _sn(training)(w0, w1, *[u.clone() for u in u0], *[v.clone() for v in vs])

    actual = transform(fn, argnums=(0, 1))(*ws)
    for out_l in range(2):
        for in_l in range(2):
            close(actual[out_l][in_l], expected[in_l][out_l], f"dW_sn[{out_l}]/dW[{in_l}]")
    # In training mode the vectors given are updated in place, as without a transform.
    state = [u.clone() for u in us]
    transform(lambda w0, w1: _sn(training)(w0, w1, *state, *[v.clone() for v in vs]))(*ws)
    assert torch.equal(state[0], us[0]) != training


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_spectral_normalize_is_grads_batched(backend, training, create_graph):
    """The backward of the usual (untransformed) forward, vmapped by autograd."""
    ws, us, vs = _layers()

    def run():
        w = [t.clone().requires_grad_(True) for t in ws]
        out = _sn(training)(*w, *[u.clone() for u in us], *[v.clone() for v in vs])
        gen = torch.Generator().manual_seed(2)
        cot = [torch.randn((3,) + o.shape, dtype=D, generator=gen) for o in out]
        return torch.autograd.grad(out, w, cot, is_grads_batched=True, create_graph=create_graph)

    for l, (a, e) in enumerate(zip(run(), reference(run))):
        close(a, e, f"batched dL/dW[{l}]")


def test_power_iteration_under_transforms(backend):
    ws, us, vs = _layers(batch=2)
    us_ref, vs_ref = [u.clone() for u in us], [v.clone() for v in vs]
    sig = vmap(lambda *a: ops.power_iteration(list(a[:2]), list(a[2:4]), list(a[4:]), 3))(*ws, *us, *vs)
    with lipkernels.use_backend("reference"):
        expected = torch.stack([ops.power_iteration([w[i] for w in ws], [u[i] for u in us_ref],
                                                    [v[i] for v in vs_ref], 3) for i in range(2)])
    close(sig, expected, "sigmas")
    for a, e in zip(us + vs, us_ref + vs_ref):
        close(a, e, "vectors")


# ================================================================== layers

def _layer(kind):
    torch.manual_seed(7)
    make = {"linear": lambda: nn.Linear(5, 3), "conv": lambda: nn.Conv2d(2, 3, 2),
            "convT": lambda: nn.ConvTranspose2d(2, 3, 2)}[kind]
    base = make().double()
    ours = lipkernels.spectral_norm(copy.deepcopy(base))
    theirs = torch_spectral_norm(copy.deepcopy(base))
    # The same starting vectors (ours are drawn as torch's, but by another backend).
    theirs.parametrizations.weight[0]._u.copy_(ours.parametrizations.weight[0]._u)
    theirs.parametrizations.weight[0]._v.copy_(ours.parametrizations.weight[0]._v)
    x = torch.randn((4, 5) if kind == "linear" else (4, 2, 3, 3), dtype=D)
    return ours, theirs, x


def _state(module):
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    return params, buffers


@pytest.mark.parametrize("kind", ["linear", "conv", "convT"])
@pytest.mark.parametrize("training", [True, False])
def test_layer_jacobians_match_torch(backend, kind, training):
    ours, theirs, x = _layer(kind)
    ours.train(training)
    theirs.train(training)
    p_ours, b_ours = _state(ours)
    p_theirs, b_theirs = _state(theirs)
    for transform in ([jacrev, jacfwd] if not training else [jacrev]):
        # torch's training-mode power iteration has no forward-mode AD (an out= op);
        # ours does: compared with jacrev's below.
        bo, bt = {k: v.clone() for k, v in b_ours.items()}, {k: v.clone() for k, v in b_theirs.items()}
        actual = transform(lambda p: functional_call(ours, (p, bo), (x,)))(p_ours)
        expected = transform(lambda p: functional_call(theirs, (p, bt), (x,)))(p_theirs)
        for k in p_ours:
            close(actual[k], expected[k], f"{kind} {transform.__name__} d out/d {k}")
        for k in bo:
            close(bo[k], bt[k], f"{kind} {transform.__name__} buffer {k}")
    if training:
        bo1, bo2 = ({k: v.clone() for k, v in b_ours.items()} for _ in range(2))
        rev = jacrev(lambda p: functional_call(ours, (p, bo1), (x,)))(p_ours)
        fwd = jacfwd(lambda p: functional_call(ours, (p, bo2), (x,)))(p_ours)
        for k in p_ours:
            close(fwd[k], rev[k], f"{kind} jacfwd = jacrev d out/d {k}")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_vmap_and_per_sample_gradients(backend, kind):
    ours, theirs, x = _layer(kind)
    ours.eval()
    theirs.eval()
    close(vmap(ours)(x.unsqueeze(1)).squeeze(1), theirs(x), f"{kind} vmap over x")
    p_ours, b_ours = _state(ours)
    p_theirs, b_theirs = _state(theirs)

    def loss(module, buffers):
        return lambda p, xi: functional_call(module, (p, buffers), (xi.unsqueeze(0),)).square().sum()

    actual = vmap(grad(loss(ours, b_ours)), in_dims=(None, 0))(p_ours, x)
    expected = vmap(grad(loss(theirs, b_theirs)), in_dims=(None, 0))(p_theirs, x)
    for k in p_ours:
        close(actual[k], expected[k], f"{kind} per-sample grad {k}")


def test_layer_ensemble_vmap(backend):
    """Model ensembling: stacked parameters and buffers (as torch.func.stack_module_state
    makes them; it refuses parametrized modules, each of which has a class of its own)."""
    models = [_layer("linear")[0] for _ in range(3)]
    for i, m in enumerate(models):
        with torch.no_grad():
            m.parametrizations.weight.original.mul_(1 + i)
    x = torch.randn(4, 5, dtype=D)
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models])
              for k, _ in models[0].named_parameters()}
    buffers = {k: torch.stack([dict(m.named_buffers())[k] for m in models])
               for k, _ in models[0].named_buffers()}
    base = copy.deepcopy(models[0])
    expected = reference(lambda: torch.stack([copy.deepcopy(m)(x) for m in models]))
    actual = vmap(lambda p, b: functional_call(base, (p, b), (x,)), in_dims=(0, 0))(params, buffers)
    close(actual, expected, "ensemble outputs (training mode)")
    for i, m in enumerate(models):
        ref = copy.deepcopy(m)
        reference(lambda: ref(x))
        close(buffers["parametrizations.weight.0._u"][i], ref.parametrizations.weight[0]._u, "u")


@pytest.mark.parametrize("training", [True, False])
def test_layer_gradcheck_with_batched_grad(backend, training):
    """gradcheck's defaults plus check_batched_grad=True, as torch's spectral norm passes;
    the buffers are passed fresh to every call (functional_call) so that the training
    mode's iteration starts from the same vectors each time."""
    ours, theirs, x = _layer("linear")  # conv and transposed conv: the Jacobians above
    sn = ours.parametrizations.weight
    # Converged vectors: in training mode the iteration makes u, v functions of W, which
    # the derivative treats as constants (as torch's does), exact only at convergence.
    reference(ops.power_iteration, [sn.original.detach()], [sn[0]._u], [sn[0]._v], 300)
    p, b = _state(ours)
    ours.train(training)

    def fn(w, bias, inp):
        return functional_call(ours, ({"parametrizations.weight.original": w, "bias": bias},
                                      {k: v.clone() for k, v in b.items()}), (inp,))

    inputs = tuple(t.detach().clone().requires_grad_(True)
                   for t in (p["parametrizations.weight.original"], p["bias"], x[:1]))
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, check_forward_ad=True,
                                    check_batched_forward_grad=True)
    if not training and not (backend == "triton" and INTERPRETING):
        # In training mode u, v follow W through the iteration, which the derivative
        # ignores (as torch's does): only first order agrees, at a converged u, v.
        # (Not under the Triton interpreter, for time: the double backward is torch ops
        # on every backend, and the per-sample ops' gradgradcheck runs there.)
        assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True)
    theirs.train(training)

    def fn_torch(w, bias, inp):
        return functional_call(theirs, ({"parametrizations.weight.original": w, "bias": bias},
                                        {k: v.clone() for k, v in b.items()}), (inp,))
    assert torch.autograd.gradcheck(fn_torch, inputs, check_batched_grad=True)


def test_layer_group_under_jacrev(backend):
    """SpectralNormGroup's batched call inside a transform: same Jacobian as per layer."""
    torch.manual_seed(5)
    model = nn.Sequential(lipkernels.nn.SNLinear(4, 3), nn.ReLU(), lipkernels.nn.SNLinear(3, 2)).double()
    x = torch.randn(3, 4, dtype=D)
    p, b = _state(model)
    expected = jacrev(lambda p: functional_call(model, (p, {k: v.clone() for k, v in b.items()}), (x,)))(p)
    with lipkernels.nn.SpectralNormGroup(model):
        actual = jacrev(lambda p: functional_call(model, (p, {k: v.clone() for k, v in b.items()}), (x,)))(p)
    for k in p:
        close(actual[k], expected[k], f"group jacrev {k}")


def test_compiled_backends_run_their_kernels_under_transforms(compiled_backend, monkeypatch):
    """Under a transform the kernel ops still run (not a silent fall-back to the
    reference): a forward under vmap is one folded kernel call, and so is the backward
    of its graph."""
    kern = lipkernels.backends.kernels(torch.empty(0).device)
    seen = []
    for name in ("norm_epilogue", "norm_epilogue_backward", "sn_forward", "sn_backward"):
        original = getattr(type(kern), name)
        monkeypatch.setattr(type(kern), name,
                            lambda self, *a, _o=original, _n=name: seen.append(_n) or _o(self, *a))
    g = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    out = vmap(ops.sample_norm)(g)
    (dg,) = torch.autograd.grad(out.sum(), g)
    assert seen == ["norm_epilogue", "norm_epilogue_backward"], seen
    close(dg, g / g.norm(dim=-1, keepdim=True), "d sum n / dg")
    seen.clear()
    ws, us, vs = _layers()
    w = ws[0].detach().requires_grad_(True)
    out = vmap(lambda w: ops.spectral_normalize([w], [us[0]], [vs[0]], 1, 1e-12, False)[0])(
        w.unsqueeze(0).expand(2, *w.shape))
    (dw,) = torch.autograd.grad(out, w, torch.ones_like(out))
    assert seen == ["sn_forward", "sn_backward"], seen
    expected = reference(lambda: torch.autograd.grad(
        ops.spectral_normalize([w], [us[0]], [vs[0]], 1, 1e-12, False)[0], w,
        2 * torch.ones_like(w))[0])
    close(dw, expected, "dW")


def test_batching_rules_of_the_kernel_ops(compiled_backend):
    """The kernel ops' own batching rules (a backward run by a vmapped
    torch.autograd.grad reaches them): vmap equals the loop over slices."""
    kern = lipkernels.backends.kernels(torch.empty(0).device)
    g = torch.randn(4, 2, 3, dtype=D)
    f = torch.randn(4, dtype=D)
    go = torch.randn(3, 4, dtype=D)
    for epi, ff in (("gn", f), ("norm", None)):
        _, norm = kern.norm_epilogue(g, ff, epi, 0.0)
        actual = vmap(lambda go: kern.norm_epilogue_backward(go, g, ff, norm, epi, 0.0))(go)
        for j in range(2):
            expected = torch.stack([kern.norm_epilogue_backward(go[i], g, ff, norm, epi, 0.0)[j]
                                    for i in range(3)])
            close(actual[j], expected, f"{epi} backward output {j}")
        gb = torch.randn(3, 4, 2, 3, dtype=D)
        actual = vmap(lambda g: kern.norm_epilogue(g, ff, epi, 0.0))(gb)
        for j in range(2):
            expected = torch.stack([kern.norm_epilogue(gb[i], ff, epi, 0.0)[j] for i in range(3)])
            close(actual[j], expected, f"{epi} forward output {j}")
    ws, us, vs = _layers()
    _, sigmas, uv = kern.sn_forward(ws, us, vs, 1, 1e-12)
    grads = [torch.randn((3,) + w.shape, dtype=D) for w in ws]
    actual = vmap(lambda *gs: tuple(kern.sn_backward(list(gs), ws, uv, sigmas, 1e-12)))(*grads)
    for l in range(len(ws)):
        expected = torch.stack([kern.sn_backward([gr[i] for gr in grads], ws, uv, sigmas, 1e-12)[l]
                                for i in range(3)])
        close(actual[l], expected, f"sn backward layer {l}")


# ================================================================== GN, GraN and the penalties

def _critic():
    torch.manual_seed(11)
    return nn.Sequential(lipkernels.nn.SNLinear(6, 4), nn.Tanh(), lipkernels.nn.SNLinear(4, 1)).double()


PENALTIES = {
    "GradNorm": lambda net, x: lipkernels.nn.GradNorm(net)(x).sum(),
    "GraN": lambda net, x: lipkernels.nn.GraN(net, tau=0.5, eps=1e-3)(x).sum(),
    "gradient_penalty": lambda net, x: lipkernels.gradient_penalty(
        net, x, x.flip(0), alpha=torch.linspace(0.1, 0.9, x.shape[0], dtype=D)),
    "r1_penalty": lambda net, x: lipkernels.r1_penalty(net, x, gamma=3.0),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_gradient_normalized_layers_and_penalties_under_grad(backend, name):
    """torch.func.grad over the parameters (the input gradient is taken with
    torch.func.vjp inside a transform) = plain autograd (torch.autograd.grad inside)."""
    model = _critic().eval()
    x = torch.randn(5, 6, dtype=D)
    params, buffers = _state(model)

    def loss(p):
        return PENALTIES[name](lambda inp: functional_call(model, (p, buffers), (inp,)), x)

    actual = grad(loss)(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    expected = dict(zip(leaves, reference(lambda: torch.autograd.grad(
        loss(leaves), list(leaves.values()), materialize_grads=True))))  # GP, R1: not the last bias
    for k in params:
        close(actual[k], expected[k], f"{name} d/d{k}")
    if name == "GradNorm":
        # Per-sample gradients of GN's output: vmap over grad.
        per = vmap(grad(lambda p, xi: PENALTIES[name](
            lambda inp: functional_call(model, (p, buffers), (inp,)), xi.unsqueeze(0))),
            in_dims=(None, 0))(params, x)
        for k in params:
            each_k = torch.stack([reference(lambda i=i: torch.autograd.grad(
                PENALTIES[name](lambda inp: functional_call(model, (leaves, buffers), (inp,)),
                                x[i:i + 1]), leaves[k])[0]) for i in range(x.shape[0])])
            close(per[k], each_k, f"per-sample GN d/d{k}")


def test_transforms_with_torch_compile(backend):
    """docs/math.md section 11: a compiled function under grad, and a compiled vmap
    (aot_eager: the tracing torch.compile does, without generating code)."""
    torch._dynamo.reset()
    g = torch.randn(4, 3, 5, dtype=D)
    f = torch.randn(4, dtype=D)
    expected = reference(grad(lambda g: ops.gradient_penalty(g)), g)
    close(grad(torch.compile(lambda g: ops.gradient_penalty(g), backend="aot_eager"))(g),
          expected, "grad(compile(gradient_penalty))")
    batched = vmap(ops.gn_normalize, in_dims=(None, 0))
    expected = reference(batched, f, g.expand(2, 4, 3, 5))
    close(torch.compile(batched, backend="aot_eager", fullgraph=True)(f, g.expand(2, 4, 3, 5)),
          expected, "compile(vmap(gn_normalize))")
