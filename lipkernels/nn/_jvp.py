"""Reverse-over-forward (JVP) steps: exact first derivatives of the gradient penalties and
of GN / GraN without a double backward, so that ``torch.compile`` can compile them
(docs/math.md section 13).

With ``g = d sum(f) / dx`` computed without a graph and ``n_i = ||g_i||``:

* **GN, GraN** (per-sample outputs): with ``v_i = g_i / n_i`` held constant (0 where
  ``n_i = 0``), the forward-mode JVP of the discriminator along ``v`` gives
  ``t_i = <grad_{x_i} f_i, v_i>``. Its value is ``n_i`` and, when the samples do not
  interact, its first derivatives in the weights and in ``x`` are those of ``n_i``
  (``dn_i = v_i^T dg_i``). The output is the epilogue of ``(f, t)``: the fused ops applied
  to ``t`` as a one-element "gradient" per sample (``||t_i|| = |t_i| = t_i``).
* **GP, R1** (a batch mean of a function of ``n``): with ``w = dP/dg`` (the fused
  backward kernel, held constant), one JVP of ``sum(f)`` along ``w`` gives
  ``s = <g, w>``, whose derivative is ``<w, dg> = dP``. The penalty's value is the
  kernel's ``P`` and its gradient flows through ``s``. This is exact whether or not the
  samples interact (``g`` is the gradient of the batch sum either way).

Each step is one forward and backward without a graph (for ``g``), one forward with a
tangent, and the caller's ordinary backward: first-order only. A backward with
``create_graph=True`` through a JVP result raises (the second derivatives would be
wrong); the double-backward method gives every order.

The discriminator runs twice. Its state is kept as one forward would leave it: spectral
normalization (torch's and lipkernels', per layer or through ``SpectralNormGroup``) is
evaluated once, before both passes (``torch.nn.utils.parametrize.cached``), and running
statistics are updated by the second pass only. Layer, batch and instance normalization
run as elementary ops in both passes (:class:`_Normalizations`: torch's forward-mode
rules for them are not differentiable in reverse mode). Dropout in training mode would
draw different masks in the two passes: it is refused. GN and GraN refuse samples that
interact (a batch_norm call using batch statistics); in eager mode the JVP's value ``t``
is also compared with ``n``, which catches other layers that mix samples (a
minibatch-stddev layer) whenever they change the values.

Eager mode uses ``torch.autograd.grad`` and ``torch.autograd.forward_ad``; while
``torch.compile`` traces, ``torch.func.vjp`` gives ``g`` (dynamo does not trace
``autograd.grad``), so a compiled step is one graph (``fullgraph=True``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .. import backends, ops
from ._grad import _scores, input_gradient

METHODS = ("auto", "double_backward", "jvp")

#: What ``method="auto"`` runs outside ``torch.compile``. Measured on a 2-core CPU
#: (``lipkernels bench``, rows "JVP step"): the eager JVP step is slower than the double
#: backward there, so eager code keeps the double backward; compiled code gets the JVP.
EAGER_DEFAULT = "double_backward"


def resolve(who: str, method: str) -> str:
    """The method a call runs: ``'double_backward'`` or ``'jvp'``."""
    if method not in METHODS:
        raise ValueError(f"{who}: method must be one of {', '.join(map(repr, METHODS))}, "
                         f"got {method!r}")
    if method != "auto":
        return method
    return "jvp" if torch.compiler.is_compiling() else EAGER_DEFAULT


# ----------------------------------------------------------------- guards

_ERROR_ORDER = ("{who}: method='jvp' gives first derivatives only; a backward with "
                "create_graph=True through it would give wrong second derivatives. Use "
                "method='double_backward' for higher derivatives")


class _Attach(torch.autograd.Function):
    """``apply(value, surrogate, who)``: ``value`` forward; backward sends the gradient to
    ``surrogate`` (whose derivative is the value's), and refuses ``create_graph``."""

    @staticmethod
    def forward(ctx, value, surrogate, who):
        ctx.who = who
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(_ERROR_ORDER.format(who=ctx.who))
        return None, grad, None


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses ``create_graph=True``."""

    @staticmethod
    def forward(ctx, x, who):
        ctx.who = who
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(_ERROR_ORDER.format(who=ctx.who))
        return grad, None


# ----------------------------------------------------------------- the discriminator's state

def _groups(model: nn.Module):
    from .spectral_norm import SpectralNormGroup
    return [m.__dict__[SpectralNormGroup.ATTRIBUTE] for m in model.modules()
            if SpectralNormGroup.ATTRIBUTE in m.__dict__]


def _check_deterministic(who: str, model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise RuntimeError(
                f"{who}: method='jvp' runs the discriminator twice, and {name} "
                f"({type(m).__name__} in training mode) would draw different masks; use "
                "method='double_backward', or put the dropout layers in eval mode")


@contextlib.contextmanager
def once(model: nn.Module) -> Iterator[None]:
    """Run ``model`` several times in the block as one forward: parametrizations
    (spectral norm) evaluated once, here; running statistics as one forward leaves them."""
    groups = _groups(model)
    with parametrize.cached():
        for group in groups:
            group._before_forward(group.model, ())
        try:
            for module in model.modules():
                if parametrize.is_parametrized(module):
                    for name in module.parametrizations:
                        getattr(module, name)
        finally:
            for group in groups:
                group._after_forward(group.model, (), None)
        for group in groups:
            group._held = True
        try:
            yield
        finally:
            for group in groups:
                group._held = False


# ----------------------------------------------------------------- normalization layers

def _normalize(x: torch.Tensor, dims, eps: float) -> torch.Tensor:
    mean = x.mean(dims, keepdim=True)
    c = x - mean
    return c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _arguments(names, defaults, args, kwargs):
    found = dict(zip(names, defaults))
    found.update(zip(names, args))
    found.update(kwargs)
    return found


_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_IN = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum",
       "eps")


class _Normalizations(TorchFunctionMode):
    """Layer, batch and instance normalization written with elementary ops while the
    discriminator runs in the JVP steps.

    torch's forward-mode rules of ``native_layer_norm`` and ``native_batch_norm`` (which
    ``instance_norm`` uses) compute the tangent from the saved mean and inverse std,
    outputs that reverse mode treats as constants: the reverse-mode derivative of such a
    tangent is wrong (measured in float64: a conv bias before a training-mode BatchNorm,
    whose exact derivative is 0, got -0.022; LayerNorm and InstanceNorm likewise off by
    0.2-0.3; GroupNorm and the activations are right). Written as ``(x - mean) /
    sqrt(var + eps)`` both modes are exact. Running statistics are updated by torch's own
    op on the primal values (``update=True``), or not at all (the first pass).

    With ``REFUSE_MIXING`` (GN, GraN) a call that mixes the samples of a batch (batch
    statistics) raises. The settings are class attributes, one subclass per combination
    (dynamo traces a mode's class attributes, not attributes set on the instance).
    """

    UPDATE = False
    REFUSE_MIXING = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            a = _arguments(("input", "normalized_shape", "weight", "bias", "eps"),
                           (None, None, None, None, 1e-5), args, kwargs)
            x, shape = a["input"], tuple(a["normalized_shape"])
            lead = x.dim() - len(shape)
            y = _normalize(x, tuple(range(lead, x.dim())), a["eps"])
            return _affine(y, a["weight"], a["bias"], (1,) * lead + shape)
        if func is F.batch_norm:
            a = _arguments(_BN, (None, None, None, None, None, False, 0.1, 1e-5), args, kwargs)
            x = a["input"]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if not a["training"] and a["running_mean"] is not None:
                y = ((x - a["running_mean"].reshape(shape))
                     * torch.rsqrt(a["running_var"].reshape(shape) + a["eps"]))
                return _affine(y, a["weight"], a["bias"], shape)
            if self.REFUSE_MIXING:
                raise RuntimeError(
                    "GradNorm / GraN with method='jvp' need samples that do not interact, but "
                    "the discriminator calls batch_norm using batch statistics (BatchNorm in "
                    "training mode), which mixes the batch: the per-sample JVP would not be "
                    "the derivative of the batch sum's gradient norm. Use "
                    "method='double_backward' (eager), or eval mode / a per-sample "
                    "normalization (LayerNorm, GroupNorm, InstanceNorm)")
            if self.UPDATE and a["training"] and a["running_mean"] is not None:
                with torch.no_grad():
                    _batch_norm(forward_ad.unpack_dual(x).primal, a["running_mean"],
                                a["running_var"], None, None, True, a["momentum"], a["eps"])
            y = _normalize(x, (0,) + tuple(range(2, x.dim())), a["eps"])
            return _affine(y, a["weight"], a["bias"], shape)
        if func is F.instance_norm:
            a = _arguments(_IN, (None, None, None, None, None, True, 0.1, 1e-5), args, kwargs)
            x = a["input"]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if not a["use_input_stats"]:
                y = ((x - a["running_mean"].reshape(shape))
                     * torch.rsqrt(a["running_var"].reshape(shape) + a["eps"]))
                return _affine(y, a["weight"], a["bias"], shape)
            if self.UPDATE and a["running_mean"] is not None:
                with torch.no_grad():
                    _instance_norm(forward_ad.unpack_dual(x).primal, a["running_mean"],
                                   a["running_var"], None, None, True, a["momentum"], a["eps"])
            y = _normalize(x, tuple(range(2, x.dim())), a["eps"])
            return _affine(y, a["weight"], a["bias"], shape)
        if func in _LINEAR and self.UPDATE:
            split = _linear_split(func, args, kwargs)
            if split is not None:
                return split
        return func(*args, **kwargs)


_batch_norm, _instance_norm = F.batch_norm, F.instance_norm

#: Layers linear in their input: ``y = A(x; W) + b``.
_LINEAR = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
           F.conv_transpose3d)


def _linear_split(func, args, kwargs):
    """A linear layer on a dual input as two ordinary calls: the primal ``A(x) + b`` and
    the tangent ``A(x_t)``. The same values as its forward-mode rule, which also forms
    ``A(x; W_t)`` with the weight's zero tangent (a ZeroTensor); inductor (torch 2.13)
    reuses that tensor's buffer in the compiled backward and fails ("ZeroTensors are
    immutable", pytorch/pytorch#177261). None when the weight or bias is dual too."""
    x = args[0] if args else kwargs.get("input")
    primal, tangent = forward_ad.unpack_dual(x)
    if tangent is None:
        return None
    rest = list(args[1:])
    weight = rest[0] if rest else kwargs.get("weight")
    bias = rest[1] if len(rest) > 1 else kwargs.get("bias")
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in (weight, bias)):
        return None
    kw = {k: v for k, v in kwargs.items() if k != "input"}
    if len(rest) > 1:  # bias given positionally
        tangent_rest, kw_t = [rest[0], None] + rest[2:], kw
    else:
        tangent_rest, kw_t = rest, (dict(kw, bias=None) if "bias" in kw else kw)
    y = func(primal, *rest, **kw)
    y_t = func(tangent, *tangent_rest, **kw_t)
    return forward_ad.make_dual(y, y_t)


