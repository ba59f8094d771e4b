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


# ------------------------------------------------------------------ SA-GAN self-attention

class SelfAttention2d(nn.Module):
    r"""The self-attention block of SA-GAN (Zhang, Goodfellow, Metaxas, Odena,
    "Self-Attention Generative Adversarial Networks", ICML 2019, section 3), with the
    widths and the pooling of the authors' TensorFlow code (brain-research/
    self-attention-gan, ``non_local.py``, ``sn_non_local_block_sim``).

    For ``x`` of shape ``(B, C, H, W)`` seen as ``N = H W`` feature vectors
    ``x_1 ... x_N`` in ``R^C`` (paper, eqs. 1-3)::

        f(x) = W_f x,  g(x) = W_g x         (1x1 convs C -> C_k, C_k = max(1, C // 8))
        h(x) = W_h x                        (1x1 conv  C -> C_v, C_v = max(1, C // 2))
        s_ij = f(x_i)^T g(x_j)
        beta_{j,i} = exp(s_ij) / sum_i exp(s_ij)      (softmax over the keys i)
        o_j = W_v ( sum_i beta_{j,i} h(x_i) )          (1x1 conv C_v -> C)
        y_j = gamma * o_j + x_j                        (gamma: a learnable scalar, init 0)

    ``beta_{j,i}`` is how much output location ``j`` attends to location ``i``: ``g`` is
    the query (at ``j``), ``f`` the key and ``h`` the value (at ``i``). The attributes
    are named by role: ``query`` = ``W_g`` (the code's ``sn_conv_theta``), ``key`` =
    ``W_f`` (``sn_conv_phi``), ``value`` = ``W_h`` (``sn_conv_g``), ``out`` = ``W_v``
    (``sn_conv_attn``), ``gamma`` (``sigma_ratio``).

    Where the paper and the code differ, this follows the code unless told otherwise:

    * ``C_v = C // 2`` (the paper writes ``C / 8`` for ``W_h`` and ``W_v`` too);
    * ``pool=True`` (default): the key and value maps ``f(x)``, ``h(x)`` are max-pooled
      2x2 (stride 2) before the attention, so each of the ``N`` queries attends to
      ``N / 4`` locations; ``H`` and ``W`` must then be even. ``pool=False`` is the
      paper's equation (every query attends to all ``N`` locations);
    * the four 1x1 convs have no bias and Xavier-uniform initial weights (the code's
      ``sn_conv1x1`` with ``tf.contrib.layers.xavier_initializer``).

    The softmax is computed as ``exp(s - max_i s) / sum`` rather than by
    ``torch.softmax``, whose forward-mode rule breaks reverse-over-forward
    differentiation (the ``method='jvp'`` of ``GradNorm`` / ``GraN`` / the penalties).

    ``gamma = 0`` at initialization, so a new block is the identity (the paper: the
    network first relies on local cues, then learns to weight in non-local evidence).

    Args:
        channels: ``C``, the input (and output) channels.
        norm: applied to each of the four convs, e.g. ``lipkernels.spectral_norm``
            (SA-GAN spectrally normalizes every layer of G and D, these included) or
            ``torch.nn.utils.parametrizations.spectral_norm``; None for none. ``gamma``
            is not normalized.
        pool: max-pool the keys and values 2x2 (the official code) or not (the paper).

    Input ``(B, C, H, W)``, output the same shape. With spectrally normalized convs the
    block is still not globally Lipschitz (dot-product attention is not: Kim,
    Papamakarios, Mnih, "The Lipschitz Constant of Self-Attention", ICML 2021), and
    ``gamma`` is unbounded.
    """

    def __init__(self, channels: int, norm: Norm = None, pool: bool = True) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SelfAttention2d: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.key_channels = max(1, channels // 8)
        self.value_channels = max(1, channels // 2)
        self.pool = bool(pool)

        def conv1x1(cin: int, cout: int) -> nn.Module:
            layer = nn.Conv2d(cin, cout, 1, bias=False)
            nn.init.xavier_uniform_(layer.weight)
            return _apply(norm, layer)

        self.query = conv1x1(channels, self.key_channels)       # W_g
        self.key = conv1x1(channels, self.key_channels)         # W_f
        self.value = conv1x1(channels, self.value_channels)     # W_h
        self.out = conv1x1(self.value_channels, channels)       # W_v
        self.gamma = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, key_channels={self.key_channels}, "
                f"value_channels={self.value_channels}, pool={self.pool}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SelfAttention2d: x must be a 4-D tensor (B, C, H, W), got "
                             f"{x.dim()}-D shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"SelfAttention2d: x has {c} channels (dim 1 of shape "
                             f"{tuple(x.shape)}), the block was built for {self.channels}")
        if self.pool and (h % 2 or w % 2):
            raise ValueError(f"SelfAttention2d: with pool=True x's height and width must be "
                             f"even (2x2 max-pooling of keys and values), got {h}x{w}; "
                             f"use pool=False")
        q = self.query(x).flatten(2)                    # (B, C_k, N)
        k, v = self.key(x), self.value(x)
        if self.pool:
            k, v = nn.functional.max_pool2d(k, 2), nn.functional.max_pool2d(v, 2)
        k, v = k.flatten(2), v.flatten(2)               # (B, C_k, M), (B, C_v, M)
        beta = _softmax_last(torch.bmm(q.transpose(1, 2), k))   # (B, N, M): beta_{j,i}
        o = torch.bmm(v, beta.transpose(1, 2)).reshape(b, self.value_channels, h, w)
        return x + self.gamma * self.out(o)


def _softmax_last(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim as ``exp(s - max) / sum``, the max held constant (the
    softmax does not depend on it, so every derivative is exact). Not ``torch.softmax``:
    its forward-mode rule modifies a tensor that reverse mode saved, so the JVP method of
    GN / GraN / the penalties (reverse over forward) fails on it (pytorch/pytorch#162350,
    open in torch 2.13)."""
    e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())
    return e / e.sum(dim=-1, keepdim=True)


def _insert_after_stage(layers: Sequence[nn.Module], stride2_index: int,
                        block: nn.Module) -> nn.Sequential:
    """``layers`` with ``block`` inserted before their ``stride2_index``-th (from 0)
    stride-2 conv, i.e. after the feature stage that conv down-samples."""
    layers = list(layers)
    seen = -1
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d) and tuple(layer.stride) == (2, 2):
            seen += 1
            if seen == stride2_index:
                return nn.Sequential(*layers[:i], block, *layers[i:])
    raise ValueError(f"no stride-2 conv number {stride2_index} to insert "
                     f"{type(block).__name__} before")


def sagan_digits_generator(z_dim: int = 32, channels: Sequence[int] = (64, 32, 16),
                           norm: Norm = None, attention: bool = True) -> nn.Sequential:
    """The small digits generator of ``lipkernels.train`` (``methods._digits_generator``)
    with an SA-GAN :class:`SelfAttention2d` after its 8x8 stage, mapping ``(B, z_dim)``
    to ``(B, 1, 16, 16)`` in ``[-1, 1]``::

         0 Linear(z_dim, 4*4*c0),   1 Unflatten -> (c0, 4, 4)
         2 BatchNorm2d(c0),         3 ReLU      4x4
         4 ConvTranspose2d(c0, c1, 4, 2, 1)
         5 BatchNorm2d(c1),         6 ReLU      8x8
         7 SelfAttention2d(c1)                  8x8 (keys, values pooled to 4x4)
         8 ConvTranspose2d(c1, c2, 4, 2, 1)
         9 BatchNorm2d(c2),        10 ReLU      16x16
        11 Conv2d(c2, 1, 3, 1, 1), 12 Tanh

    ``norm`` (e.g. ``lipkernels.spectral_norm``: SA-GAN normalizes G too) is applied to
    the Linear, both transposed convs, the last conv and the four 1x1 convs of the
    attention; not to BatchNorm. The paper puts attention on the mid-to-high level
    feature maps; here that is the 8x8 one of c1 = 32 channels (keys and values
    max-pooled to 4x4). 76,450 parameters with the defaults (75,169 without attention).
    ``attention=False``: the same network without the block (SA-GAN's ablation baseline).
    """
    c0, c1, c2 = channels
    return nn.Sequential(
        _apply(norm, nn.Linear(z_dim, 4 * 4 * c0)), nn.Unflatten(1, (c0, 4, 4)),
        nn.BatchNorm2d(c0), nn.ReLU(),
        _apply(norm, nn.ConvTranspose2d(c0, c1, 4, 2, 1)), nn.BatchNorm2d(c1), nn.ReLU(),
        *([SelfAttention2d(c1, norm=norm)] if attention else []),
        _apply(norm, nn.ConvTranspose2d(c1, c2, 4, 2, 1)), nn.BatchNorm2d(c2), nn.ReLU(),
        _apply(norm, nn.Conv2d(c2, 1, 3, 1, 1)), nn.Tanh(),
    )


def sagan_digits_discriminator(norm: Norm = None, attention: bool = True) -> nn.Sequential:
    """The digits discriminator of ``lipkernels.train``
    (``sngan_cnn_discriminator(norm, channels=(16, 32, 64, 64), in_channels=1,
    image_size=16)``) with an SA-GAN :class:`SelfAttention2d` after its 8x8 stage
    (before the stride-2 conv that down-samples 8x8 to 4x4). Maps ``(B, 1, 16, 16)`` to
    ``(B, 1)``; LeakyReLU(0.1) after every conv (``LReLU`` below)::

         0 Conv2d(1, 16, 3, 1, 1),   1 LReLU      16x16
         2 Conv2d(16, 16, 4, 2, 1),  3 LReLU      8x8
         4 Conv2d(16, 32, 3, 1, 1),  5 LReLU      8x8
         6 SelfAttention2d(32)                    8x8 (keys, values pooled to 4x4)
         7 Conv2d(32, 32, 4, 2, 1),  8 LReLU      4x4
         9 Conv2d(32, 64, 3, 1, 1), 10 LReLU      4x4
        11 Conv2d(64, 64, 4, 2, 1), 12 LReLU      2x2
        13 Conv2d(64, 64, 3, 1, 1), 14 LReLU      2x2
        15 Flatten, 16 Linear(256, 1)

    ``norm`` (e.g. ``lipkernels.spectral_norm``) is applied to all 8 convs/dense and to
    the 4 attention convs (12 normalized weights). 147,890 parameters (146,609 without
    attention). Not piecewise linear (softmax), so ``GradNorm(first_order=True)``'s
    exactness note does not hold for it. ``attention=False``: without the block.
    """
    base = sngan_cnn_discriminator(norm=norm, channels=(16, 32, 64, 64), in_channels=1,
                                   image_size=16)
    if not attention:
        return base
    return _insert_after_stage(base, 1, SelfAttention2d(32, norm=norm))


__all__ += ["SelfAttention2d", "sagan_digits_generator", "sagan_digits_discriminator"]
