"""lipkernels.models builds exactly the networks it names (docs/math.md section 9).

The expected layer shapes and parameter counts are taken from the papers' official code
(read there, counted here by hand; the arithmetic is written out beside each number), not
from lipkernels.models:

* GN-GAN: basiclab/GNGAN-PyTorch, ``models/dcgan.py`` (``Discriminator32/48``,
  ``Generator32``) and ``models/resnet.py`` (``ResDiscriminator32``,
  ``ResDiscriminator128``);
* SNGAN: pfnet-research/chainer-gan-lib ``common/net.py`` (``SNDCGANDiscriminator``,
  ``bottom_width=4, ch=512``) and pfnet-research/sngan_projection
  ``dis_models/snresnet_32.py`` (``SNResNetProjectionDiscriminator``, ``ch=128``,
  ``n_classes=0``; its final ``SNLinear`` has ``nobias=True``); Chainer's convolution
  and linear links have a bias unless ``nobias=True``;
* the SNGAN paper's Table 3, for the network as printed there.

The forward passes are checked against the official forward order written out here
with ``torch.nn.functional`` on the model's own parameters.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkernels
from lipkernels import models
from lipkernels.nn import GradNorm


def conv(cin, cout, k):
    """(out, in, k, k) weight plus a bias of out."""
    return cin * cout * k * k + cout


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_shapes(module: nn.Module):
    """Shapes of the conv / dense weights in registration order (the unnormalized
    weight when a spectral-norm parametrization is registered)."""
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# GN-GAN dcgan.Discriminator(M) == chainer-gan-lib SNDCGANDiscriminator(ch=512):
# 3->64 (3x3), 64->128 (4x4 s2), 128->128, 128->256 (s2), 256->256, 256->512 (s2),
# 512->512, dense (M/8)^2*512 -> 1.
DCGAN_CONVS = (conv(3, 64, 3) + conv(64, 128, 4) + conv(128, 128, 3) + conv(128, 256, 4)
               + conv(256, 256, 3) + conv(256, 512, 4) + conv(512, 512, 3))
# The SNGAN paper's Table 3 (b): 3->64, 64->64 (s2), 64->128, 128->128 (s2), 128->256,
# 256->256 (s2), 256->512, dense 8192 -> 1.
SNGAN_TABLE_CONVS = (conv(3, 64, 3) + conv(64, 64, 4) + conv(64, 128, 3) + conv(128, 128, 4)
                     + conv(128, 256, 3) + conv(256, 256, 4) + conv(256, 512, 3))
# ResNet 32x32, width 128: optimized block (1x1 shortcut 3->128, 3->128, 128->128), a
# down-sampling block (1x1 shortcut 128->128 and two 3x3 convs), two plain blocks (two
# 3x3 convs each, identity shortcut).
RESNET32_BLOCKS = (conv(3, 128, 1) + conv(3, 128, 3) + conv(128, 128, 3)
                   + conv(128, 128, 1) + 2 * conv(128, 128, 3) + 4 * conv(128, 128, 3))


def _resnet128_blocks():
    """GN-GAN ResDiscriminator128: OptimizedDisblock(3, 64); DisBlock(i, o, down): 1x1
    shortcut i->o when i != o or down, 3x3 i->o, 3x3 o->o."""
    total = conv(3, 64, 1) + conv(3, 64, 3) + conv(64, 64, 3)
    for i, o, down in ((64, 128, True), (128, 256, True), (256, 512, True), (512, 1024, True),
                       (1024, 1024, False)):
        total += (conv(i, o, 1) if (i != o or down) else 0) + conv(i, o, 3) + conv(o, o, 3)
    return total


@pytest.mark.parametrize("build, expected", [
    (models.sngan_cnn_discriminator, SNGAN_TABLE_CONVS + 8192 + 1),             # 2,935,873
    (models.dcgan_discriminator, DCGAN_CONVS + 4 * 4 * 512 + 1),                # 5,860,865
    (lambda: models.dcgan_discriminator(image_size=48), DCGAN_CONVS + 6 * 6 * 512 + 1),
    (models.sngan_resnet_discriminator, RESNET32_BLOCKS + 128),                 # 1,053,824
    (models.resnet_discriminator, RESNET32_BLOCKS + 128),
    (models.gngan_resnet_discriminator, RESNET32_BLOCKS + 128 + 1),             # 1,053,825
    (models.gngan_resnet128_discriminator, _resnet128_blocks() + 1024 + 1),     # 38,419,137
    (models.biggan_discriminator, _resnet128_blocks() + 1024 + 1),
    # GN-GAN Generator32: dense 128 -> 4*4*512, BN(512), deconv 512->256->128->64 (4x4)
    # with BN, last 64->3 (3x3); a BatchNorm2d(c) has 2c parameters.
    (models.sngan_cnn_generator, 128 * 8192 + 8192 + 2 * 512 + conv(512, 256, 4) + 2 * 256
     + conv(256, 128, 4) + 2 * 128 + conv(128, 64, 4) + 2 * 64 + conv(64, 3, 3)),  # 3,813,379
])
def test_parameter_counts_match_the_official_code(build, expected):
    assert n_params(build()) == expected


def test_the_numbers_in_the_docs():
    """The counts quoted in lipkernels.models' docstrings and docs/math.md."""
    assert SNGAN_TABLE_CONVS + 8193 == 2_935_873
    assert DCGAN_CONVS + 8193 == 5_860_865 and DCGAN_CONVS + 18433 == 5_871_105
    assert RESNET32_BLOCKS + 128 == 1_053_824
    assert _resnet128_blocks() + 1025 == 38_419_137
    for text in (models.__doc__, open(_docs_math()).read()):
        for number in ("2,935,873", "5,860,865", "3,813,379", "1,053,824", "1,053,825",
                       "38,419,137"):
            assert number in text