class _FirstPass(_Normalizations):
    pass


class _SecondPass(_Normalizations):
    UPDATE = True


class _FirstPassPerSample(_Normalizations):
    REFUSE_MIXING = True


class _SecondPassPerSample(_Normalizations):
    UPDATE = True
    REFUSE_MIXING = True


# ----------------------------------------------------------------- the two passes

def input_gradient_value(model: nn.Module, x: torch.Tensor, per_sample: bool = False
                         ) -> torch.Tensor:
    """``g = d sum(f) / dx`` without a graph (x's values only); running statistics are
    not updated (the second pass, whose graph is kept, updates them)."""
    tracking = [m for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                and m.track_running_stats]
    for m in tracking:  # batch statistics still; no count or running-statistics update
        m.track_running_stats = False
    try:
        with (_FirstPassPerSample() if per_sample else _FirstPass()):
            return _input_gradient_value(model, x)
    finally:
        for m in tracking:
            m.track_running_stats = True


def _input_gradient_value(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if torch.compiler.is_compiling():
        f, vjp_fn = torch.func.vjp(model, x)
        _scores(f, x)
        (g,) = vjp_fn(torch.ones_like(f))
        return g.detach()
    with torch.enable_grad():
        xr = x.requires_grad_(True)
        f = model(xr)
        (g,) = torch.autograd.grad(_scores(f, xr).sum(), xr)
    return g


def scores_and_gradient(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f, g)`` with ``f = model(x)`` differentiable and ``g`` without a graph (the
    first-order GN step), compilable: ``torch.func.vjp`` while compiling."""
    if not torch.compiler.is_compiling():
        return input_gradient(model, x, create_graph=False)
    with once(model):  # spectral norm outside the transform
        f, vjp_fn = torch.func.vjp(model, x)
        _scores(f, x)
        (g,) = vjp_fn(torch.ones_like(f))
    return f, g.detach()


def forward_with_tangent(model: nn.Module, x: torch.Tensor, tangent: torch.Tensor,
                         per_sample: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f, t)``: ``f = model(x)`` and its directional derivative along ``tangent`` at
    ``x``, both differentiable (reverse mode) in the weights and in ``x``."""
    with (_SecondPassPerSample() if per_sample else _SecondPass()), forward_ad.dual_level():
        out = model(forward_ad.make_dual(x, tangent.to(x.dtype)))
        f, t = forward_ad.unpack_dual(out)
    if t is None:  # f does not depend on x
        t = torch.zeros_like(f)
    return f, t


# ----------------------------------------------------------------- the steps

def penalty(who: str, model: nn.Module, x: torch.Tensor, epilogue: str, param: float,
            scale: float) -> torch.Tensor:
    """``scale * mean_i E(n_i)`` for the penalty epilogue ``'gp'`` (param: center) or
    ``'r1'``, with exact first derivatives in the weights (x is a constant)."""
    _check_deterministic(who, model)
    x = x.detach()
    with once(model):
        g = input_gradient_value(model, x)
        kern = backends.kernels(g.device)
        per, n = kern.norm_epilogue(g, None, epilogue, param)
        batch = g.shape[0]
        value = scale * per.mean()
        go = torch.full((batch,), scale / batch if batch else 0.0, dtype=n.dtype, device=g.device)
        _, w = kern.norm_epilogue_backward(go, g, None, n, epilogue, param)
        _, t = forward_with_tangent(model, x, w)
    return _Attach.apply(value, t.sum().to(value.dtype), who)


def normalized(who: str, model: nn.Module, x: torch.Tensor, epilogue: str,
               param: float) -> torch.Tensor:
    """GN (``'gn'``) or GraN (``'gran'``, param: eps) of ``model`` at ``x``, exact first
    derivatives in the weights and in ``x`` (samples must not interact)."""
    _check_deterministic(who, model)
    with once(model):
        g = input_gradient_value(model, x, per_sample=True)
        kern = backends.kernels(g.device)
        n = kern.norm_epilogue(g, None, "norm", 0.0)[1]
        ones = torch.ones_like(n)
        _, v = kern.norm_epilogue_backward(ones, g, None, n, "norm", 0.0)  # g / n, 0 at n = 0
        f, t = forward_with_tangent(model, x, v, per_sample=True)
    flat_f, flat_t = _scores(f, x), t.reshape(-1)
    if not torch.compiler.is_compiling():
        _check_per_sample(who, flat_t.detach(), n)
    col = flat_t.reshape(-1, 1)
    out = (ops.gn_normalize(flat_f, col) if epilogue == "gn"
           else ops.gran_normalize(flat_f, col, param))
    return _FirstOrderOnly.apply(out.reshape(f.shape), who)


def _check_per_sample(who: str, t: torch.Tensor, n: torch.Tensor) -> None:
    """t must equal n up to rounding (it does when the samples do not interact)."""
    if t.numel() == 0:
        return
    tn = t.to(n.dtype)
    finite = tn.isfinite() & n.isfinite()
    rtol = 1e-7 if n.dtype == torch.float64 else 1e-3
    scale = torch.where(finite, n, torch.zeros_like(n)).amax().clamp_min(torch.finfo(n.dtype).tiny)
    bad = finite & ((tn - n).abs() > rtol * scale)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(
            f"{who}: method='jvp' found the samples of the batch interacting: the JVP along "
            f"g_i / ||g_i|| gives {float(tn[i]):.6g} for sample {i}, but ||g_i|| = "
            f"{float(n[i]):.6g}. A layer mixes the batch (e.g. minibatch stddev, BatchNorm); "
            "use method='double_backward'")
