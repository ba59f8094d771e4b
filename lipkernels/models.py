"""Reference GAN architectures of MATH.md section 9, used by the tests, the benchmarks
and as examples.

>>> import lipkernels
>>> D = lipkernels.models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm)
>>> G = lipkernels.models.sngan_cnn_generator()
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

Norm = Optional[Callable[[nn.Module], nn.Module]]


def _apply(norm: Norm, layer: nn.Module) -> nn.Module:
    return norm(layer) if norm is not None else layer


def sngan_cnn_discriminator(norm: Norm = None, channels: Sequence[int] = (64, 128, 256, 512),
                            in_channels: int = 3, slope: float = 0.1) -> nn.Sequential:
    """The SNGAN CIFAR-10 CNN discriminator (32x32 input): conv3x3 s1 3->64, conv4x4 s2
    64->64, conv3x3 64->128, conv4x4 s2 128->128, conv3x3 128->256, conv4x4 s2
    256->256, conv3x3 256->512, dense 4*4*512->1, LeakyReLU(0.1).

    Args:
        norm: applied to every conv and dense layer, e.g. ``lipkernels.spectral_norm``
            or ``torch.nn.utils.parametrizations.spectral_norm``; None for none.
        channels: the four widths (smaller ones make fast test models).
    Returns:
        a module mapping ``(B, in_channels, 32, 32)`` to ``(B, 1)``.
    """
    c1, c2, c3, c4 = channels
    act = lambda: nn.LeakyReLU(slope)  # noqa: E731
    layers = [
        _apply(norm, nn.Conv2d(in_channels, c1, 3, 1, 1)), act(),
        _apply(norm, nn.Conv2d(c1, c1, 4, 2, 1)), act(),
        _apply(norm, nn.Conv2d(c1, c2, 3, 1, 1)), act(),
        _apply(norm, nn.Conv2d(c2, c2, 4, 2, 1)), act(),
        _apply(norm, nn.Conv2d(c2, c3, 3, 1, 1)), act(),
        _apply(norm, nn.Conv2d(c3, c3, 4, 2, 1)), act(),
        _apply(norm, nn.Conv2d(c3, c4, 3, 1, 1)), act(),
        nn.Flatten(),
        _apply(norm, nn.Linear(4 * 4 * c4, 1)),
    ]
    return nn.Sequential(*layers)


def sngan_cnn_generator(z_dim: int = 128, channels: Sequence[int] = (512, 256, 128, 64),
                        out_channels: int = 3) -> nn.Sequential:
    """The SNGAN CIFAR-10 CNN generator: z -> dense 4*4*512 -> deconv4x4 s2 (BN, ReLU)
    512->256->128->64 -> conv3x3 64->3, tanh. Maps ``(B, z_dim)`` to ``(B, 3, 32, 32)``."""
    c0, c1, c2, c3 = channels
    return nn.Sequential(
        nn.Linear(z_dim, 4 * 4 * c0), nn.Unflatten(1, (c0, 4, 4)), nn.BatchNorm2d(c0), nn.ReLU(),
        nn.ConvTranspose2d(c0, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.ConvTranspose2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.ConvTranspose2d(c2, c3, 4, 2, 1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.Conv2d(c3, out_channels, 3, 1, 1), nn.Tanh(),
    )


__all__ = ["sngan_cnn_discriminator", "sngan_cnn_generator"]