def _docs_math():
    import os
    return os.path.join(os.path.dirname(__file__), os.pardir, "docs", "math.md")


def test_layer_shapes():
    assert weight_shapes(models.sngan_cnn_discriminator()) == [
        (64, 3, 3, 3), (64, 64, 4, 4), (128, 64, 3, 3), (128, 128, 4, 4), (256, 128, 3, 3),
        (256, 256, 4, 4), (512, 256, 3, 3), (1, 8192)]
    assert weight_shapes(models.dcgan_discriminator()) == [
        (64, 3, 3, 3), (128, 64, 4, 4), (128, 128, 3, 3), (256, 128, 4, 4), (256, 256, 3, 3),
        (512, 256, 4, 4), (512, 512, 3, 3), (1, 8192)]
    assert weight_shapes(models.dcgan_discriminator(image_size=48))[-1] == (1, 6 * 6 * 512)
    # Spectral norm changes no shape and adds no parameter (u, v are buffers).
    D = models.dcgan_discriminator(norm=lipkernels.spectral_norm)
    assert n_params(D) == DCGAN_CONVS + 8193
    assert models.sngan_resnet_discriminator().linear.bias is None
    assert models.gngan_resnet_discriminator().linear.bias is not None


def _gngan_resnet_forward(D, x, down):
    """GNGAN-PyTorch ResDiscriminator32/128.forward, written out with torch.nn.functional:
    OptimizedDisblock = [conv3x3, ReLU, conv3x3, AvgPool2d(2)] + [AvgPool2d(2), conv1x1];
    DisBlock(i, o, down) = [ReLU, conv3x3, ReLU, conv3x3, (AvgPool2d(2))]
    + [(conv1x1 if i != o or down), (AvgPool2d(2))]; then ReLU, AdaptiveAvgPool2d(1),
    flatten, Linear. ``down``: the official down-sampling flags of the DisBlocks."""
    def c(layer, h, pad):
        return F.conv2d(h, layer.weight, layer.bias, 1, pad)

    first, *rest = D.blocks
    assert len(rest) == len(down)
    h = F.avg_pool2d(c(first.conv2, F.relu(c(first.conv1, x, 1)), 1), 2) \
        + c(first.shortcut, F.avg_pool2d(x, 2), 0)
    for blk, d in zip(rest, down):
        r = c(blk.conv2, F.relu(c(blk.conv1, F.relu(h), 1)), 1)
        cin, cout = blk.conv1.weight.shape[1], blk.conv2.weight.shape[0]
        assert (blk.shortcut is not None) == (cin != cout or d)
        sc = c(blk.shortcut, h, 0) if blk.shortcut is not None else h
        h = (F.avg_pool2d(r, 2) + F.avg_pool2d(sc, 2)) if d else r + sc
    h = F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1)
    return F.linear(h, D.linear.weight, D.linear.bias)


@pytest.mark.parametrize("build, size, down", [
    (lambda: models.gngan_resnet_discriminator(width=16), 32, [True, False, False]),
    (lambda: models.gngan_resnet128_discriminator(widths=(4, 8, 8, 16, 16, 16)), 128,
     [True, True, True, True, False]),
])
def test_gngan_resnet_forward_is_the_official_one(build, size, down):
    D = build().double()
    with torch.no_grad():
        D.linear.bias.fill_(0.3)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    torch.testing.assert_close(D(x), _gngan_resnet_forward(D, x, down), rtol=1e-12, atol=1e-12)


def test_sum_and_mean_pooling_differ_by_the_pixel_count():
    """The SNGAN ResNet sums the final 8x8 features (no bias), GN-GAN's averages them
    (with a bias): with the same blocks and dense weight, SNGAN = 64 * (GN-GAN - bias)."""
    gn = models.gngan_resnet_discriminator(width=16).double()
    sn = models.sngan_resnet_discriminator(width=16).double()
    state = {k: v for k, v in gn.state_dict().items() if k != "linear.bias"}
    sn.load_state_dict(state)
    with torch.no_grad():
        gn.linear.bias.fill_(0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(sn(x), 64 * (gn(x) - 0.5), rtol=1e-12, atol=1e-12)


def test_gn_sees_the_bias_not_the_pooling():
    """GN is invariant to a positive rescaling of f, so sum and mean pooling give the
    same GN output while GN-GAN's bias is 0, and different ones once it is not."""
    gn = models.gngan_resnet_discriminator(width=16).double()
    sn = models.sngan_resnet_discriminator(width=16).double()
    sn.load_state_dict({k: v for k, v in gn.state_dict().items() if k != "linear.bias"})
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        gn.linear.bias.zero_()
    torch.testing.assert_close(GradNorm(gn)(x), GradNorm(sn)(x), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        gn.linear.bias.fill_(0.5)
    assert (GradNorm(gn)(x) - GradNorm(sn)(x)).abs().max() > 1e-3


@pytest.mark.parametrize("build, size", [
    (models.sngan_cnn_discriminator, 32), (models.dcgan_discriminator, 32),
    (lambda: models.dcgan_discriminator(image_size=48), 48),
    (lambda: models.sngan_cnn_discriminator(image_size=48), 48),
])
def test_cnn_forward_shapes(build, size):
    assert build()(torch.randn(2, 3, size, size)).shape == (2, 1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="image_size"):
        models.dcgan_discriminator(image_size=30)
    with pytest.raises(ValueError, match="pooling"):
        models.ResNetDiscriminator([8], [True], pooling="max")
