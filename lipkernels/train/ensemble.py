"""The seeds of one GAN method trained as one stacked ensemble.

:class:`EnsembleTrainer` trains K seeds of a method at once: the K generators' and the K
discriminators' parameters and buffers are stacked (``torch.func.stack_module_state``),
and every D and G step is one ``torch.func.vmap`` over ``torch.func.grad_and_value`` of
``torch.func.functional_call`` of the :class:`~lipkernels.train.methods.Trainer`'s own
:meth:`~lipkernels.train.methods.Trainer.d_loss` / :meth:`~lipkernels.train.methods.Trainer.g_loss`
(so the losses, penalties, GN and GraN are lipkernels' and the Trainer's, not a copy),
followed by one optimizer step on the stacked tensors. The stacking shares the per-call
overhead of the small 2-D networks between the seeds, but functorch's dispatch (vmap,
grad, functional_call, vjp, custom autograd Functions under a transform) adds its own,
and on CPU the matmuls cost the same stacked or not. Measured (2 shared cores, 1 thread,
float32, batch 128, ring8, torch 2.13): for 3 seeds no faster than 3 runs one after
another (``grad='func'`` 0.5-0.9x, ``grad='autograd'`` 0.8-1.1x); for 10 seeds
1.2-1.3x and 1.4-1.6x.

The math is that of K separate runs: member ``k`` is the run
``runner.train_run(method, data, steps, seed=seeds[k], batch=batch)``, draw for draw:

* it is seeded as ``train_run`` seeds a run (``torch.manual_seed(seed)``, the
  protocol's ``build``, the Trainer), and the global RNG's state at that point is
  kept in a ``torch.Generator`` of its own, from which the member then draws what the
  run draws from the global RNG, in the same order: per D step the fake ``z`` and,
  for a gradient penalty, ``alpha``; then the generator's ``z``;
* its real batches come from ``data.Sampler(data, seed, dtype)``, as the run's do;
* Adam, torch's RMSprop and TensorFlow's RMSprop (:class:`~lipkernels.train.methods.TFRMSprop`)
  are elementwise with one step counter per tensor, and every member steps together:
  one optimizer over the stacked tensors is K optimizers (tests/test_train_ensemble.py
  checks torch's Adam and RMSprop with their default settings bit for bit); the WGAN
  clipping is elementwise too.

Under the transforms GN, GraN and the gradient penalty take their input gradient with
``torch.func.vjp`` (lipkernels/nn/_grad.py) instead of the eager run's double backward:
the same numbers up to rounding (float64: the per-step losses and final weights of 20
steps agree with the unbatched runs within 1e-9, measured 5e-13 at most). Spectral normalization (SNGAN) works:
the stacked ``u``, ``v`` buffers are updated in place by the power iteration, one pair
per member (docs/math.md section 11).

Not supported (``NotImplementedError``): networks with BatchNorm (the digits
generator, so the digits data and SA-GAN) or dropout. BatchNorm's batch statistics and
running-statistics updates, and dropout's masks drawn from the global RNG, are not
what this class reproduces member by member; the 2-D data's MLPs have neither.

    >>> ens = EnsembleTrainer("gngan", "ring8", seeds=(0, 1, 2), batch=128)
    >>> for _ in range(100):
    ...     losses = ens.step()          # [(d_loss, g_loss) of seed 0, of seed 1, of seed 2]
    >>> G1, D1 = ens.member(1)           # plain modules, seed 1's current weights
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from .. import clip_weights_, use_backend
from . import data as data_mod
from . import methods as methods_mod
from . import protocols as protocols_mod

#: Module types whose behaviour an ensemble member would not reproduce (see the module
#: docstring), with the reason given in the error.
_UNSUPPORTED = (
    (nn.modules.batchnorm._BatchNorm,
     "BatchNorm (its batch statistics and in-place running-statistics updates are not "
     "reproduced member by member under vmap here)"),
    (nn.modules.dropout._DropoutNd,
     "dropout (its masks come from the global RNG, not from the member's generator)"),
)


def seeded_member(p: protocols_mod.Protocol, m: methods_mod.Method, data: str, seed: int,
                  dtype: torch.dtype = torch.float32
                  ) -> Tuple[methods_mod.Trainer, torch.Generator]:
    """What ``runner.train_run`` does before its first step, for one seed:
    ``torch.manual_seed(seed)``, the protocol's networks, the Trainer; returns the
    Trainer and a generator holding the global RNG's state at that point, from which
    ``torch.randn(..., generator=g)`` / ``torch.rand`` give the draws the run takes from
    the global RNG. Leaves the global RNG as the run would have it (seeded and used by
    the build); :class:`EnsembleTrainer` calls it inside ``torch.random.fork_rng``."""
    torch.manual_seed(seed)
    G, D, z_dim = p.build(m, data)
    trainer = methods_mod.Trainer(m, G, D, z_dim, dtype)
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    return trainer, generator


def check_supported(m: methods_mod.Method, G: nn.Module, D: nn.Module, data: str) -> None:
    """Raise ``NotImplementedError`` naming the reason when the ensemble cannot
    reproduce method ``m``'s runs on ``data`` (networks ``G``, ``D``)."""
    if m.simultaneous or m.pack > 1:
        raise NotImplementedError(
            f"EnsembleTrainer: method {m.name!r} on data {data!r} is not supported: PacGAN's "
            f"simultaneous update and packing are not stacked. Train its seeds one by one "
            f"with lipkernels.train.runner.train_run")
    for name, net in (("generator", G), ("discriminator", D)):
        for mod in net.modules():
            for cls, why in _UNSUPPORTED:
                if isinstance(mod, cls):
                    raise NotImplementedError(
                        f"EnsembleTrainer: method {m.name!r} on data {data!r} is not supported: "
                        f"its {name} has {type(mod).__name__}: {why}. Train its seeds one by "
                        f"one with lipkernels.train.runner.train_run")


