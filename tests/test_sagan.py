"""SA-GAN self-attention (``lipkernels.models.SelfAttention2d``; Zhang et al., ICML 2019,
section 3, and the authors' ``non_local.py``) and the SA-GAN digits G and D built on it.

The block is checked against a plain computation written here (einsum for the 1x1 convs,
a reshape-and-max for the 2x2 pooling, torch.softmax, which the block does not use), by
gradcheck, and, with
``norm=lipkernels.spectral_norm``, against ``torch.nn.utils.parametrizations.spectral_norm``
(same state_dict, same outputs after loading either way), as tests/test_layers.py does
for single layers.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lipkernels
from lipkernels import models
from lipkernels.models import SelfAttention2d

from conftest import COMPILED_BACKENDS, assert_close, backend_context, _ONLY

# The emulation build's run (LIPKERNELS_TEST_BACKENDS=cuda) tests only what it adds.
ALL_BACKENDS = ([] if _ONLY else ["reference"]) + COMPILED_BACKENDS


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    with backend_context(request.param):
        yield request.param


def torch_sn(module):
    return torch.nn.utils.parametrizations.spectral_norm(module)


def lk_sn(module):
    return lipkernels.spectral_norm(module)


def w(conv: nn.Module) -> torch.Tensor:
    """A 1x1 conv's (normalized, if parametrized) weight as a (out, in) matrix."""
    return conv.weight[:, :, 0, 0]


