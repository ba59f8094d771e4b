"""A plain-PyTorch twin of :class:`lipkernels.train.methods.Trainer`: the same GAN step
written with torch alone, as the papers' official code writes it, so that a run of
lipkernels' Trainer can be held to it number for number (tests/test_train_twins.py).

Nothing here calls lipkernels' layers, ops, losses or clipping. The formulas:

* losses: BCE on logits (``F.binary_cross_entropy_with_logits`` against ones / zeros,
  basiclab/GNGAN-PyTorch ``losses.BCEWithLogits``), hinge (``relu(1 - D(x_r))`` and
  ``relu(1 + D(x_f))`` means, G: ``-mean D(x_f)``), Wasserstein (``mean D(x_f) - mean
  D(x_r)``, G: ``-mean D(x_f)``);
* WGAN: ``for p in D.parameters(): p.data.clamp_(-c, c)`` after every critic step;
* WGAN-GP: ``x_hat = alpha real + (1 - alpha) fake``, ``g = autograd.grad(D(x_hat).sum(),
  x_hat, create_graph=True)``, ``lambda mean (||g_i|| - 1)^2``;
* GN-GAN: ``f / (||grad f|| + |f|)`` with the input gradient built by
  ``create_graph=True`` (``models/gradnorm.py`` of basiclab/GNGAN-PyTorch); its first-order
  generator step takes ``||grad f||`` as a constant (``.detach()``);
* GraN-GAN: ``f ||grad f|| / (||grad f||^2 + eps) / tau``;
* spectral norm: ``torch.nn.utils.parametrizations.spectral_norm``;
* optimizers: torch's Adam and RMSprop, and TensorFlow 1's RMSProp written from its
  documented update.

:meth:`PlainTrainer.twin_of` turns a lipkernels Trainer into its plain twin, with the
same parameter values, spectral-norm vectors, running statistics and optimizer state.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .methods import Method, StepLoop, real_split

# ------------------------------------------------------------------ losses


def _bce_logits(x: torch.Tensor, target: float) -> torch.Tensor:
    """``BCEWithLogits(x, target)``, a batch mean (the GAN loss on logits)."""
    return F.binary_cross_entropy_with_logits(x, torch.full_like(x, target))


def _nonsaturating_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return _bce_logits(real, 1.0) + _bce_logits(fake, 0.0)


def _nonsaturating_g(fake: torch.Tensor) -> torch.Tensor:
    return _bce_logits(fake, 1.0)


def _hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def _wasserstein_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return fake.mean() - real.mean()


def _negative_mean(fake: torch.Tensor) -> torch.Tensor:
    """The generator loss of the hinge and Wasserstein GANs: ``-mean D(x_f)``."""
    return -fake.mean()


#: name -> (discriminator loss(real, fake), generator loss(fake)), plain formulas.
PLAIN_LOSSES: Dict[str, Tuple[Callable, Callable]] = {
    "nonsaturating": (_nonsaturating_d, _nonsaturating_g),
    "hinge": (_hinge_d, _negative_mean),
    "wasserstein": (_wasserstein_d, _negative_mean),
}


def loss_name(loss) -> str:
    """The plain formula's name for a method's loss: a name of :data:`PLAIN_LOSSES`, or
    a ``lipkernels.losses.GANLoss`` equal to the lipkernels loss of that name (used only
    to identify it, never to compute)."""
    if isinstance(loss, str):
        if loss in PLAIN_LOSSES:
            return loss
    else:
        from .. import losses
        for name in PLAIN_LOSSES:
            if getattr(losses, name, None) == loss:
                return name
    raise ValueError(f"PlainTrainer: the loss {loss!r} has no plain formula here (known: "
                     f"{', '.join(PLAIN_LOSSES)}, by name or as the lipkernels.losses object)")


# ------------------------------------------------------------------ optimizers

class TF1RMSProp(torch.optim.Optimizer):
    """TensorFlow 1's ``tf.train.RMSPropOptimizer`` without momentum, not centred, as
    documented: the accumulator ``ms`` starts at 1, ``ms <- decay ms + (1 - decay) g^2``,
    ``p <- p - lr g / sqrt(ms + epsilon)``; TF's defaults decay 0.9, epsilon 1e-10."""

    def __init__(self, params, lr: float, decay: float = 0.9, eps: float = 1e-10) -> None:
        super().__init__(params, dict(lr=lr, decay=decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay, eps = group["lr"], group["decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                ms = state.get("ms", torch.ones_like(p))
                ms = decay * ms + (1 - decay) * p.grad * p.grad
                state["ms"] = ms
                p.sub_(lr * p.grad / torch.sqrt(ms + eps))
        return None


def plain_optimizer(m: Method, params, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """The optimizer ``m.optimizer`` names, learning rate ``lr`` (default ``m.lr``), with
    torch's defaults beyond lr and betas."""
    lr = m.lr if lr is None else lr
    if m.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=m.betas)
    if m.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if m.optimizer == "rmsprop-tf":
        return TF1RMSProp(params, lr=lr)
    raise ValueError(f"PlainTrainer: optimizer {m.optimizer!r} is not one of adam, rmsprop, "
                     f"rmsprop-tf")


# ------------------------------------------------------------------ input gradients


def scores_and_gradient_norm(D: nn.Module, x: torch.Tensor, create_graph: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``f = D(x)`` as ``(B,)`` and ``n_i = ||g_i||`` for ``g = autograd.grad(f.sum(), x)``
    (``x``'s own graph kept when it has one, so the generator gets gradients)."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    f = D(x).reshape(x.shape[0])
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=create_graph, retain_graph=True)
    return f, g.flatten(1).norm(dim=1)


# ------------------------------------------------------------------ the trainer

#: lipkernels modules holding network definitions written in plain torch (no op of
#: lipkernels in them), which a plain network may contain.
_PLAIN_LIPKERNELS_MODULES = ("lipkernels.models", "lipkernels.train")


def _lipkernels_origin(obj) -> Optional[str]:
    """The lipkernels module that defines ``obj`` (a class, a function, a bound method or
    a wrapped hook), None when it is not lipkernels code."""
    obj = getattr(obj, "hook", obj)          # torch's _WrappedHook (state-dict hooks)
    owner = getattr(obj, "__self__", None)   # a bound method: its object's class
    where = type(owner).__module__ if owner is not None else getattr(obj, "__module__", None)
    return where if isinstance(where, str) and where.split(".")[0] == "lipkernels" else None


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _lipkernels_hooks(module: nn.Module) -> List[Tuple[str, int]]:
    return [(d, k) for d in _HOOK_DICTS for k, fn in getattr(module, d, {}).items()
            if _lipkernels_origin(fn)]


def check_plain(net: nn.Module, what: str) -> None:
    """Raise TypeError if ``net`` runs lipkernels code: a layer of lipkernels.nn (or any
    lipkernels class outside the plain network definitions), or a lipkernels hook."""
    found = []
    for name, module in net.named_modules():
        where = _lipkernels_origin(type(module))
        if where and not where.startswith(_PLAIN_LIPKERNELS_MODULES):
            found.append(f"{name or '<root>'}: {type(module).__name__} ({where})")
        found += [f"{name or '<root>'}: hook {d}[{k}]" for d, k in _lipkernels_hooks(module)]
    if found:
        raise TypeError(f"PlainTrainer: {what} runs lipkernels code ({'; '.join(found)}); "
                        f"make the plain twin with PlainTrainer.twin_of(trainer)")


class PlainTrainer(StepLoop):
    """The plain-PyTorch reference of ``lipkernels.train.methods.Trainer``: the same
    constructor (``Method``, G, D, z_dim, dtype) and the same step loop
    (``methods.StepLoop``: :meth:`step`, :meth:`d_step`, :meth:`sample`, :meth:`z`, so the
    same random draws in the same order: per critic step the fake batch's ``z``, then
    WGAN-GP's ``alpha``; then the generator's ``z``); every formula (:meth:`d_loss`,
    :meth:`g_loss`, :meth:`clip_`, the optimizers, spectral norm) written from the papers'
    official code (module docstring)."""

    def __init__(self, m: Method, G: nn.Module, D: nn.Module, z_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        if m.wrap not in (None, "gn", "gran"):
            raise ValueError(f"PlainTrainer: wrap must be None, 'gn' or 'gran', got {m.wrap!r}")
        check_plain(G, "G")
        check_plain(D, "D")
        self.m, self.G, self.D, self.z_dim, self.dtype = m, G.to(dtype), D.to(dtype), z_dim, dtype
        self.loss_d, self.loss_g = PLAIN_LOSSES[loss_name(m.loss)]
        self.opt_d = plain_optimizer(m, D.parameters())
        # The generator's own learning rate where the method has one (SA-GAN's TTUR).
        self.opt_g = plain_optimizer(m, G.parameters(), getattr(m, "lr_g", None))
        # The step loop (methods.StepLoop: the order of the draws and updates) calls these.
        self._d_loss, self._g_loss = self.d_loss, self.g_loss

    @classmethod
    def twin_of(cls, trainer) -> "PlainTrainer":
        """The plain twin of a lipkernels ``Trainer``: a copy of its G and D in plain torch
        (:func:`plain_copy`: torch's spectral norm in place of lipkernels') with the same
        parameters, u, v and running statistics, and the per-parameter state of its
        optimizers (the hyper-parameters come from the Method, not from the Trainer)."""
        twin = cls(trainer.m, plain_copy(trainer.G), plain_copy(trainer.D), trainer.z_dim,
                   trainer.dtype)
        _copy_optimizer_state(trainer.G, twin.G, trainer.opt_g, twin.opt_g)
        _copy_optimizer_state(trainer.D, twin.D, trainer.opt_d, twin.opt_d)
        return twin

    def scores(self, x: torch.Tensor, generator_step: bool = False) -> torch.Tensor:
        """The discriminator's outputs ``(B,)``: D itself, or GN / GraN of it (GN's
        first-order generator step when ``generator_step`` and ``m.first_order_g``)."""
        m = self.m
        if m.wrap is None:
            return self.D(x).reshape(-1)   # one output per sample, or per pack (PacGAN)
        # GraN has no first-order variant (the Trainer runs it exactly in both steps).
        first_order = generator_step and m.first_order_g and m.wrap == "gn"
        f, n = scores_and_gradient_norm(self.D, x, create_graph=not first_order)
        if m.wrap == "gn":
            return f / ((n.detach() if first_order else n) + f.abs())
        return f * n / (n * n + m.gran_eps) / m.gran_tau

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor,
                         alpha: torch.Tensor) -> torch.Tensor:
        """WGAN-GP: ``lambda mean_i (||grad D(x_hat_i)|| - 1)^2``,
        ``x_hat = alpha real + (1 - alpha) fake`` (Gulrajani et al., Algorithm 1)."""
        a = alpha.reshape((-1,) + (1,) * (real.dim() - 1))
        x_hat = a * real.detach() + (1 - a) * fake.detach()
        _, n = scores_and_gradient_norm(self.D, x_hat, create_graph=True)
        return self.m.gp_weight * ((n - 1) ** 2).mean()

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor,
               alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The discriminator's loss on one batch: one D forward on ``cat([real, fake])``
        (one power iteration per spectral-norm layer; GN-GAN's code concatenates too), plus the
        gradient penalty with weights ``alpha`` (drawn when None)."""
        b = real.shape[0]
        out = self.scores(torch.cat([real, fake]))
        k = real_split(out, real, fake)   # real outputs first: samples or packs
        loss = self.loss_d(out[:k], out[k:])
        if self.m.gp_weight is not None:
            if alpha is None:
                alpha = torch.rand(b, dtype=real.dtype, device=real.device)
            loss = loss + self.gradient_penalty(real, fake, alpha)
        return loss

    def g_loss(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's loss for latents ``z`` (call with D's weights frozen)."""
        return self.g_loss_of(self.G(z))

    def g_loss_of(self, fake: torch.Tensor) -> torch.Tensor:
        """The generator's loss for its samples ``fake`` (PacGAN's simultaneous step)."""
        return self.loss_g(self.scores(fake, generator_step=True))

    @torch.no_grad()
    def clip_(self) -> None:
        """WGAN weight clipping (Arjovsky et al., Algorithm 1, and their code)."""
        for p in self.D.parameters():
            p.data.clamp_(-self.m.clip, self.m.clip)


# ------------------------------------------------------------------ from lipkernels to plain

def _to_torch_spectral_norm(module: nn.Module) -> None:
    """Replace the lipkernels spectral-norm parametrizations of ``module`` (a deep copy)
    by torch's own, then load the module's state (original weights, ``_u``, ``_v``): the
    state dicts of the two are the same (lipkernels/nn/spectral_norm.py).

    ``parametrize.remove_parametrizations`` is not used: a deep copy shares its
    parametrized class with the original, and removing would delete the original's
    ``weight`` property too. The copy gets its plain class back instead."""
    from ..nn.spectral_norm import _SpectralNorm as LipkernelsSpectralNorm
    if not parametrize.is_parametrized(module):
        return
    plists = dict(module.parametrizations.items())
    lipkernels_sn = {name: len(pl) == 1 and isinstance(pl[0], LipkernelsSpectralNorm)
                     for name, pl in plists.items()}
    if not any(lipkernels_sn.values()):
        return
    if not all(lipkernels_sn.values()):
        raise NotImplementedError(f"plain_copy: {type(module).__name__} has parametrizations "
                                  f"other than one lipkernels spectral norm per tensor")
    state = module.state_dict()
    settings = {name: dict(n_power_iterations=getattr(pl[0], "n_power_iterations", 1),
                           eps=pl[0].eps, dim=pl[0].dim) for name, pl in plists.items()}
    cls = type(module).__bases__[0]           # below torch's injected Parametrized* class
    while _lipkernels_origin(cls):            # lipkernels' SN* layers: torch layers whose
        cls = cls.__bases__[0]                # __init__ registers the parametrization
    del module._modules["parametrizations"]
    module.__class__ = cls
    for name, pl in plists.items():
        original = pl.original
        if isinstance(original, nn.Parameter):
            module.register_parameter(name, original)
        else:
            module.register_buffer(name, original)
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):   # torch draws u, v at registration
        for name, kwargs in settings.items():
            torch.nn.utils.parametrizations.spectral_norm(module, name, **kwargs)
    module.load_state_dict(state)


def plain_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` in plain torch: lipkernels' spectral norm replaced by
    ``torch.nn.utils.parametrizations.spectral_norm`` with the same state, lipkernels'
    hooks (``SpectralNormGroup``) and attributes dropped. Raises TypeError if lipkernels
    code is left (:func:`check_plain`)."""
    net = copy.deepcopy(net)
    modules = list(net.modules())
    for module in modules:
        for d, k in _lipkernels_hooks(module):
            del getattr(module, d)[k]
        for key in [k for k, v in vars(module).items()
                    if k.startswith("_lipkernels")
                    or (_lipkernels_origin(type(v)) and not isinstance(v, nn.Module))]:
            del module.__dict__[key]
    for module in modules:
        _to_torch_spectral_norm(module)
    check_plain(net, "the copy")
    return net


def _copy_optimizer_state(theirs_net: nn.Module, ours_net: nn.Module,
                          theirs: torch.optim.Optimizer, ours: torch.optim.Optimizer) -> None:
    """Copy the per-parameter state (Adam's moments, RMSprop's averages, the step
    count) of ``theirs`` into ``ours``, keeping ``ours``' hyper-parameters."""
    state = theirs.state_dict()["state"]
    if not state:
        return
    names = [n for n, _ in theirs_net.named_parameters()]
    if names != [n for n, _ in ours_net.named_parameters()]:
        raise ValueError("PlainTrainer.twin_of: the plain copy's parameters are not in the "
                         "order of the original's; cannot map the optimizer state")
    mine = ours.state_dict()
    mine["state"] = copy.deepcopy(state)
    ours.load_state_dict(mine)


__all__ = ["PlainTrainer", "PLAIN_LOSSES", "TF1RMSProp", "check_plain", "loss_name",
           "plain_copy", "plain_optimizer", "scores_and_gradient_norm"]