class _Losses(nn.Module):
    """The Trainer's D and G losses as one module holding its ``G`` and ``D``, so that
    ``functional_call`` with keys ``G.*`` / ``D.*`` runs them with any parameters and
    buffers (the Trainer's GradNorm / GraN wrap the same ``D`` object, and see them too)."""

    def __init__(self, trainer: methods_mod.Trainer) -> None:
        super().__init__()
        self.G = trainer.G
        self.D = trainer.D
        object.__setattr__(self, "trainer", trainer)   # not a submodule

    def forward(self, which: str, *args):
        if which == "d_loss":
            real, z, alpha = args
            with torch.no_grad():        # the fake batch, as Trainer.d_step draws it
                fake = self.G(z)
            return self.trainer.d_loss(real, fake, alpha)
        return self.trainer.g_loss(*args)


def _summed_grad(losses_fn):
    """``grad="autograd"``: ``(grads, losses)`` from one ordinary backward of the sum of
    the members' losses ``losses_fn(params, ...)`` (``(K,)``) into ``params``."""
    def fn(params, *args):
        losses = losses_fn(params, *args)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        return dict(zip(params, grads)), losses.detach()
    return fn


def _set_grads(params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor]) -> None:
    for k, p in params.items():
        p.grad = grads[k]


def _prefixed(prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


class EnsembleTrainer:
    """``K = len(seeds)`` runs of ``method_name`` on ``data``, trained as one stacked
    ensemble; member ``k`` equals ``runner.train_run(method_name, data, steps,
    seed=seeds[k], batch=batch, dtype=dtype, protocol=protocol, backend=backend)``
    (module docstring).

    Args:
        method_name: a method of the protocol (``methods.METHODS`` for ``small``).
        data: a data set of the protocol whose networks have no BatchNorm / dropout
            (the 2-D data sets).
        seeds: the members' seeds.
        batch: the batch size (None: the protocol's for ``data``).
        dtype: the networks' and the data's dtype.
        protocol: the protocol's name (None: the one holding ``data``, as ``train_run``).
        backend: the lipkernels backend the steps run with (as ``train_run``'s).
        grad: how the stacked gradients are taken. ``'func'``:
            ``vmap(torch.func.grad_and_value(member loss))``, every member's gradient
            under the transforms. ``'autograd'`` (default): ``vmap`` of the members' losses, then
            one ordinary ``torch.autograd.grad`` of their sum into the stacked tensors
            (member ``k``'s slice of that gradient is its own gradient: the other losses
            do not depend on it); the same numbers, with the backward outside functorch's
            dispatch, which made it the faster of the two on a 2-core CPU (torch 2.13).
    """

    GRADS = ("func", "autograd")

    def __init__(self, method_name: str, data: str, seeds: Sequence[int],
                 batch: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 protocol: Optional[str] = None, backend: str = "auto",
                 grad: str = "autograd") -> None:
        if grad not in self.GRADS:
            raise ValueError(f"EnsembleTrainer: grad must be one of {', '.join(self.GRADS)}, "
                             f"got {grad!r}")
        p, m = protocols_mod.find(method_name, data, protocol)
        if p.data_points is not None or p.sample_eval:
            raise NotImplementedError(
                f"EnsembleTrainer: the {p.name} protocol is not supported (its fixed training "
                f"set and eval-mode sampling are not stacked); train its seeds one by one "
                f"with lipkernels.train.runner.train_run")
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("EnsembleTrainer: seeds must hold at least one seed")
        self.protocol, self.m, self.data = p, m, data
        self.seeds, self.dtype, self.backend, self.grad = seeds, dtype, backend, grad
        self.batch = int(batch or p.batch[data])
        members: List[methods_mod.Trainer] = []
        self.generators: List[torch.Generator] = []
        with torch.random.fork_rng(devices=[]):
            for s in seeds:
                trainer, gen = seeded_member(p, m, data, s, dtype)
                check_supported(m, trainer.G, trainer.D, data)
                members.append(trainer)
                self.generators.append(gen)
        # The members' real data, as train_run makes it (its own generator per seed).
        self.samplers = [data_mod.Sampler(data, s, dtype) for s in seeds]
        # Member 0's Trainer computes every member's losses, its G and D reparametrized
        # by functional_call with the stacked tensors; the others are only stacked.
        self.trainer = members[0]
        self.z_dim = self.trainer.z_dim
        self._losses = _Losses(self.trainer)
        g_params, self.g_buffers = stack_module_state([t.G for t in members])
        d_params, self.d_buffers = stack_module_state([t.D for t in members])
        # Leaves updated in place by the optimizers. For 'func' without requires_grad
        # (torch.func.grad differentiates them; no outer graph is recorded).
        track = grad == "autograd"
        self.g_params = {k: v.detach().requires_grad_(track) for k, v in g_params.items()}
        self.d_params = {k: v.detach().requires_grad_(track) for k, v in d_params.items()}
        self._g_state = (_prefixed("G.", self.g_params), _prefixed("G.", self.g_buffers))
        self._d_state = (_prefixed("D.", self.d_params), _prefixed("D.", self.d_buffers))
        # D's parameters as constants of the G step (views sharing their storage).
        self._d_const = ({k: v.detach() for k, v in self._d_state[0].items()}, self._d_state[1])
        self.opt_d = methods_mod.make_optimizer(m, list(self.d_params.values()))
        self.opt_g = methods_mod.make_optimizer(m, list(self.g_params.values()), m.lr_g)
        d_dims = (0, 0, 0, 0, 0, 0, 0 if m.gp_weight is not None else None)
        if grad == "func":
            self._d_grad = vmap(grad_and_value(self._d_loss_one), in_dims=d_dims)
            self._g_grad = vmap(grad_and_value(self._g_loss_one))
        else:
            self._d_grad = _summed_grad(vmap(self._d_loss_one, in_dims=d_dims))
            self._g_grad = _summed_grad(vmap(self._g_loss_one))

    # -- one member's losses (vmapped over the stacked state; the first argument is
    # -- what is differentiated) ------------------------------------------------------

    def _call(self, params, buffers, args):
        return functional_call(self._losses, (params, buffers), args, tie_weights=False)

    def _d_loss_one(self, d_params, d_buffers, g_params, g_buffers, real, z, alpha):
        # G's output is a constant of the D step (computed under no_grad).
        return self._call({**g_params, **d_params}, {**g_buffers, **d_buffers},
                          ("d_loss", real, z, alpha))

    def _g_loss_one(self, g_params, g_buffers, d_params, d_buffers, z):
        # D's parameters are constants here (not differentiated), as the Trainer's
        # requires_grad_(False) makes them; its buffers (spectral norm's u, v) update.
        return self._call({**g_params, **d_params}, {**g_buffers, **d_buffers}, ("g_loss", z))

    # -- training ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.seeds)

    def _z(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.batch, self.z_dim, dtype=self.dtype, generator=g)
                            for g in self.generators])

    def step(self) -> List[Tuple[float, float]]:
        """One generator step of every member after ``n_critic`` discriminator steps
        (as :meth:`Trainer.step`); returns each member's ``(mean D loss, G loss)``."""
        m, b = self.m, self.batch
        # As train_run: the n_critic real batches of the step first.
        reals = [[s(b) for _ in range(m.n_critic)] for s in self.samplers]
        d_losses = []
        with use_backend(self.backend):
            for i in range(m.n_critic):
                real = torch.stack([r[i] for r in reals])
                z = self._z()          # each member: its z, then its alpha, as Trainer.d_step
                alpha = (torch.stack([torch.rand(b, dtype=self.dtype, generator=g)
                                      for g in self.generators])
                         if m.gp_weight is not None else None)
                grads, loss = self._d_grad(*self._d_state, *self._g_state, real, z, alpha)
                _set_grads(self._d_state[0], grads)
                self.opt_d.step()
                if m.clip is not None:
                    clip_weights_(self.d_params.values(), m.clip)
                d_losses.append(loss.detach())
            grads, g_loss = self._g_grad(*self._g_state, *self._d_const, self._z())
            _set_grads(self._g_state[0], grads)
            self.opt_g.step()
        for params in (self.d_params, self.g_params):
            for p in params.values():
                p.grad = None
        per_step = torch.stack(d_losses).tolist()        # (n_critic, K)
        g_list = g_loss.detach().tolist()
        # The mean as Trainer.step takes it (a Python sum of the floats, in step order).
        return [(sum(row[k] for row in per_step) / len(per_step), g_list[k])
                for k in range(len(self.seeds))]

    def run(self, steps: int) -> List[Dict[str, List[float]]]:
        """``steps`` calls of :meth:`step`; each member's ``{"d_loss": [...], "g_loss":
        [...]}`` per step (the lists of ``train_run``'s result)."""
        out = [{"d_loss": [], "g_loss": []} for _ in self.seeds]
        for _ in range(steps):
            for log, (d, g) in zip(out, self.step()):
                log["d_loss"].append(d)
                log["g_loss"].append(g)
        return out

    # -- members ----------------------------------------------------------------------

    def state_dicts(self, k: int) -> Tuple[dict, dict]:
        """Member ``k``'s G and D state dicts (parameters and buffers, copies)."""
        def one(params, buffers):
            return {name: t[k].detach().clone() for name, t in {**params, **buffers}.items()}
        return one(self.g_params, self.g_buffers), one(self.d_params, self.d_buffers)

    def member(self, k: int) -> Tuple[nn.Module, nn.Module]:
        """Member ``k``'s ``(G, D)``: plain modules (the protocol's networks, without the
        Trainer's spectral-norm group) holding its current parameters and buffers."""
        if not -len(self.seeds) <= k < len(self.seeds):
            raise IndexError(f"member {k} of an ensemble of {len(self.seeds)}")
        g_state, d_state = self.state_dicts(k)
        with torch.random.fork_rng(devices=[]):
            G, D, _ = self.protocol.build(self.m, self.data)
        G, D = G.to(self.dtype), D.to(self.dtype)
        G.load_state_dict(g_state)
        D.load_state_dict(d_state)
        return G, D


__all__ = ["EnsembleTrainer", "seeded_member", "check_supported"]