def plain_attention(x, wq, wk, wv, wo, gamma, pool: bool):
    """SA-GAN eqs. 1-3 written out: f = W_f x (keys), g = W_g x (queries), h = W_h x
    (values), s_ij = f_i . g_j, beta_{j,i} = softmax_i s_ij, o_j = W_v sum_i beta_{j,i} h_i,
    y = gamma o + x; with ``pool`` the keys and values max-pooled 2x2 first."""
    b, c, hh, ww = x.shape
    q = torch.einsum("kc,bchw->bkhw", wq, x)
    k = torch.einsum("kc,bchw->bkhw", wk, x)
    v = torch.einsum("vc,bchw->bvhw", wv, x)
    if pool:
        k = k.reshape(b, k.shape[1], hh // 2, 2, ww // 2, 2).amax(dim=(3, 5))
        v = v.reshape(b, v.shape[1], hh // 2, 2, ww // 2, 2).amax(dim=(3, 5))
    s = torch.einsum("bkj,bki->bji", q.flatten(2), k.flatten(2))     # s[b, j, i] = f_i . g_j
    beta = torch.softmax(s, dim=2)                                 # normalized over keys i
    o = torch.einsum("bji,bvi->bvj", beta, v.flatten(2)).reshape(b, -1, hh, ww)
    return gamma * torch.einsum("cv,bvhw->bchw", wo, o) + x


def attention_of(m: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    return plain_attention(x, w(m.query), w(m.key), w(m.value), w(m.out), m.gamma, m.pool)


def sn_layers(model: nn.Module):
    return [m for m in model.modules() if parametrize.is_parametrized(m)]


WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


# ----------------------------------------------------------------- the block

def test_widths_and_init():
    for c, ck, cv in [(1, 1, 1), (4, 1, 2), (8, 1, 4), (16, 2, 8), (32, 4, 16), (64, 8, 32)]:
        m = SelfAttention2d(c)
        assert (m.key_channels, m.value_channels) == (ck, cv)
        assert [tuple(w(layer).shape) for layer in (m.query, m.key, m.value, m.out)] == [
            (ck, c), (ck, c), (cv, c), (c, cv)]
        assert all(layer.bias is None for layer in (m.query, m.key, m.value, m.out))
        assert m.gamma.shape == () and m.gamma.item() == 0.0 and m.gamma.requires_grad


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("norm", [None, lk_sn], ids=["plain", "sn"])
def test_gamma_zero_is_identity(pool, norm):
    for dtype in (torch.float32, torch.float64):
        m = SelfAttention2d(16, norm=norm, pool=pool).to(dtype)
        x = torch.randn(3, 16, 6, 4, dtype=dtype)
        y = m(x)
        assert torch.equal(y, x)
        # ... and yet gamma gets a gradient: the block can start learning.
        (y * torch.randn_like(y)).sum().backward()
        assert m.gamma.grad is not None and m.gamma.grad.abs().item() > 0


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("shape", [(2, 16, 6, 8), (1, 4, 2, 2), (3, 32, 4, 4)])
def test_matches_plain_computation(pool, shape):
    m = SelfAttention2d(shape[1], pool=pool).double()
    with torch.no_grad():
        m.gamma.fill_(0.7319)
    x = torch.randn(*shape, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape
    assert_close(y, attention_of(m, x).detach(), what=f"pool={pool} {shape}")
    assert not torch.allclose(y, x)  # the attention term is really there


def test_unpooled_odd_sizes_and_pooling_differs():
    m = SelfAttention2d(16, pool=False).double()
    with torch.no_grad():
        m.gamma.fill_(-1.3)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    assert_close(m(x), attention_of(m, x).detach(), what="pool=False 5x7")
    pooled = SelfAttention2d(16, pool=True).double()
    pooled.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    assert not torch.allclose(pooled(x), m(x))


@pytest.mark.parametrize("pool", [True, False])
def test_gradcheck(pool):
    """Gradients w.r.t. the input and every parameter (gamma included), first and
    second order (GN / GraN / gradient penalties differentiate D's input gradient)."""
    m = SelfAttention2d(8, pool=pool).double()
    with torch.no_grad():
        m.gamma.fill_(0.9)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_input_errors():
    m = SelfAttention2d(8)
    for bad in (torch.randn(8, 4, 4), torch.randn(2, 8, 4, 4, 1), torch.randn(2, 8)):
        with pytest.raises(ValueError, match=r"\bx must be a 4-D tensor"):
            m(bad)
    with pytest.raises(ValueError, match=r"\bx has 4 channels"):
        m(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"pool=True"):
        m(torch.randn(2, 8, 5, 4))
    SelfAttention2d(8, pool=False)(torch.randn(2, 8, 5, 3))  # fine unpooled
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="channels"):
            SelfAttention2d(bad)


# ----------------------------------------------------------------- spectral norm

SN_KEYS = ["gamma"] + [f"{conv}.parametrizations.weight.{part}"
                       for conv in ("query", "key", "value", "out")
                       for part in ("original", "0._u", "0._v")]


def test_sn_state_dict_matches_torch(any_backend):
    ours, theirs = SelfAttention2d(16, norm=lk_sn), SelfAttention2d(16, norm=torch_sn)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert sorted(sd_ours) == sorted(SN_KEYS)
    for k in sd_theirs:
        assert sd_ours[k].shape == sd_theirs[k].shape and sd_ours[k].dtype == sd_theirs[k].dtype, k
    assert len(sn_layers(ours)) == 4


def _load_into(src_norm, dst_norm, pool, gamma, seed, x):
    """A block with ``src_norm`` (gamma set, u and v moved by a training forward), its
    state dict loaded strictly into a fresh block with ``dst_norm``: both, in eval mode."""
    torch.manual_seed(seed)
    src = SelfAttention2d(16, norm=src_norm, pool=pool)
    with torch.no_grad():
        src.gamma.fill_(gamma)
    src(x)  # a training-mode forward moves u, v
    torch.manual_seed(seed + 1)
    dst = SelfAttention2d(16, norm=dst_norm, pool=pool)
    dst.load_state_dict(src.state_dict(), strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    return src.eval(), dst.eval()


@pytest.mark.parametrize("pool", [True, False])
def test_sn_state_dict_loads_both_ways(any_backend, pool):
    x = torch.randn(2, 16, 4, 6)
    theirs, ours = _load_into(torch_sn, lk_sn, pool, 0.8, 1, x)
    assert_close(ours(x), theirs(x), what="output after torch -> lipkernels")
    # the output is the plain computation with the normalized weights
    with torch.no_grad():
        assert_close(ours(x), attention_of(ours, x), what="SN block vs plain computation")
    ours2, theirs2 = _load_into(lk_sn, torch_sn, pool, -0.6, 3, x)
    assert_close(theirs2(x), ours2(x), what="output after lipkernels -> torch")


def test_sn_training_forward_matches_torch(any_backend):
    """Training mode: one power iteration per conv per forward, as torch's."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    theirs = SelfAttention2d(16, norm=torch_sn).double()
    with torch.no_grad():
        theirs.gamma.fill_(0.5)
    ours = SelfAttention2d(16, norm=lk_sn).double()
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):
        assert_close(ours(x), theirs(x), what=f"train forward {step}")
        for k, v in theirs.state_dict().items():
            assert_close(ours.state_dict()[k], v, what=f"step {step}: {k}")


# ----------------------------------------------------------------- the digits G and D

D_LAYOUT = [  # (type, in, out, kernel, stride) for the weighted layers, in order
    (nn.Conv2d, 1, 16, 3, 1), (nn.Conv2d, 16, 16, 4, 2), (nn.Conv2d, 16, 32, 3, 1),
    (SelfAttention2d, 32, 32, None, None),
    (nn.Conv2d, 32, 32, 4, 2), (nn.Conv2d, 32, 64, 3, 1), (nn.Conv2d, 64, 64, 4, 2),
    (nn.Conv2d, 64, 64, 3, 1), (nn.Linear, 256, 1, None, None)]
D_TYPES = [nn.Conv2d, nn.LeakyReLU] * 3 + [SelfAttention2d] + [nn.Conv2d, nn.LeakyReLU] * 4 + [
    nn.Flatten, nn.Linear]
G_TYPES = [nn.Linear, nn.Unflatten, nn.BatchNorm2d, nn.ReLU,
           nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU, SelfAttention2d,
           nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.Tanh]


def layout(model: nn.Sequential):
    out = []
    for m in model:
        if isinstance(m, SelfAttention2d):
            out.append((SelfAttention2d, m.channels, m.channels, None, None))
        elif isinstance(m, nn.Conv2d):
            out.append((nn.Conv2d, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]))
        elif isinstance(m, nn.Linear):
            out.append((nn.Linear, m.in_features, m.out_features, None, None))
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_digits_layouts():
    D = models.sagan_digits_discriminator()
    assert [type(m) for m in D] == D_TYPES
    assert layout(D) == D_LAYOUT
    assert D[6].pool and (D[6].key_channels, D[6].value_channels) == (4, 16)
    base = models.sngan_cnn_discriminator(channels=(16, 32, 64, 64), in_channels=1, image_size=16)
    assert [e for e in layout(D) if e[0] is not SelfAttention2d] == layout(base)
    assert n_params(D) == n_params(base) + 1281 == 147_890
    G = models.sagan_digits_generator()
    assert [type(m) for m in G] == G_TYPES
    assert (G[0].in_features, G[0].out_features) == (32, 1024)
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
            for m in (G[4], G[8], G[11])] == [(64, 32, (4, 4), (2, 2), (1, 1)),
                                              (32, 16, (4, 4), (2, 2), (1, 1)),
                                              (16, 1, (3, 3), (1, 1), (1, 1))]
    assert G[7].channels == 32
    assert n_params(G) == 75_169 + 1281 == 76_450
    assert models.sagan_digits_generator(z_dim=8, channels=(8, 8, 4))(torch.randn(2, 8)).shape == (
        2, 1, 16, 16)
    assert not sn_layers(G) and not sn_layers(D)


def test_digits_forward_backward_and_sn(any_backend):
    G = models.sagan_digits_generator(norm=lk_sn)
    D = models.sagan_digits_discriminator(norm=lk_sn)
    for net, n in ((D, 12), (G, 8)):  # every conv / transposed conv / dense, attention included
        weighted = [m for m in net.modules() if isinstance(m, WEIGHTED)]
        assert len(weighted) == n
        assert all(parametrize.is_parametrized(m, "weight") for m in weighted)
        assert len(sn_layers(net)) == n
    for net in (D, G):  # give the attention something to do
        for m in net.modules():
            if isinstance(m, SelfAttention2d):
                with torch.no_grad():
                    m.gamma.fill_(0.5)
    z = torch.randn(4, 32)
    x = G(z)
    assert x.shape == (4, 1, 16, 16) and x.abs().max() <= 1
    out = D(x)
    base = models.sngan_cnn_discriminator(norm=lk_sn, channels=(16, 32, 64, 64), in_channels=1,
                                          image_size=16)
    assert out.shape == base(x.detach()).shape == (4, 1)
    out.mean().backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert D[6].gamma.grad.abs() > 0 and G[7].gamma.grad.abs() > 0
    # the trainer's batched mode finds all 12 layers and gives the per-layer numbers
    D.eval()
    ref = D(x.detach())
    with lipkernels.nn.SpectralNormGroup(D) as group:
        assert len(group.layers) == 12
        assert_close(D(x.detach()), ref, what="SpectralNormGroup vs per layer")


def test_digits_sn_state_dict_matches_torch(any_backend):
    theirs = models.sagan_digits_discriminator(norm=torch_sn)
    ours = models.sagan_digits_discriminator(norm=lk_sn)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs[6].gamma.fill_(0.4)
    x = torch.randn(3, 1, 16, 16)
    theirs(x)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    assert_close(ours(x), theirs(x), what="digits D after torch -> lipkernels")


def test_digits_d_gradnorm_methods_agree():
    """GN-GAN over the attention D: the double-backward and the JVP methods agree."""
    D = models.sagan_digits_discriminator(norm=lk_sn).double().eval()
    with torch.no_grad():
        D[6].gamma.fill_(0.7)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    outs = []
    for method in ("double_backward", "jvp"):
        D.zero_grad()
        out = lipkernels.nn.GradNorm(D, method=method)(x)
        out.sum().backward()
        outs.append((out.detach(), {n: p.grad.clone() for n, p in D.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert a.shape == (3, 1) and a.abs().max() <= 1
    assert_close(a, b, what="GradNorm output")
    for k in ga:
        assert_close(ga[k], gb[k], what=f"GradNorm grad {k}")
