"""What the papers measure, at the scale of this command.

2-D mixtures (the VEEGAN / PacGAN protocol), over ``N = 2500`` generated samples:

* each sample is assigned to its nearest mode center; it is *high quality* when it lies
  within ``3 sigma`` of that center;
* a mode is *covered* when at least 20 high-quality samples are assigned to it (20 of
  2,500 samples, against 2500 / K expected); ``modes1`` counts the modes with at least one
  high-quality sample, the rule of PacGAN's code (``MetricLogger`` in fjxmlzn/PacGAN);
* ``kl``: ``KL(p || uniform)`` of the histogram ``p`` of nearest modes over *all* N
  samples (``sum p_k log(K p_k)``, in nats, 0 for a perfectly balanced histogram,
  ``log K`` when every sample goes to one mode).

The WGAN-GP toy sets: ``8gaussians`` and ``25gaussians`` as the mixtures above (their
centres and sigma in the scaled coordinates). ``swissroll`` has no modes: its range of
``t`` is cut into 20 equal segments (1/20 of the data each); a sample belongs to the
segment of its nearest point on the noiseless curve and is *high quality* within
``3 sigma`` of the curve; a segment is covered with at least 20 high-quality samples;
``kl`` is over the segment histogram. The same three numbers, read the same way.

Digits: a small CNN classifier is trained once on a fixed 80% of the digits (its
held-out accuracy on the other 20% is reported). Over ``N`` generated images:

* **Fréchet digit distance** (FDD): the Fréchet distance between Gaussians fitted to the
  classifier's penultimate (64-d) features of the generated images and of all 1,797
  real digits, ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``. The idea of
  FID (Heusel et al. 2017), but with this small digits classifier, not Inception: its
  numbers are not comparable with any published FID;
* **classes covered**: the number of the 10 classes predicted for at least 2% of the
  samples (a fifth of the uniform share);
* **class entropy**: the entropy (bits) of the histogram of predicted classes,
  ``log2 10 = 3.32`` for balanced classes.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .data import TOY, Mixture, SwissRoll, digits, digits_split

N_SAMPLES = 2500
MODE_THRESHOLD = 20


def _points(samples: torch.Tensor, who: str):
    x = samples.detach().to(torch.float64).cpu()
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"{who}: samples must have shape (N, 2), got {tuple(x.shape)}")
    finite = torch.isfinite(x).all(dim=1)
    return torch.where(finite[:, None], x, torch.zeros_like(x)), finite


def mixture_metrics(samples: torch.Tensor, mix: Mixture, threshold: int = MODE_THRESHOLD
                    ) -> Dict[str, float]:
    """``modes`` covered, ``hq`` (% high-quality samples), ``kl`` (nats)."""
    x, finite = _points(samples, "mixture_metrics")
    dist, nearest = torch.cdist(x, mix.centers).min(dim=1)
    return _mode_metrics(finite, dist / mix.sigma, nearest, len(mix.centers), threshold,
                         mix.name in TOY)


CURVE_POINTS = 4000


def swissroll_metrics(samples: torch.Tensor, roll: SwissRoll = SwissRoll(),
                      threshold: int = MODE_THRESHOLD) -> Dict[str, float]:
    """``modes`` (segments of the roll covered), ``hq`` (% within ``3 sigma`` of the
    curve), ``kl`` over the segments (module docstring)."""
    x, finite = _points(samples, "swissroll_metrics")
    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, CURVE_POINTS, dtype=torch.float64)
    dist, nearest = torch.cdist(x, roll.curve(t)).min(dim=1)
    segment = torch.div(nearest * roll.segments, CURVE_POINTS, rounding_mode="floor")
    return _mode_metrics(finite, dist / roll.sigma, segment, roll.segments, threshold, True)


def _mode_metrics(finite: torch.Tensor, sigmas: torch.Tensor, nearest: torch.Tensor, k: int,
                  threshold: int, extra: bool = False) -> Dict[str, float]:
    """The numbers from each sample's finiteness, distance to its nearest mode in sigma
    (high quality within 3) and nearest mode index (of ``k``); with ``extra`` also
    ``TOY_EXTRA``."""
    hq = finite & (sigmas <= 3)
    counts_hq = torch.bincount(nearest[hq], minlength=k)
    counts = torch.bincount(nearest[finite], minlength=k).double()
    n = max(int(finite.sum()), 1)
    p = counts / n
    kl = float((p[p > 0] * torch.log(p[p > 0] * k)).sum()) if finite.any() else math.log(k)
    out = {"modes": int((counts_hq >= threshold).sum()),
           "modes1": int((counts_hq >= 1).sum()),
           "hq": 100.0 * float(hq.sum()) / max(len(finite), 1),
           "kl": kl}
    if extra:
        near = finite & (sigmas <= 10)
        out["modes10"] = int((torch.bincount(nearest[near], minlength=k) >= threshold).sum())
        out["spread"] = float(sigmas[finite].median()) if finite.any() else math.inf
    return out


class DigitClassifier(nn.Module):
    """conv3x3 1->16, ReLU, max-pool, conv3x3 16->32, ReLU, max-pool, dense 512->64 (the
    features), ReLU, dense 64->10; for (B, 1, 16, 16) images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(epochs: int = 30, seed: int = 0) -> Tuple[DigitClassifier, float]:
    """The classifier, trained with a fixed seed (Adam 1e-3, batch 64, ``epochs``),
    and its held-out accuracy (fraction)."""
    x_tr, y_tr, x_te, y_te = digits_split(torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(clf(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(x_te).argmax(1) == y_te).double().mean())
    return clf, acc


def _stats(f: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    f = f.detach().to(torch.float64).cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(mu1, c1, mu2, c2) -> float:
    """Fréchet distance of two Gaussians; the matrix square root through symmetric
    eigendecompositions (``C1^1/2 C2 C1^1/2`` is symmetric PSD)."""
    s1 = _sqrt_psd(c1)
    w = np.linalg.eigvalsh(s1 @ c2 @ s1)
    tr_sqrt = float(np.sqrt(np.clip(w, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)


class DigitsEvaluator:
    """The trained classifier and the real digits' feature statistics."""

    def __init__(self, epochs: int = 30, seed: int = 0) -> None:
        self.classifier, self.accuracy = train_classifier(epochs, seed)
        x, _ = digits(torch.float32)
        with torch.no_grad():
            self.real_mu, self.real_cov = _stats(self.classifier.features(x))
            # Floor: the held-out real digits against all real digits.
            _, _, x_te, _ = digits_split(torch.float32, seed=seed)
            mu, cov = _stats(self.classifier.features(x_te))
        self.real_floor = frechet(mu, cov, self.real_mu, self.real_cov)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> Dict[str, float]:
        x = samples.detach().to(torch.float32).cpu()
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            return {"fdd": float("nan"), "classes": 0, "entropy": 0.0}
        f = self.classifier.features(x)
        pred = self.classifier.head(f).argmax(1)
        mu, cov = _stats(f)
        p = torch.bincount(pred, minlength=10).double() / len(pred)
        ent = float(-(p[p > 0] * torch.log2(p[p > 0])).sum())
        return {"fdd": frechet(mu, cov, self.real_mu, self.real_cov),
                "classes": int((p >= 0.02).sum()),
                "entropy": ent}


_CACHE: Dict[Tuple[int, int], DigitsEvaluator] = {}


def digits_evaluator(epochs: int = 30, seed: int = 0) -> DigitsEvaluator:
    """One evaluator per process and setting (the classifier is trained once)."""
    key = (epochs, seed)
    if key not in _CACHE:
        with torch.random.fork_rng():
            _CACHE[key] = DigitsEvaluator(epochs, seed)
    return _CACHE[key]


#: For the WGAN-GP toy sets, besides the 3-sigma numbers: the modes with >= 20 samples
#: within 10 sigma (VEEGAN's rule for its 1200-D set: coverage apart from sharpness) and
#: the median distance of a sample to its nearest mode (or to the roll's curve), in sigma.
TOY_EXTRA = ("modes10", "spread")


def metric_names(data: str, protocol: Optional[str] = None):
    """The metrics the tables show for ``data`` (under ``protocol``: PacGAN's adds
    ``modes1``, its code's rule, a mode covered by one high-quality sample)."""
    if data == "digits":
        return ("fdd", "classes", "entropy")
    return (("modes", "hq", "kl") + (("modes1",) if protocol == "pacgan" else ())
            + (TOY_EXTRA if data in TOY else ()))


def evaluate(data: str, samples: torch.Tensor, evaluator: Optional[DigitsEvaluator] = None,
             mix=None) -> Dict[str, float]:
    """The metrics of ``samples`` of data set ``data`` (``mix``: its
    :func:`~lipkernels.train.data.target`, looked up when None)."""
    if data == "digits":
        return (evaluator or digits_evaluator())(samples)
    from .data import target
    mix = mix or target(data)
    if isinstance(mix, SwissRoll):
        return swissroll_metrics(samples, mix)
    return mixture_metrics(samples, mix)
