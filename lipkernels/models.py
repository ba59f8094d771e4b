"""Reference GAN architectures (docs/math.md section 9), used by the tests, the
benchmarks and as examples. Each function builds exactly the network it names; where
a paper's printed table and its authors' code differ, the docstring says which one it
follows. Parameter counts are tested against the official code (tests/test_models.py).

=================================  ====================================================  ==========
function                           architecture                                          parameters
=================================  ====================================================  ==========
``sngan_cnn_discriminator``        SNGAN paper, Table 3 (b), as printed                  2,935,873
``dcgan_discriminator``            the CNN of the SNGAN and GN-GAN official code          5,860,865
``sngan_cnn_generator``            SNGAN paper, Table 3 (a); GN-GAN ``Generator32``      3,813,379
``sngan_resnet_discriminator``     SNGAN CIFAR-10 ResNet: global *sum* pooling           1,053,824
``gngan_resnet_discriminator``     GN-GAN CIFAR-10 ResNet: global *average* pooling      1,053,825
``gngan_resnet128_discriminator``  GN-GAN 128x128 ResNet (``ResDiscriminator128``)       38,419,137
=================================  ====================================================  ==========

``resnet_discriminator`` is ``sngan_resnet_discriminator`` and ``biggan_discriminator``
is ``gngan_resnet128_discriminator`` (older names, kept for existing callers).

>>> import lipkernels
>>> D = lipkernels.models.sngan_cnn_discriminator(norm=lipkernels.spectral_norm)
>>> G = lipkernels.models.sngan_cnn_generator()
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

Norm = Optional[Callable[[nn.Module], nn.Module]]


def _apply(norm: Norm, layer: nn.Module) -> nn.Module:
    return norm(layer) if norm is not None else layer


def _cnn(norm: Norm, convs: Sequence[Tuple[int, int, int, int]], image_size: int,
         slope: float) -> nn.Sequential:
    """Convolutions ``(in, out, kernel, stride)`` (padding 1), each followed by
    LeakyReLU(slope), then flatten and a dense layer to 1; three stride-2 convs."""
    if image_size <= 0 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    layers = []
    for cin, cout, k, s in convs:
        layers += [_apply(norm, nn.Conv2d(cin, cout, k, s, 1)), nn.LeakyReLU(slope)]
    layers += [nn.Flatten(), _apply(norm, nn.Linear((image_size // 8) ** 2 * convs[-1][1], 1))]
    return nn.Sequential(*layers)


def sngan_cnn_discriminator(norm: Norm = None, channels: Sequence[int] = (64, 128, 256, 512),
                            in_channels: int = 3, slope: float = 0.1,
                            image_size: int = 32) -> nn.Sequential:
    """The CNN discriminator of the SNGAN paper (Miyato et al. 2018, Table 3 (b)), as
    printed: conv3x3 s1 3->64, conv4x4 s2 64->64, conv3x3 64->128, conv4x4 s2 128->128,
    conv3x3 128->256, conv4x4 s2 256->256, conv3x3 256->512, dense (M/8)^2*512 -> 1,
    LeakyReLU(0.1) after every conv; 2,935,873 parameters at 32x32.

    Every stride-2 conv keeps its input width here. The authors' code (and GN-GAN's,
    which follows it) widens at the stride-2 convs instead: that network is
    :func:`dcgan_discriminator`, twice the parameters.

    Args:
        norm: applied to every conv and dense layer, e.g. ``lipkernels.spectral_norm``
            or ``torch.nn.utils.parametrizations.spectral_norm``; None for none.
        channels: the four widths (smaller ones make fast test models).
        image_size: M, the input's height and width (32: CIFAR-10, 48: STL-10).
    Returns:
        a module mapping ``(B, in_channels, M, M)`` to ``(B, 1)``.
    """
    c1, c2, c3, c4 = channels
    return _cnn(norm, [(in_channels, c1, 3, 1), (c1, c1, 4, 2), (c1, c2, 3, 1), (c2, c2, 4, 2),
                       (c2, c3, 3, 1), (c3, c3, 4, 2), (c3, c4, 3, 1)], image_size, slope)


def dcgan_discriminator(norm: Norm = None, channels: Sequence[int] = (64, 128, 256, 512),
                        in_channels: int = 3, slope: float = 0.1,
                        image_size: int = 32) -> nn.Sequential:
    """The CNN ("DCGAN") discriminator of the official SNGAN and GN-GAN code: conv3x3 s1
    3->64, conv4x4 s2 64->128, conv3x3 128->128, conv4x4 s2 128->256, conv3x3 256->256,
    conv4x4 s2 256->512, conv3x3 512->512, dense (M/8)^2*512 -> 1, LeakyReLU(0.1) after
    every conv; 5,860,865 parameters at 32x32, 5,871,105 at 48x48.

    GN-GAN: ``models/dcgan.py`` ``Discriminator32`` / ``Discriminator48`` of
    basiclab/GNGAN-PyTorch. SNGAN: ``SNDCGANDiscriminator`` in ``common/net.py`` of
    pfnet-research/chainer-gan-lib (same layers; Chainer's default LeakyReLU slope 0.2).
    Wider than the table in the SNGAN paper (:func:`sngan_cnn_discriminator`). Not the
    DCGAN discriminator of Radford et al.; the name is the one both repositories use.
    Arguments and return as in :func:`sngan_cnn_discriminator`.
    """
    c1, c2, c3, c4 = channels
    return _cnn(norm, [(in_channels, c1, 3, 1), (c1, c2, 4, 2), (c2, c2, 3, 1), (c2, c3, 4, 2),
                       (c3, c3, 3, 1), (c3, c4, 4, 2), (c4, c4, 3, 1)], image_size, slope)


def sngan_cnn_generator(z_dim: int = 128, channels: Sequence[int] = (512, 256, 128, 64),
                        out_channels: int = 3) -> nn.Sequential:
    """The CNN generator of the SNGAN paper (Table 3 (a)): z -> dense 4*4*512 -> (BN,
    ReLU) -> deconv4x4 s2 (BN, ReLU) 512->256->128->64 -> conv3x3 64->3, tanh. Maps
    ``(B, z_dim)`` to ``(B, 3, 32, 32)``; 3,813,379 parameters, as GN-GAN's
    ``models/dcgan.py`` ``Generator32`` (whose last layer is a stride-1 transposed conv,
    the same function class and parameter count as the conv here)."""
    c0, c1, c2, c3 = channels
    return nn.Sequential(
        nn.Linear(z_dim, 4 * 4 * c0), nn.Unflatten(1, (c0, 4, 4)), nn.BatchNorm2d(c0), nn.ReLU(),
        nn.ConvTranspose2d(c0, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.ConvTranspose2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.ConvTranspose2d(c2, c3, 4, 2, 1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.Conv2d(c3, out_channels, 3, 1, 1), nn.Tanh(),
    )


class ResBlock(nn.Module):
    """A discriminator residual block: ReLU, conv3x3 in->out, ReLU, conv3x3 out->out
    (+ avg-pool 2x2 when down-sampling), plus a shortcut: a 1x1 conv where the shape
    changes, then the avg-pool. ``first``: the optimized first block (no leading ReLU;
    shortcut avg-pool, then 1x1 conv)."""

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
    """Residual blocks (the first one optimized), ReLU, global pooling over the pixels,
    dense -> 1.

    Args:
        widths, downsample: per block, its output width and whether it halves the size.
        pooling: ``"sum"`` (SNGAN) or ``"mean"`` (GN-GAN): the outputs differ by the
            number of pixels of the last feature map (times the dense weight only: the
            bias is added after pooling).
        bias: whether the last dense layer has a bias (SNGAN's has none).
    """

    def __init__(self, widths: Sequence[int], downsample: Sequence[bool], norm: Norm = None,
                 in_channels: int = 3, pooling: str = "sum", bias: bool = True) -> None:
        super().__init__()
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        if len(widths) != len(downsample) or not widths:
            raise ValueError("widths and downsample must be non-empty and of equal length")
        self.pooling = pooling
        chans = [in_channels] + list(widths)
        self.blocks = nn.Sequential(*[
            ResBlock(chans[i], chans[i + 1], downsample[i], norm, first=i == 0)
            for i in range(len(widths))])
        self.linear = _apply(norm, nn.Linear(chans[-1], 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.blocks(x))
        h = h.sum(dim=(2, 3)) if self.pooling == "sum" else h.mean(dim=(2, 3))
        return self.linear(h)


def sngan_resnet_discriminator(norm: Norm = None, width: int = 128) -> ResNetDiscriminator:
    """The SNGAN ResNet CIFAR-10 discriminator (32x32): an optimized first block 3->128,
    a block 128->128 with down-sampling, two blocks 128->128 without, ReLU, global
    **sum** pooling, dense 128->1 **without bias**; 1,053,824 parameters.

    As ``SNResNetProjectionDiscriminator`` (``n_classes=0``) in
    ``dis_models/snresnet_32.py`` of pfnet-research/sngan_projection, the SNGAN authors'
    code (``configs/sn_cifar10_unconditional.yml``).
    """
    return ResNetDiscriminator([width] * 4, [True, True, False, False], norm,
                               pooling="sum", bias=False)


def gngan_resnet_discriminator(norm: Norm = None, width: int = 128) -> ResNetDiscriminator:
    """The GN-GAN ResNet CIFAR-10 discriminator (32x32): the blocks of
    :func:`sngan_resnet_discriminator`, then ReLU, global **average** pooling, dense
    128->1 with bias; 1,053,825 parameters.

    As ``ResDiscriminator32`` in ``models/resnet.py`` of basiclab/GNGAN-PyTorch (the
    GN-GAN authors' code). Its output is the SNGAN one's with the pooled features
    divided by 64 (8x8 pixels), plus a bias. GN ignores a positive rescaling of ``f``,
    so ``GradNorm`` of the two agree while the bias is 0 and differ once it is not.
    """
    return ResNetDiscriminator([width] * 4, [True, True, False, False], norm,
                               pooling="mean", bias=True)


def gngan_resnet128_discriminator(norm: Norm = None,
                                  widths: Sequence[int] = (64, 128, 256, 512, 1024, 1024)
                                  ) -> ResNetDiscriminator:
    """The GN-GAN 128x128 ResNet discriminator: an optimized first block 3->64, blocks
    64->128->256->512->1024 with down-sampling, 1024->1024 without, ReLU, global average
    pooling, dense 1024->1; 38,419,137 parameters (147 MiB of float32 weights), the
    large case for bandwidth.

    As ``ResDiscriminator128`` in ``models/resnet.py`` of basiclab/GNGAN-PyTorch (its
    CelebA-HQ 128 model). The SNGAN-projection 128x128 discriminator has the same
    widths but sum pooling and a first conv of each block that keeps the input width;
    BigGAN's discriminator (Brock et al. 2019) is wider and has self-attention: neither
    is this network.
    """
    widths = list(widths)
    return ResNetDiscriminator(widths, [True] * (len(widths) - 1) + [False], norm,
                               pooling="mean", bias=True)


# Older names, kept for existing callers (lipkernels.benchmark uses both).
resnet_discriminator = sngan_resnet_discriminator
biggan_discriminator = gngan_resnet128_discriminator


__all__ = ["sngan_cnn_discriminator", "dcgan_discriminator", "sngan_cnn_generator",
           "sngan_resnet_discriminator", "gngan_resnet_discriminator",
           "gngan_resnet128_discriminator", "resnet_discriminator", "biggan_discriminator",
           "ResBlock", "ResNetDiscriminator"]
