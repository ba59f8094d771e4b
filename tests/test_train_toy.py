"""The WGAN-GP toy protocol (``lipkernels train --protocol wgangp-toy``): its data against
the official script's generators (scikit-learn's swiss roll itself), its networks'
initialisation, TensorFlow's RMSProp, the metrics on known samples, resuming a run, the
command's errors, and Figure 1's experiments at a small size."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lipkernels.train import data, figures, methods, metrics, protocols, runner

from conftest import MAIN_RUN

pytestmark = pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of "
                                                     "the suite tests it")


def _nearest(x, centers):
    d = torch.cdist(x.double(), centers)
    return d.min(1)


def test_8gaussians_as_the_script_makes_them():
    """Centres 2 (cos k pi/4, sin k pi/4) / 1.414, noise 0.02 / 1.414 per coordinate,
    modes equally likely."""
    s = data.Sampler("8gaussians", 0, torch.float64)
    x = torch.cat([s(256) for _ in range(80)])
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centers = torch.stack([angles.cos(), angles.sin()], 1) * 2 / 1.414
    dist, idx = _nearest(x, centers)
    resid = x - centers[idx]
    assert resid.std(0) == pytest.approx(torch.full((2,), 0.02 / 1.414, dtype=torch.float64), rel=0.03)
    counts = torch.bincount(idx, minlength=8).double()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.02
    assert s(256).dtype == torch.float64 and s(3).shape == (3, 2)


def test_25gaussians_is_one_fixed_shuffled_set_read_in_order():
    """100,000 points, 4,000 per centre of (2i, 2j) / 2.828, noise 0.05 / 2.828; batches
    in order, a new pass (in the same order) when the next batch would not fit."""
    s = data.Sampler("25gaussians", 0, torch.float64)
    pts = s.points
    assert pts.shape == (100_000, 2)
    axis = torch.arange(-2, 3, dtype=torch.float64) * 2
    centers = torch.cartesian_prod(axis, axis) / 2.828
    dist, idx = _nearest(pts, centers)
    assert torch.bincount(idx, minlength=25).tolist() == [4000] * 25
    assert (pts - centers[idx]).std(0) == pytest.approx(
        torch.full((2,), 0.05 / 2.828, dtype=torch.float64), rel=0.02)
    first = s(256)
    assert torch.equal(first, pts[:256])
    for _ in range(100_000 // 256 - 1):
        s(256)
    assert torch.equal(s(256), first)          # 390 batches, then the same order again
    other = data.Sampler("25gaussians", 1, torch.float64)
    assert not torch.equal(other.points, pts)   # the set is drawn from the run's seed


def test_swissroll_matches_scikit_learn():
    """Our swiss roll against ``sklearn.datasets.make_swiss_roll(noise=0.25)[:, [0, 2]] /
    7.5`` itself: means and covariances of 40,000 points each within sampling error."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    n = 40_000
    ref = torch.tensor(sklearn_datasets.make_swiss_roll(n, noise=0.25, random_state=0)[0][:, [0, 2]]) / 7.5
    s = data.Sampler("swissroll", 0, torch.float64)
    ours = torch.cat([s(4000) for _ in range(n // 4000)])
    se = ref.std(0) / math.sqrt(n)
    assert ((ours.mean(0) - ref.mean(0)).abs() < 5 * se).all()
    c1, c2 = torch.cov(ours.T), torch.cov(ref.T)
    assert (c1 - c2).abs().max() < 0.02 * c2.abs().max()
    # and its radial profile: |x| = t / 7.5 up to the noise, t uniform on [1.5 pi, 4.5 pi]
    r = torch.sort(ours.norm(dim=1)).values
    r_ref = torch.sort(ref.norm(dim=1)).values
    assert (r - r_ref).abs().max() < 0.05


def test_toy_networks_are_initialised_as_tflib():
    """3 ReLU layers of 512 ("he": std sqrt(2 / fan_in), uniform), a "glorot" output
    layer (std sqrt(2 / (fan_in + fan_out))), zero biases."""
    torch.manual_seed(0)
    net = protocols.toy_mlp(2, 1)
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in lins] == [(512, 2), (512, 512), (512, 512), (1, 512)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in net) == 3
    for lin in lins:
        fan_out, fan_in = lin.weight.shape
        std = math.sqrt(2 / fan_in) if lin is not lins[-1] else math.sqrt(2 / (fan_in + fan_out))
        w = lin.weight.detach().double()
        assert w.abs().max() <= std * math.sqrt(3) + 1e-7
        if w.numel() > 500:
            assert w.std() == pytest.approx(std, rel=0.05)
        assert torch.count_nonzero(lin.bias) == 0


def test_tf_rmsprop_is_tensorflow_s_update():
    """Two steps against TensorFlow 1's RMSProp written out: ms starts at 1,
    ms = 0.9 ms + 0.1 g^2, p -= lr g / sqrt(ms + 1e-10)."""
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = methods.TFRMSprop([p], lr=0.1)
    ms = torch.ones(3, dtype=torch.float64)
    expected = p.detach().clone()
    for g in ([0.3, -1.0, 0.0], [2.0, 0.5, -0.1]):
        g = torch.tensor(g, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        ms = 0.9 * ms + 0.1 * g * g
        expected = expected - 0.1 * g / torch.sqrt(ms + 1e-10)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)


def test_toy_methods_carry_the_script_s_settings():
    p = protocols.protocol("wgangp-toy")
    gp, clip = p.method("wgangp"), p.method("wgan")
    assert (gp.gp_weight, gp.n_critic, gp.lr, gp.betas, gp.optimizer) == (0.1, 5, 1e-4, (0.5, 0.9), "adam")
    assert (clip.clip, clip.n_critic, clip.lr, clip.optimizer) == (0.01, 5, 5e-5, "rmsprop-tf")
    assert set(p.batch.values()) == {256} and p.datasets == data.TOY
    torch.manual_seed(0)
    trainer = methods.Trainer(clip, *p.build(clip, "8gaussians"))
    assert isinstance(trainer.opt_d, methods.TFRMSprop) and isinstance(trainer.opt_g, methods.TFRMSprop)
    trainer.step([torch.randn(8, 2) for _ in range(5)])
    assert max(float(q.detach().abs().max()) for q in trainer.D.parameters()) <= 0.01   # biases too


@pytest.mark.parametrize("name", data.TOY)
def test_toy_metrics_on_true_and_collapsed_samples(name):
    target = data.target(name)
    true = target.sample(2500, torch.Generator().manual_seed(0), torch.float64)
    m = metrics.evaluate(name, true)
    k = target.segments if name == "swissroll" else len(target.centers)
    assert m["modes"] == k and m["hq"] > 98 and m["kl"] < 0.02 and m["modes10"] == k
    # the median distance in sigma: Rayleigh's median sqrt(2 ln 2) = 1.18 for the 2-D
    # Gaussians, the half-normal's 0.674 for the roll (noise across the curve)
    assert m["spread"] == pytest.approx(0.674 if name == "swissroll" else 1.177, rel=0.06)
    wide = true + 6 * target.sigma * torch.randn(true.shape, generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64)
    mw = metrics.evaluate(name, wide)
    if name != "swissroll":   # spread out 6 sigma: few within 3 sigma, all modes within 10
        assert mw["modes10"] == k and mw["hq"] < 30 and mw["spread"] > 5
    one = true[:1].repeat(2500, 1)
    m = metrics.evaluate(name, one)
    assert m["modes"] == 1 and m["kl"] == pytest.approx(math.log(k), rel=1e-9)
    if name == "swissroll":   # 10 sigma off the curve, along its normal
        t = 1.5 * math.pi * (1 + 2 * torch.rand(2500, generator=torch.Generator().manual_seed(2),
                                                dtype=torch.float64))
        tangent = torch.stack([t.cos() - t * t.sin(), t.sin() + t * t.cos()], 1)
        normal = torch.stack([-tangent[:, 1], tangent[:, 0]], 1)
        far = data.SwissRoll.curve(t) + 10 * target.sigma * normal / normal.norm(dim=1, keepdim=True)
    else:
        far = true + 10 * target.sigma
    assert metrics.evaluate(name, far)["hq"] < 5


def test_swissroll_segments_are_equal_shares_of_the_data():
    """Each of the 20 segments of t holds 1/20 of the real data (t is uniform)."""
    true = data.SwissRoll().sample(20_000, torch.Generator().manual_seed(1), torch.float64)
    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, metrics.CURVE_POINTS, dtype=torch.float64)
    _, nearest = torch.cdist(true, data.SwissRoll.curve(t)).min(1)
    seg = torch.bincount(nearest * 20 // metrics.CURVE_POINTS, minlength=20).double() / len(true)
    assert (seg - 0.05).abs().max() < 0.01


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Stopped after 3 steps and continued to 6 (checkpoints every 2): the same losses,
    metrics and parameters as 6 steps in one go."""
    ck = str(tmp_path / "run.ckpt")
    kw = dict(seed=2, batch=16, eval_every=2, keep_trainer=True, n_eval=200)
    runner.train_run("wgangp", "25gaussians", 3, checkpoint=ck, checkpoint_every=2, **kw)
    resumed = runner.train_run("wgangp", "25gaussians", 6, checkpoint=ck, checkpoint_every=2, **kw)
    whole = runner.train_run("wgangp", "25gaussians", 6, **kw)
    assert resumed["d_loss"] == whole["d_loss"] and resumed["g_loss"] == whole["g_loss"]
    assert resumed["curve"] == whole["curve"]
    for a, b in zip(resumed["trainer"].state_dict()["D"].values(), whole["trainer"].state_dict()["D"].values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="beyond the 4 steps"):
        runner.train_run("wgangp", "25gaussians", 4, checkpoint=ck, **kw)
    with pytest.raises(ValueError, match="of another run"):
        runner.train_run("wgan", "25gaussians", 8, checkpoint=ck, **kw)


def test_measuring_a_run_does_not_change_it():
    """Metrics every step or never: the same training (G's buffers are restored after
    sampling; the metric draws use their own seed)."""
    a = runner.train_run("sngan", "ring8", 4, seed=0, batch=8, eval_every=1)
    b = runner.train_run("sngan", "ring8", 4, seed=0, batch=8)
    assert a["d_loss"] == b["d_loss"] and a["g_loss"] == b["g_loss"]


def test_suite_resume_reuses_finished_runs(tmp_path, capsys):
    from lipkernels.cli import main
    args = ["train", "--protocol", "wgangp-toy", "--suite", "--steps", "2", "--out", str(tmp_path),
            "--no-plot"]
    assert main(args) == 0
    stem = [n for n in os.listdir(tmp_path) if n.endswith(".json")][0]
    first = json.load(open(tmp_path / stem))
    assert {(r["method"], r["data"]) for r in first["runs"]} == {
        (m, d) for m in ("wgangp", "wgan") for d in data.TOY}
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier (2 steps), reused") == 6
    again = json.load(open(tmp_path / stem))
    assert [r["d_loss"] for r in again["runs"]] == [r["d_loss"] for r in first["runs"]]
    # reused runs are measured again from their checkpoints' samples, by the same code here
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in first["runs"]]
    assert all("modes10" in r["final"] for r in again["runs"])
    assert "| wgangp |" in open(tmp_path / stem.replace(".json", ".md")).read()
    # the README block of this protocol, between its own markers
    begin, end = runner.readme_markers("wgangp-toy")
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{runner.README_BEGIN}\nsmall\n{runner.README_END}\n{begin}\nold\n{end}\nb\n")
    runner.update_readme(str(tmp_path / stem), str(readme))
    text = readme.read_text()
    assert "small" in text and "old" not in text and "| wgan |" in text and "**swissroll**" in text


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "wgangp-toy", "--data", "ring8"], "--data 'ring8' is not part of the wgangp-toy protocol"),
    (["--protocol", "wgangp-toy", "--method", "gngan"], "--method 'gngan' is not part of the wgangp-toy"),
    (["--data", "8gaussians"], "it is in --protocol wgangp-toy"),
    (["--protocol", "cifar"], "--protocol must be one of small, wgangp-toy"),
    (["--method", "sagan", "--data", "ring8"], "--method sagan runs on digits only"),
    (["--long"], "the small protocol has no --long budget"),
    (["--figure", "1a"], "use --protocol wgangp-toy"),
    (["--protocol", "wgangp-toy", "--data", "8gaussians,ring8"], "--data 'ring8' is not part of the wgangp-toy"),
    (["--data", "ring8,"], "--data must be a name or a comma-separated list of names"),
    (["--method", "sagan,sagan-noattn", "--data", "ring8,grid25"], "--method sagan runs on digits only"),
])
def test_train_errors_name_the_bad_combination(argv, message, tmp_path):
    from lipkernels.cli import main
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        main(["train", "--quick", "--out", str(tmp_path)] + argv)


def test_data_and_method_lists_plan_their_pairs():
    """``--data`` / ``--method`` take comma-separated lists (as ``--seed``): the tasks are
    the pairs that belong together, each name once, in the order given."""
    import argparse

    def ns(**kw):
        base = dict(protocol=None, suite=False, data=None, method=None, seed=None, quick=False,
                    long=False, steps=None, dtype="float32", backend="auto")
        return argparse.Namespace(**dict(base, **kw))
    args = ns(protocol="wgangp-toy", method="wgan,wgangp,wgan", data="25gaussians,8gaussians", steps=7)
    p, tasks, seeds, steps = runner.plan(args)
    assert [(t["method"], t["data"]) for t in tasks] == [
        ("wgan", "25gaussians"), ("wgangp", "25gaussians"), ("wgan", "8gaussians"), ("wgangp", "8gaussians")]
    assert steps == {"25gaussians": 7, "8gaussians": 7} and seeds == [0]
    args = ns(method="sagan,gngan", data="ring8,digits")
    pairs = [(t["method"], t["data"]) for t in runner.plan(args)[1]]
    assert pairs == [("gngan", "ring8"), ("sagan", "digits"), ("gngan", "digits")]


def test_value_surface_small():
    r = figures.value_surface("wgangp", "8gaussians", steps=20, batch=32)
    v = torch.tensor(r["values"])
    assert v.shape == (figures.GRID_POINTS, figures.GRID_POINTS) and torch.isfinite(v).all()
    assert r["estimate_every_10_steps"] and math.isfinite(r["grad_norm"]["real"]["mean"])


def test_deep_clipped_critic_gradients_vanish_and_gp_s_do_not():
    """Figure 1(b) at a small size (width 64, 2 generator iterations): after clipping at
    c = 0.001 the activation gradients fall by orders of magnitude per layer towards
    the input; with the penalty they stay within a factor 10 over the 13 layers."""
    runs = {r["label"]: r["history"][-1]["norms"]
            for r in figures.gradient_norms(iters=2, width=64, batch=32, every=2)}
    clipped, gp = runs["Weight clipping (c = 0.001)"], runs["Gradient penalty"]
    assert len(clipped) == figures.DEEP_LAYERS + 1
    assert clipped[0] < 1e-12 * clipped[-1]
    assert all(a < b for a, b in zip(clipped[:-1], clipped[1:]))
    assert max(gp) < 10 * min(gp) and min(gp) > 0
