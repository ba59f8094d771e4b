"""The GAN methods of the seed papers, each with its paper's default hyper-parameters,
built from lipkernels' layers, penalties and losses.

=========  ===================================================================================
method     what it is (loss; Lipschitz device; optimizer; discriminator steps per G step)
=========  ===================================================================================
nsgan      non-saturating GAN (Goodfellow et al. 2014), the baseline: BCE on logits; none;
           Adam(2e-4, betas (0.5, 0.999)) as DCGAN (Radford et al. 2016); 1
wgan       WGAN (Arjovsky et al. 2017, Algorithm 1): Wasserstein loss; weight clipping to
           [-0.01, 0.01] with ``lipkernels.clip_weights_`` after every critic step;
           RMSprop(5e-5); 5
wgangp     WGAN-GP (Gulrajani et al. 2017, Algorithm 1): Wasserstein loss + ``lambda = 10``
           gradient penalty (``lipkernels.gradient_penalty``); Adam(1e-4, betas (0, 0.9)); 5
sngan      SNGAN (Miyato et al. 2018): hinge loss; every D layer spectrally normalized by
           lipkernels (``SNLinear`` / ``lipkernels.spectral_norm``, one power iteration, all
           layers batched by ``SpectralNormGroup``); Adam(1e-4, betas (0.5, 0.9)), the
           paper's setting A (Table 1); 5
gngan      GN-GAN (Wu et al. ICCV 2021): BCE on ``lipkernels.nn.GradNorm(D)``, exact double
           backprop in both steps; Adam(2e-4, betas (0, 0.9)) for D and G; 1 (the authors'
           CNN configuration, ``config/GN-GAN_CIFAR10_CNN.txt`` of basiclab/GNGAN-PyTorch)
gngan-fo   GN-GAN with the first-order generator step (``GradNorm(D, first_order=True)``
           in the G step only; the D step stays exact); as gngan otherwise
grand      GraN-GAN discriminator (Bhaskara et al. WACV 2022), GraND: BCE on the logits
           ``lipkernels.nn.GraN(D, tau=1, eps=1e-8)``; optimizer and steps as gngan
granc      GraN-GAN critic, GraNC: hinge loss on ``GraN(D, tau=1, eps=1e-8)``; as grand
sagan      SA-GAN (Zhang et al. 2019), digits only: ``models.sagan_digits_generator`` /
           ``sagan_digits_discriminator`` (a self-attention block at 8x8 in each, as the
           official ``non_local.py``), spectral norm on every layer of G and D; hinge loss;
           Adam(betas (0, 0.9)), D 4e-4, G 1e-4 (the paper's two time-scale rule); 1
sagan-noattn  sagan without the attention blocks: SA-GAN's ablation baseline ("SN on G/D +
           TTUR", its Table 1), to measure what the attention itself does here
=========  ===================================================================================

GraN-GAN: the paper's own optimizer settings, tau and eps could not be checked against a
primary source in this project (docs/math.md section 5); the GN-GAN CNN configuration and
tau = 1 (K = 1) are used, and eps = 1e-8: GraN normalizes only where the input-gradient
norm n is well above sqrt(eps), and the digits discriminator starts at n of about 6.5e-4
(median over real digits, ``--diagnose``), below lipkernels' default sqrt(1e-4) = 0.01:
with that eps GraND and GraNC collapsed to one class in every seed (docs/training.md,
"GraN-GAN's eps").

Networks (small, to train on two CPU cores): for the 2-D mixtures a generator
``z in R^2 -> 128 -> 128 -> 2`` (ReLU) and a discriminator ``2 -> 128 -> 128 -> 1``
(LeakyReLU 0.1: piecewise linear, as GN's first-order step assumes); for the 16x16
digits the SNGAN paper's CNN discriminator (``lipkernels.models.sngan_cnn_discriminator``,
Table 3 (b)) with widths (16, 32, 64, 64) and one input channel, and a DCGAN-style
generator ``z in R^32 -> dense 4x4x64 -> deconv 64->32 -> deconv 32->16 -> conv 16->1``
(BatchNorm + ReLU, tanh output).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .. import clip_weights_, losses, models
from .. import nn as lnn

Z_DIM = {"2d": 2, "digits": 32}


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    loss: losses.GANLoss
    optimizer: str            # "adam", "rmsprop" (torch's) or "rmsprop-tf" (TensorFlow 1's)
    lr: float
    betas: Tuple[float, float] = (0.5, 0.999)
    n_critic: int = 1
    clip: Optional[float] = None       # WGAN weight clipping c
    gp_weight: Optional[float] = None  # WGAN-GP lambda
    spectral_norm: bool = False
    wrap: Optional[str] = None         # None, "gn", "gran"
    first_order_g: bool = False
    gran_tau: float = 1.0
    gran_eps: float = 1e-8
    source: str = ""
    lr_g: Optional[float] = None       # the generator's learning rate when not ``lr`` (TTUR)
    sn_g: bool = False                 # spectral norm in G too (SA-GAN)
    attention: bool = False            # SA-GAN's self-attention blocks in G and D
    data: Optional[Tuple[str, ...]] = None   # the data sets it applies to (None: all)
    #: PacGAN's packing: D judges ``pack`` samples at once (its networks take them
    #: concatenated, ``protocols.Packed``); a batch is ``batch`` packs of ``pack`` samples
    pack: int = 1
    #: PacGAN's (ALI's) update: D's and G's gradients at the same parameters from one batch
    #: of fakes, then both steps (``n_critic`` 1); False: the alternating steps of the
    #: WGAN / SNGAN papers' algorithms (``n_critic`` D steps, then a G step on new fakes)
    simultaneous: bool = False

    def __post_init__(self) -> None:
        if self.pack < 1:
            raise ValueError(f"Method {self.name}: pack must be >= 1, got {self.pack}")
        if self.pack > 1 and (self.wrap is not None or self.gp_weight is not None):
            raise ValueError(f"Method {self.name}: packing (pack {self.pack}) is defined here for "
                             f"a plain discriminator only, not with wrap / gp_weight")
        if self.simultaneous and (self.n_critic != 1 or self.gp_weight is not None):
            raise ValueError(f"Method {self.name}: the simultaneous update needs n_critic 1 and "
                             f"no gradient penalty")


METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("nsgan", "NS-GAN", losses.nonsaturating, "adam", 2e-4, (0.5, 0.999), 1,
           source="Goodfellow et al. 2014; Adam as DCGAN (Radford et al. 2016)"),
    Method("wgan", "WGAN (clip)", losses.wasserstein, "rmsprop", 5e-5, n_critic=5, clip=0.01,
           source="Arjovsky et al. 2017, Algorithm 1"),
    Method("wgangp", "WGAN-GP", losses.wasserstein, "adam", 1e-4, (0.0, 0.9), 5, gp_weight=10.0,
           source="Gulrajani et al. 2017, Algorithm 1"),
    Method("sngan", "SNGAN (hinge)", losses.hinge, "adam", 1e-4, (0.5, 0.9), 5, spectral_norm=True,
           source="Miyato et al. 2018, Table 1 setting A"),
    Method("gngan", "GN-GAN", losses.nonsaturating, "adam", 2e-4, (0.0, 0.9), 1, wrap="gn",
           source="Wu et al. 2021; GN-GAN_CIFAR10_CNN config of the authors' code"),
    Method("gngan-fo", "GN-GAN (first-order G)", losses.nonsaturating, "adam", 2e-4, (0.0, 0.9), 1,
           wrap="gn", first_order_g=True,
           source="Wu et al. 2021, the 'Faster GN-GAN' generator step"),
    Method("grand", "GraND (GraN-GAN)", losses.nonsaturating, "adam", 2e-4, (0.0, 0.9), 1,
           wrap="gran", source="Bhaskara et al. 2022; optimizer as GN-GAN (not verified)"),
    Method("granc", "GraNC (GraN-GAN)", losses.hinge, "adam", 2e-4, (0.0, 0.9), 1, wrap="gran",
           source="Bhaskara et al. 2022; optimizer as GN-GAN (not verified)"),
    Method("sagan", "SA-GAN", losses.hinge, "adam", 4e-4, (0.0, 0.9), 1, spectral_norm=True,
           lr_g=1e-4, sn_g=True, attention=True, data=("digits",),
           source="Zhang et al. 2019: hinge loss, SN in G and D, Adam(0, 0.9), TTUR lr D 4e-4, "
                  "G 1e-4, 1 D step; self-attention as the official non_local.py"),
    Method("sagan-noattn", "SA-GAN without attention", losses.hinge, "adam", 4e-4, (0.0, 0.9), 1,
           spectral_norm=True, lr_g=1e-4, sn_g=True, data=("digits",),
           source="Zhang et al. 2019, Table 1's baseline 'SN on G/D + TTUR': sagan without the "
                  "self-attention blocks"),
]}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None


# ------------------------------------------------------------------ networks

def _mlp_generator(z_dim: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 2))


def _mlp_discriminator(sn: bool, width: int = 128) -> nn.Module:
    lin = lnn.SNLinear if sn else nn.Linear
    return nn.Sequential(lin(2, width), nn.LeakyReLU(0.1), lin(width, width), nn.LeakyReLU(0.1),
                         lin(width, 1))


def _digits_generator(z_dim: int, c: Tuple[int, int, int] = (64, 32, 16)) -> nn.Module:
    c0, c1, c2 = c
    return nn.Sequential(
        nn.Linear(z_dim, 4 * 4 * c0), nn.Unflatten(1, (c0, 4, 4)), nn.BatchNorm2d(c0), nn.ReLU(),
        nn.ConvTranspose2d(c0, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.ConvTranspose2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.Conv2d(c2, 1, 3, 1, 1), nn.Tanh(),
    )


def _digits_discriminator(sn: bool) -> nn.Module:
    from .. import spectral_norm
    return models.sngan_cnn_discriminator(norm=spectral_norm if sn else None,
                                          channels=(16, 32, 64, 64), in_channels=1, image_size=16)


def kind(data: str) -> str:
    return "digits" if data == "digits" else "2d"


def build(m: Method, data: str) -> Tuple[nn.Module, nn.Module, int]:
    """``(G, D, z_dim)`` for method ``m`` on ``data`` (seed the RNG before calling)."""
    k = kind(data)
    z_dim = Z_DIM[k]
    if m.attention or m.sn_g:
        from .. import spectral_norm
        if k != "digits":
            raise ValueError(f"method {m.name} (SA-GAN's networks) needs image data, got {data!r}")
        return (models.sagan_digits_generator(z_dim, norm=spectral_norm, attention=m.attention),
                models.sagan_digits_discriminator(norm=spectral_norm, attention=m.attention), z_dim)
    if k == "2d":
        G, D = _mlp_generator(z_dim), _mlp_discriminator(m.spectral_norm)
    else:
        G, D = _digits_generator(z_dim), _digits_discriminator(m.spectral_norm)
    return G, D, z_dim


class TFRMSprop(torch.optim.Optimizer):
    """TensorFlow 1's ``RMSPropOptimizer`` (no momentum, not centred), the optimizer of
    the official toy script's clipping baseline: ``ms = decay ms + (1 - decay) g^2`` with
    ``ms`` started at 1, ``p -= lr g / sqrt(ms + epsilon)``. torch's RMSprop differs in
    all three (alpha 0.99, epsilon outside the root, accumulator started at 0, which
    makes its first step ``10 lr sign(g)``)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, decay: float = 0.9,
                 eps: float = 1e-10) -> None:
        super().__init__(params, dict(lr=lr, decay=decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["ms"] = torch.ones_like(p)
                ms = state["ms"]
                ms.mul_(group["decay"]).addcmul_(p.grad, p.grad, value=1 - group["decay"])
                p.addcdiv_(p.grad, (ms + group["eps"]).sqrt_(), value=-group["lr"])
        return None


def make_optimizer(m: Method, params, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """The optimizer of method ``m`` for ``params`` (learning rate ``lr``, default ``m.lr``)."""
    lr = m.lr if lr is None else lr
    if m.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if m.optimizer == "rmsprop-tf":
        return TFRMSprop(params, lr=lr)
    if m.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=m.betas)
    raise ValueError(f"optimizer must be adam, rmsprop or rmsprop-tf, got {m.optimizer!r}")


# ------------------------------------------------------------------ one training step

@contextlib.contextmanager
def kept_buffers(module: nn.Module):
    """Run the block and put ``module``'s buffers (spectral norm's u, v, running
    statistics) back as they were: measuring a run does not change it."""
    saved = {k: v.clone() for k, v in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in module.named_buffers():
                v.copy_(saved[k])


def real_split(out: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> int:
    """How many of D's outputs on ``cat([real, fake])`` are the real data's: ``len(real)``,
    or its number of packs when D packs samples (PacGAN)."""
    return out.shape[0] * real.shape[0] // (real.shape[0] + fake.shape[0])


class StepLoop:
    """The order of a training step, shared by :class:`Trainer` and its plain-PyTorch
    twin (``plain.PlainTrainer``), which differ in their formulas only: a subclass sets
    ``m``, ``G``, ``D``, ``z_dim``, ``dtype``, ``opt_d``, ``opt_g``, the losses
    ``_d_loss(real, fake, alpha)`` and ``_g_loss(z)``, and ``clip_()``. Every random draw
    is made here, in one order (per D step the fake batch's ``z``, then a gradient
    penalty's ``alpha``; then the generator's ``z``), so two subclasses run from one seed
    draw the same numbers."""

    def z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.z_dim, dtype=self.dtype)

    def d_step(self, real: torch.Tensor, fake: Optional[torch.Tensor] = None) -> float:
        """One discriminator step on ``real`` against ``fake`` (drawn from G when None),
        then the weight clipping of the method; returns the D loss."""
        m = self.m
        b = real.shape[0]
        if fake is None:
            with torch.no_grad():
                fake = self.G(self.z(b))
        # Drawn here, in the order of the eager code, so compiled and eager runs
        # consume the random stream alike.
        alpha = (torch.rand(b, dtype=real.dtype, device=real.device)
                 if m.gp_weight is not None else None)
        d_loss = self._d_loss(real, fake, alpha)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        if m.clip is not None:
            self.clip_()
        return float(d_loss.detach())

    #: sample G in eval mode (its BatchNorm's running statistics), as PacGAN's code does;
    #: the runner sets it from the protocol
    sample_eval = False

    def step(self, real_batches: List[torch.Tensor]) -> Tuple[float, float]:
        """One generator step after ``len(real_batches) == n_critic`` D steps (or, for a
        simultaneous method, one step of both); returns ``(mean D loss, G loss)``."""
        if self.m.simultaneous:
            return self.simultaneous_step(real_batches[0])
        d_losses = [self.d_step(real) for real in real_batches]
        # Generator step: D's weights are constants here.
        self.D.requires_grad_(False)
        try:
            g_loss = self._g_loss(self.z(real_batches[0].shape[0]))
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            self.opt_g.step()
        finally:
            self.D.requires_grad_(True)
        return sum(d_losses) / len(d_losses), float(g_loss.detach())

    def simultaneous_step(self, real: torch.Tensor) -> Tuple[float, float]:
        """PacGAN's update (its ``ali_algorithm``): one batch of fakes ``G(z)``; D's
        gradient of its loss and G's of its loss, both at the current parameters; then
        both optimizer steps (and D's clipping, if any)."""
        fake = self.G(self.z(real.shape[0]))
        d_loss = self._d_loss(real, fake.detach(), None)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.D.requires_grad_(False)
        try:
            g_loss = self.g_loss_of(fake)
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
        finally:
            self.D.requires_grad_(True)
        self.opt_d.step()
        self.opt_g.step()
        if self.m.clip is not None:
            self.clip_()
        return float(d_loss.detach()), float(g_loss.detach())

    @torch.no_grad()
    def sample(self, n: int, chunk: int = 2500) -> torch.Tensor:
        """``n`` samples of G as it trains (training mode; eval mode with
        ``sample_eval``); G's buffers (spectral norm's u, v, running statistics) are put
        back afterwards, so measuring a run does not change it."""
        was = self.G.training
        with kept_buffers(self.G):
            self.G.train(not self.sample_eval and was)
            try:
                out = [self.G(self.z(min(chunk, n - i))) for i in range(0, n, chunk)]
            finally:
                self.G.train(was)
        return torch.cat(out)


@dataclass
class Trainer(StepLoop):
    """The G and D of one run and their optimizers; :meth:`step` is one generator step
    after ``n_critic`` discriminator steps.

    ``method`` is the gradient penalties' and GN / GraN's method (``'auto'``,
    ``'double_backward'``, ``'jvp'``: lipkernels.nn.gradnorm). With ``compile=True`` the
    D loss and the G loss (:meth:`d_loss`, :meth:`g_loss`: every forward, penalty and
    normalization of a step) run through ``torch.compile(fullgraph=True)``, which makes
    ``'auto'`` the JVP; backward and optimizer steps stay eager.
    """
    m: Method
    G: nn.Module
    D: nn.Module
    z_dim: int
    dtype: torch.dtype = torch.float32
    method: str = "auto"
    compile: bool = False
    d_model: nn.Module = field(init=False)
    g_model: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        m = self.m
        self.G.to(self.dtype)
        self.D.to(self.dtype)
        self.group = lnn.SpectralNormGroup(self.D) if m.spectral_norm else None
        if m.wrap == "gn":
            self.d_model = lnn.GradNorm(self.D, method=self.method)
            self.g_model = lnn.GradNorm(self.D, first_order=m.first_order_g, method=self.method)
        elif m.wrap == "gran":
            self.d_model = self.g_model = lnn.GraN(self.D, tau=m.gran_tau, eps=m.gran_eps,
                                                   method=self.method)
        elif m.wrap is None:
            self.d_model = self.g_model = self.D
        else:
            raise ValueError(f"Trainer: wrap must be None, 'gn' or 'gran', got {m.wrap!r}")
        self.group_g = lnn.SpectralNormGroup(self.G) if m.sn_g else None
        self.opt_d = make_optimizer(m, self.D.parameters())
        self.opt_g = make_optimizer(m, self.G.parameters(), m.lr_g)
        self._d_loss, self._g_loss = self.d_loss, self.g_loss
        if self.compile:
            self._d_loss = torch.compile(self.d_loss, fullgraph=True)
            self._g_loss = torch.compile(self.g_loss, fullgraph=True)

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor,
               alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The discriminator's loss on one batch (``fake`` without a graph; ``alpha``: the
        gradient penalty's interpolation weights, drawn when None)."""
        m = self.m
        out = self.d_model(torch.cat([real, fake])).reshape(-1)
        k = real_split(out, real, fake)
        loss = m.loss.d(out[:k], out[k:])
        if m.gp_weight is not None:
            loss = loss + lnn.gradient_penalty(self.D, real, fake, weight=m.gp_weight,
                                               alpha=alpha, method=self.method)
        return loss

    def g_loss(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's loss for latents ``z`` (call with D's weights frozen)."""
        return self.g_loss_of(self.G(z))

    def g_loss_of(self, fake: torch.Tensor) -> torch.Tensor:
        """The generator's loss for its samples ``fake`` (with their graph)."""
        return self.m.loss.g(self.g_model(fake).reshape(-1))

    def clip_(self) -> None:
        clip_weights_(self.D, self.m.clip)

    def diagnose(self, real: torch.Tensor, n: int = 256) -> Dict[str, float]:
        """Medians, over ``real`` and as many fakes, of the raw discriminator's output
        ``f``, its input-gradient norm ``n`` and the output ``out`` the loss sees (GN /
        GraN's normalized value, else ``f``): how the discriminator separates the data.
        D's buffers are put back, so this does not change the run."""
        from ..nn._grad import input_gradient
        with torch.no_grad():
            fake = self.G(self.z(min(n, real.shape[0])))
        out: Dict[str, float] = {}
        with kept_buffers(self.D):
            for name, x in (("real", real[:n]), ("fake", fake)):
                f, g = input_gradient(self.D, x, create_graph=False)
                with torch.no_grad():
                    o = self.d_model(x).reshape(-1) if self.m.wrap is not None else f.reshape(-1)
                out[f"f_{name}"] = float(f.detach().reshape(-1).median())
                out[f"n_{name}"] = float(g.flatten(1).norm(dim=1).median())
                out[f"out_{name}"] = float(o.detach().median())
        return out

    def state_dict(self) -> dict:
        return trainer_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_trainer_state(self, state)


def trainer_state(t) -> dict:
    """G, D (with spectral norm's u, v and any running statistics) and both optimizers
    of a trainer (this module's or its plain twin): what a resumed run needs besides
    the random streams."""
    return {"G": t.G.state_dict(), "D": t.D.state_dict(),
            "opt_g": t.opt_g.state_dict(), "opt_d": t.opt_d.state_dict()}


def load_trainer_state(t, state: dict) -> None:
    t.G.load_state_dict(state["G"])
    t.D.load_state_dict(state["D"])
    t.opt_g.load_state_dict(state["opt_g"])
    t.opt_d.load_state_dict(state["opt_d"])


METHOD_NAMES: List[str] = list(METHODS)
Builder = Callable[[Method, str], Tuple[nn.Module, nn.Module, int]]
