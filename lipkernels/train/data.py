"""Training data that needs no download.

* ``ring8`` and ``grid25``: the 2-D Gaussian mixtures of the mode-collapse literature,
  generated, with the radii and standard deviations of the PacGAN protocol (Lin, Khetan,
  Fanti, Oh, "PacGAN: the power of two samples in generative adversarial networks",
  NeurIPS 2018, section 5 / appendix, which takes the benchmarks of VEEGAN, Srivastava et
  al. NeurIPS 2017):

  - ``ring8``: 8 equally weighted spherical Gaussians, means ``(cos(2 pi i / 8),
    sin(2 pi i / 8))`` (a ring of radius 1), standard deviation 0.01 (variance 1e-4);
  - ``grid25``: 25 equally weighted spherical Gaussians, means ``(-4 + 2 i, -4 + 2 j)``,
    ``i, j in {0, ..., 4}``, standard deviation 0.05 (variance 0.0025).

* ``8gaussians``, ``25gaussians``, ``swissroll``: the toy data of the WGAN-GP paper
  (Gulrajani et al. 2017), as the data generators of its official script ``gan_toy.py``
  (igul222/improved_wgan_training) make them, written here from its settings:

  - ``8gaussians``: a centre drawn uniformly from the 8 points ``2 (cos k pi/4, sin k pi/4)``
    plus ``0.02`` times a standard normal, all divided by ``1.414``;
  - ``25gaussians``: one fixed data set of 100,000 points (4,000 per centre of the grid
    ``(2 i, 2 j)``, ``i, j in {-2, ..., 2}``, plus ``0.05`` times a standard normal),
    shuffled once, divided by ``2.828``, and read in order in batches (the last partial
    batch of each pass skipped, as the script does);
  - ``swissroll``: scikit-learn's ``make_swiss_roll(noise=0.25)`` (``t = 1.5 pi (1 + 2 u)``,
    points ``(t cos t, t sin t)`` plus ``0.25`` times a standard normal in each
    coordinate), divided by ``7.5``.

* ``digits``: scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797
  gray images of 8x8 pixels, values 0..16, 10 classes), upsampled to 16x16 with bilinear
  interpolation and scaled to ``[-1, 1]``: ``(N, 1, 16, 16)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

MIXTURES = ("ring8", "grid25")
TOY = ("8gaussians", "25gaussians", "swissroll")
DATASETS = MIXTURES + ("digits",) + TOY
IMAGE_SIZE = 16


@dataclass(frozen=True)
class Mixture:
    """An equally weighted mixture of spherical 2-D Gaussians."""
    name: str
    centers: torch.Tensor  # (K, 2), float64
    sigma: float

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` samples: a uniform mode index, plus ``sigma`` times a standard normal."""
        idx = torch.randint(len(self.centers), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers[idx] + self.sigma * noise).to(dtype)


def mixture(name: str) -> Mixture:
    """The PacGAN 2-D ring (``ring8``) or grid (``grid25``)."""
    if name == "ring8":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return Mixture(name, torch.stack([angles.cos(), angles.sin()], dim=1), 0.01)
    if name == "grid25":
        axis = torch.arange(5, dtype=torch.float64) * 2 - 4
        centers = torch.cartesian_prod(axis, axis)
        return Mixture(name, centers, 0.05)
    raise ValueError(f"mixture: name must be one of {', '.join(MIXTURES)}, got {name!r}")


#: The official script's scale divisors ("stdev") and noise levels.
TOY_SCALE = {"8gaussians": 1.414, "25gaussians": 2.828, "swissroll": 7.5}
TOY_NOISE = {"8gaussians": 0.02, "25gaussians": 0.05, "swissroll": 0.25}
TOY_GRID_POINTS = 100_000


def toy_mixture(name: str) -> Mixture:
    """The modes of ``8gaussians`` / ``25gaussians`` in the scaled coordinates the
    networks see (centres and sigma divided by the script's divisor)."""
    scale = TOY_SCALE.get(name)
    if name == "8gaussians":
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        centers = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    elif name == "25gaussians":
        axis = torch.arange(-2, 3, dtype=torch.float64) * 2
        centers = torch.cartesian_prod(axis, axis)
    else:
        raise ValueError(f"toy_mixture: name must be 8gaussians or 25gaussians, got {name!r}")
    return Mixture(name, centers / scale, TOY_NOISE[name] / scale)


@dataclass(frozen=True)
class SwissRoll:
    """The swiss roll of ``gan_toy.py`` in its scaled coordinates: the noiseless curve
    ``(t cos t, t sin t) / 7.5`` for ``t`` uniform on ``[1.5 pi, 4.5 pi]``, and Gaussian
    noise of ``sigma = 0.25 / 7.5`` per coordinate. For the metrics the range of ``t``
    is cut into ``segments`` equal parts, each holding 1/segments of the data: the
    "modes" of the roll."""
    name: str = "swissroll"
    sigma: float = TOY_NOISE["swissroll"] / TOY_SCALE["swissroll"]
    segments: int = 20

    @staticmethod
    def curve(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t * t.cos(), t * t.sin()], dim=-1) / TOY_SCALE["swissroll"]

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.curve(t) + self.sigma * noise).to(dtype)


