"""The PacGAN mode-collapse protocol (``lipkernels train --protocol pacgan``): its networks
against the architecture of PacGAN's code (parameter counts in closed form, maxout,
packing), the simultaneous update against a hand-written one, the fixed training set read
in a new order every pass, eval-mode sampling, the code's coverage rule, the budgets, and
resuming a packed run."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipkernels.train import data, methods, metrics, protocols, runner

from conftest import MAIN_RUN

pytestmark = pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of "
                                                     "the suite tests it")

P = protocols.PROTOCOLS["pacgan"]


def test_networks_have_the_code_s_architecture():
    """G 2 -> 400 x 4 -> 2 (no biases but the output's; BatchNorm scale and shift), D three
    maxout layers 200 x 5 pieces and a linear output, on 2 * pack inputs."""
    torch.manual_seed(0)
    G = protocols.pacgan_generator()
    n_g = 2 * 400 + 3 * 400 * 400 + 4 * 2 * 400 + 400 * 2 + 2
    assert sum(p.numel() for p in G.parameters()) == n_g
    bns = [m for m in G.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 4 and all(b.eps == 1e-4 and b.momentum == 0.05 for b in bns)
    for pack in (1, 3):
        D = protocols.pacgan_discriminator(pack)
        n_d = (2 * pack * 1000 + 1000) + 2 * (200 * 1000 + 1000) + 201
        assert sum(p.numel() for p in D.parameters()) == n_d
        assert D(torch.randn(6 * pack, 2)).shape == (6, 1)
    weights = torch.cat([m.weight.flatten() for m in D.modules() if isinstance(m, nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in D.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="multiple of the packing degree 3"):
        D(torch.randn(7, 2))


def test_maxout_and_packing_by_hand():
    torch.manual_seed(1)
    layer = protocols.Maxout(4, 3, 5)
    x = torch.randn(7, 4, dtype=torch.float64)
    layer.double()
    y = x @ layer.linear.weight.T + layer.linear.bias
    expect = torch.stack([y[:, 5 * j:5 * j + 5].max(1).values for j in range(3)], 1)
    torch.testing.assert_close(layer(x), expect, rtol=0, atol=1e-14)
    net = nn.Linear(4, 1).double()
    packed = protocols.Packed(net, 2)
    xs = torch.randn(6, 2, dtype=torch.float64)
    by_hand = torch.stack([net(torch.cat([xs[2 * i], xs[2 * i + 1]])) for i in range(3)])
    torch.testing.assert_close(packed(xs), by_hand, rtol=0, atol=1e-15)


def test_spectrally_normalized_maxout_discriminator():
    """SNGAN in this protocol: every linear map of the maxout D spectrally normalized
    after its N(0, 0.02) initialisation: its u, v belong to those weights (the normalized
    weight's spectral norm is near 1 from the start), and torch's own spectral norm from the
    same state gives the same weights."""
    from lipkernels.train.plain import plain_copy
    torch.manual_seed(0)
    D = protocols.pacgan_discriminator(1, sn=True)
    lins = [m for m in D.modules() if isinstance(m, nn.Linear)]
    assert len(lins) == 4 and all(hasattr(m, "parametrizations") for m in lins)
    w = lins[1].parametrizations.weight.original
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    # 15 power iterations at registration (as torch's): the estimate of sigma is within a
    # few percent from below for this 1000 x 200 Gaussian matrix (close top singular
    # values); u, v of other weights would leave it far off
    assert 1.0 <= float(torch.linalg.matrix_norm(lins[1].weight.detach(), 2)) < 1.1
    twin = plain_copy(D)
    x = torch.randn(5, 2)
    torch.testing.assert_close(twin(x), D(x), rtol=1e-5, atol=1e-6)


def test_methods_carry_the_code_s_settings():
    gan = P.methods["nsgan"]
    assert (gan.optimizer, gan.lr, gan.betas, gan.n_critic, gan.simultaneous, gan.pack) == (
        "adam", 1e-4, (0.8, 0.999), 1, True, 1)
    assert [P.methods[f"pacgan{k}"].pack for k in (2, 3, 4)] == [2, 3, 4]
    assert P.methods["wgangp"].gp_weight == 0.1
    for name in ("wgan", "sngan", "gngan", "grand", "granc"):     # the seeds' own settings
        assert P.methods[name] == methods.METHODS[name]
    assert P.batch == {"ring8": 100, "grid25": 100} and P.data_points == 100_000
    # budgets in D steps: 10 epochs of 1,000 (--long), 5 (the suite)
    for name, m in P.methods.items():
        assert P.long_budget(name, "ring8") * m.n_critic == 10_000
        assert P.budget(name, "grid25") * m.n_critic == 5_000


def test_simultaneous_step_is_pacgan_s_update():
    """One batch of fakes; D's and G's gradients both at the current parameters; both Adam
    steps: against the update written out on copies of the networks (float64)."""
    m = P.methods["pacgan2"]
    torch.manual_seed(3)
    G, D, z_dim = protocols._pacgan_build(m, "ring8")
    t = methods.Trainer(m, G, D, z_dim, torch.float64)
    G2, D2 = copy.deepcopy(t.G), copy.deepcopy(t.D)
    og = torch.optim.Adam(G2.parameters(), 1e-4, betas=(0.8, 0.999))
    od = torch.optim.Adam(D2.parameters(), 1e-4, betas=(0.8, 0.999))
    for step in range(3):
        real = torch.randn(8, 2, dtype=torch.float64)
        torch.manual_seed(10 + step)
        d_loss, g_loss = t.step([real])
        torch.manual_seed(10 + step)
        z = torch.randn(8, 2, dtype=torch.float64)
        fake = G2(z)
        pr = D2.net(real.reshape(4, 4)).reshape(-1)
        pf = D2.net(fake.reshape(4, 4)).reshape(-1)
        ld = (F.softplus(-pr) + F.softplus(pf)).mean()
        lg = F.softplus(-pf).mean()
        gd = torch.autograd.grad(ld, list(D2.parameters()), retain_graph=True)
        gg = torch.autograd.grad(lg, list(G2.parameters()))
        for p, g in zip(list(D2.parameters()) + list(G2.parameters()), gd + gg):
            p.grad = g
        od.step()
        og.step()
        assert d_loss == pytest.approx(float(ld.detach()), rel=1e-12)
        assert g_loss == pytest.approx(float(lg.detach()), rel=1e-12)
    for a, b in ((t.G, G2), (t.D, D2)):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-13, msg=k)


def test_bad_method_settings_raise():
    base = P.methods["nsgan"]
    import dataclasses
    with pytest.raises(ValueError, match="simultaneous update needs n_critic 1"):
        dataclasses.replace(base, n_critic=5)
    with pytest.raises(ValueError, match="packing .* plain discriminator only"):
        dataclasses.replace(base, pack=2, wrap="gn")
    with pytest.raises(ValueError, match="pack must be >= 1"):
        dataclasses.replace(base, pack=0)


def test_fixed_training_set_is_reshuffled_every_pass():
    s = data.Sampler("grid25", 0, torch.float64, points=1000)
    assert s.fixed.shape == (1000, 2)
    first = torch.cat([s(100) for _ in range(10)])
    second = torch.cat([s(100) for _ in range(10)])
    key = lambda x: sorted(map(tuple, x.tolist()))
    assert key(first) == key(s.fixed) == key(second)     # each pass: every point once
    assert not torch.equal(first, second)                # in a new order
    state = s.state_dict()
    a = s(300)
    s.load_state_dict(state)
    assert torch.equal(s(300), a)
    with pytest.raises(ValueError, match="fixed training set is for ring8, grid25"):
        data.Sampler("digits", 0, points=10)
    with pytest.raises(ValueError, match="larger than the fixed training set"):
        s(1001)


def test_eval_mode_samples_use_the_running_statistics_and_change_nothing():
    m = P.methods["nsgan"]
    torch.manual_seed(0)
    G, D, z_dim = protocols._pacgan_build(m, "ring8")
    t = methods.Trainer(m, G, D, z_dim, torch.float64)
    for bn in (x for x in t.G.modules() if isinstance(x, nn.BatchNorm1d)):
        bn.running_mean.normal_()
    before = copy.deepcopy(t.G.state_dict())
    t.sample_eval = True
    torch.manual_seed(5)
    got = t.sample(50)
    torch.manual_seed(5)
    z = torch.randn(50, 2, dtype=torch.float64)
    ref = copy.deepcopy(t.G).eval()
    torch.testing.assert_close(got, ref(z), rtol=0, atol=1e-14)
    assert t.G.training
    assert all(torch.equal(v, before[k]) for k, v in t.G.state_dict().items())
    t.sample_eval = False
    torch.manual_seed(5)
    assert not torch.allclose(t.sample(50), got)          # training mode: batch statistics


def test_coverage_rule_of_the_code():
    """``modes1``: modes with at least one sample within 3 sigma; ``modes``: with 20."""
    mix = data.mixture("ring8")
    c = mix.centers
    x = torch.cat([c[0].repeat(30, 1), c[1].repeat(5, 1), c[2].repeat(1, 1) + 3.5 * mix.sigma,
                   c[3].repeat(1, 1)])
    out = metrics.mixture_metrics(x, mix)
    assert (out["modes"], out["modes1"]) == (1, 3)
    assert out["hq"] == pytest.approx(100 * 36 / 37)
    assert "modes1" in metrics.metric_names("ring8", "pacgan")
    assert "modes1" not in metrics.metric_names("ring8")


def test_packed_run_resumes_exactly(tmp_path):
    """A PacGAN3 run on the fixed set stopped at step 3 and continued to 6 equals 6 steps
    in one go (the pass's order is in the checkpoint)."""
    ck = str(tmp_path / "run.ckpt")
    kw = dict(seed=1, batch=4, eval_every=3, keep_trainer=True, n_eval=100, protocol="pacgan")
    runner.train_run("pacgan3", "ring8", 3, checkpoint=ck, checkpoint_every=3, **kw)
    resumed = runner.train_run("pacgan3", "ring8", 6, checkpoint=ck, checkpoint_every=3, **kw)
    whole = runner.train_run("pacgan3", "ring8", 6, **kw)
    assert resumed["d_loss"] == whole["d_loss"] and resumed["g_loss"] == whole["g_loss"]
    assert resumed["curve"] == whole["curve"] and "modes1" in whole["final"]
    for a, b in zip(resumed["trainer"].state_dict()["G"].values(),
                    whole["trainer"].state_dict()["G"].values()):
        assert torch.equal(a, b)
    assert whole["trainer"].sample_eval


def test_suite_plan_budgets():
    import argparse
    args = argparse.Namespace(protocol="pacgan", suite=True, data=None, method=None, seed=None,
                              quick=False, long=False, steps=None, dtype="float32",
                              backend="auto")
    p, tasks, seeds, steps = runner.plan(args)
    by = {(t["method"], t["data"]): t["steps"] for t in tasks}
    assert len(by) == 2 * len(P.methods) and seeds == [0]
    assert by[("nsgan", "ring8")] == 5000 and by[("wgangp", "grid25")] == 1000
    args.long = True
    by = {(t["method"], t["data"]): t["steps"] for t in runner.plan(args)[1]}
    assert by[("pacgan4", "grid25")] == 10_000 and by[("sngan", "ring8")] == 2000


def test_ensemble_refuses_the_protocol():
    from lipkernels.train.ensemble import EnsembleTrainer
    with pytest.raises(NotImplementedError, match="the pacgan protocol is not supported"):
        EnsembleTrainer("sngan", "ring8", [0, 1], protocol="pacgan")


def test_suite_command_runs_every_pair(tmp_path):
    import json
    import os
    from lipkernels.cli import main
    args = ["train", "--protocol", "pacgan", "--suite", "--steps", "2", "--out", str(tmp_path),
            "--no-plot"]
    assert main(args) == 0
    stem = [n for n in os.listdir(tmp_path) if n.endswith(".json")][0]
    res = json.load(open(tmp_path / stem))
    assert {(r["method"], r["data"]) for r in res["runs"]} == {
        (m, d) for m in P.methods for d in ("ring8", "grid25")}
    assert all(r["protocol"] == "pacgan" and "modes1" in r["final"] for r in res["runs"])
    md = open(tmp_path / stem.replace(".json", ".md")).read()
    assert "| pacgan4 |" in md and "modes (1 HQ)" in md
