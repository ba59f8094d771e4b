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
DATASETS = MIXTURES + ("digits",)
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
    draws of ``z`` and the data's do not interleave differently across settings)."""

    def __init__(self, name: str, seed: int, dtype: torch.dtype = torch.float32) -> None:
        if name not in DATASETS:
            raise ValueError(f"data must be one of {', '.join(DATASETS)}, got {name!r}")
        self.name = name
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        if name in MIXTURES:
            self.mixture: Optional[Mixture] = mixture(name)
            self.images = None
        else:
            self.mixture = None
            self.images, _ = digits(dtype)

    def __call__(self, n: int) -> torch.Tensor:
        if self.mixture is not None:
            return self.mixture.sample(n, self.generator, self.dtype)
        idx = torch.randint(len(self.images), (n,), generator=self.generator)
        return self.images[idx]