def toy_distribution(name: str):
    """The distribution behind a toy data set, for its metrics: a :class:`Mixture`
    (``8gaussians``, ``25gaussians``) or the :class:`SwissRoll`."""
    return SwissRoll() if name == "swissroll" else toy_mixture(name)


def target(name: str):
    """What a 2-D data set's metrics compare with: its Mixture or SwissRoll."""
    if name in MIXTURES:
        return mixture(name)
    if name in TOY:
        return toy_distribution(name)
    raise ValueError(f"target: {name!r} is not a 2-D data set ({', '.join(MIXTURES + TOY)})")


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the Makefile installs scikit-learn
        raise RuntimeError("the digits data set needs scikit-learn (pip install scikit-learn, "
                           "or pip install lipkernels[train])") from e
    return load_digits()


def digits(dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: ``(1797, 1, 16, 16)`` in ``[-1, 1]`` and ``(1797,)`` int64."""
    d = _sklearn_digits()
    x = torch.tensor(d.images, dtype=torch.float64).unsqueeze(1) / 16.0  # [0, 1]
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                        align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    return x.to(dtype), torch.tensor(d.target, dtype=torch.int64)


def digits_split(dtype: torch.dtype = torch.float32, test_fraction: float = 0.2, seed: int = 0):
    """A fixed split (``seed``) of the digits: ``(x_train, y_train, x_test, y_test)``."""
    x, y = digits(dtype)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class Sampler:
    """Batches of real data for one run, from its own generator (so the training's
    draws of ``z`` and the data's do not interleave differently across settings).
    :meth:`state_dict` / :meth:`load_state_dict` let a resumed run continue the same
    stream of batches.

    ``points``: for ``ring8`` / ``grid25``, a fixed training set of that many points drawn
    once, read in a new shuffled order every pass (fuel's ``ShuffledScheme``, as PacGAN's
    code streams its 100,000 points; a last partial batch of a pass is skipped); None:
    fresh draws from the mixture for every batch."""

    def __init__(self, name: str, seed: int, dtype: torch.dtype = torch.float32,
                 points: Optional[int] = None) -> None:
        if name not in DATASETS:
            raise ValueError(f"data must be one of {', '.join(DATASETS)}, got {name!r}")
        if points is not None and (name not in MIXTURES or points < 1):
            raise ValueError(f"points: a fixed training set is for {', '.join(MIXTURES)} "
                             f"(a positive count), got points={points!r} for {name!r}")
        self.name = name
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self.mixture: Optional[Mixture] = None
        self.images = None
        self.position = 0
        self.fixed: Optional[torch.Tensor] = None
        self.order: Optional[torch.Tensor] = None
        if name in MIXTURES:
            self.mixture = mixture(name)
            if points is not None:
                self.fixed = self.mixture.sample(points, self.generator, dtype)
        elif name == "digits":
            self.images, _ = digits(dtype)
        elif name == "25gaussians":
            mix = toy_mixture(name)
            reps = TOY_GRID_POINTS // len(mix.centers)
            points = mix.centers.repeat(reps, 1) * TOY_SCALE[name]
            points = points + TOY_NOISE[name] * torch.randn(points.shape, generator=self.generator,
                                                            dtype=torch.float64)
            perm = torch.randperm(len(points), generator=self.generator)
            self.points = (points[perm] / TOY_SCALE[name]).to(dtype)
        self.target = target(name) if name != "digits" else None

    def _toy(self, n: int) -> torch.Tensor:
        if self.name == "8gaussians":
            mix = toy_mixture(self.name)
            idx = torch.randint(len(mix.centers), (n,), generator=self.generator)
            noise = torch.randn(n, 2, generator=self.generator, dtype=torch.float64)
            return ((mix.centers[idx] * TOY_SCALE[self.name] + TOY_NOISE[self.name] * noise)
                    / TOY_SCALE[self.name]).to(self.dtype)
        if self.name == "swissroll":
            return SwissRoll().sample(n, self.generator, self.dtype)
        if self.position + n > len(self.points):   # a new pass, in the same order
            self.position = 0
        out = self.points[self.position:self.position + n]
        self.position += n
        return out

    def _shuffled(self, n: int) -> torch.Tensor:
        if n > len(self.fixed):
            raise ValueError(f"a batch of {n} is larger than the fixed training set "
                             f"({len(self.fixed)} points)")
        if self.order is None or self.position + n > len(self.fixed):   # a new pass
            self.order = torch.randperm(len(self.fixed), generator=self.generator)
            self.position = 0
        out = self.fixed[self.order[self.position:self.position + n]]
        self.position += n
        return out

    def __call__(self, n: int) -> torch.Tensor:
        if self.fixed is not None:
            return self._shuffled(n)
        if self.mixture is not None:
            return self.mixture.sample(n, self.generator, self.dtype)
        if self.images is not None:
            idx = torch.randint(len(self.images), (n,), generator=self.generator)
            return self.images[idx]
        return self._toy(n)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "position": self.position,
                "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.position = int(state["position"])
        self.order = state.get("order")
