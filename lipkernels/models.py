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


class ResBlock(nn.Module):
    """A discriminator residual block: ReLU, conv3x3, ReLU, conv3x3 (+ avg-pool when
    down-sampling), plus a shortcut, a 1x1 conv where the shape changes. ``first``: the
    optimized first block (no leading ReLU; shortcut avg-pool, then 1x1 conv)."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, norm: Norm = None,
                 first: bool = False) -> None:
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = _apply(norm, nn.Conv2d(in_ch, out_ch, 3, 1, 1))
        self.conv2 = _apply(norm, nn.Conv2d(out_ch, out_ch, 3, 1, 1))
        self.shortcut = (_apply(norm, nn.Conv2d(in_ch, out_ch, 1))
                         if in_ch != out_ch or downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else torch.relu(x)
        h = self.conv2(torch.relu(self.conv1(h)))
        if self.downsample:
            h = nn.functional.avg_pool2d(h, 2)
        s = x
        if self.first:
            s = self.shortcut(nn.functional.avg_pool2d(s, 2))
        elif self.shortcut is not None:
            s = self.shortcut(s)
            if self.downsample:
                s = nn.functional.avg_pool2d(s, 2)
        return h + s


class ResNetDiscriminator(nn.Module):
    """Residual blocks, ReLU, global sum pooling, dense -> 1."""

    def __init__(self, widths: Sequence[int], downsample: Sequence[bool], norm: Norm = None,
                 in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels] + list(widths)
        self.blocks = nn.Sequential(*[
            ResBlock(chans[i], chans[i + 1], downsample[i], norm, first=i == 0)
            for i in range(len(widths))])
        self.linear = _apply(norm, nn.Linear(chans[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.linear(h)


def resnet_discriminator(norm: Norm = None, width: int = 128) -> ResNetDiscriminator:
    """The SNGAN / GN-GAN ResNet CIFAR-10 discriminator (32x32): an optimized first block
    3->128, a block 128->128 with down-sampling, two blocks 128->128 without, ReLU,
    global sum pooling, dense 128->1."""
    return ResNetDiscriminator([width] * 4, [True, True, False, False], norm)


def biggan_discriminator(norm: Norm = None, widths: Sequence[int] = (64, 128, 256, 512, 1024, 1024)
                         ) -> ResNetDiscriminator:
    """BigGAN-style 128x128 discriminator: residual blocks 3->64->128->256->512->1024->1024,
    down-sampling in all but the last, dense 1024->1; about 40 M parameters (150 MB of
    float32 weights), the large case for bandwidth."""
    return ResNetDiscriminator(list(widths), [True] * (len(widths) - 1) + [False], norm)


__all__ = ["sngan_cnn_discriminator", "sngan_cnn_generator", "resnet_discriminator",
           "biggan_discriminator", "ResBlock", "ResNetDiscriminator"]
