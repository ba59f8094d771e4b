"""``lipkernels train`` (lipkernels/train): the data, the metrics against independent
computations, the kernels not changing training (every method, the reference backend
against the compiled ones from the same seed), and the ``--suite --quick`` command."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import lipkernels
from lipkernels.train import data, methods, metrics, protocols, runner

from conftest import COMPILED_BACKENDS, INTERPRETING, MAIN_RUN

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("sklearn", reason="lipkernels train's digits need scikit-learn (make install)")

#: The methods that run on every data set (sagan needs images: digits only).
METHODS = [m for m in methods.METHOD_NAMES if methods.METHODS[m].data is None]
ALL_METHODS = methods.METHOD_NAMES
# The compiled CPU kernels, unless unavailable or LIPKERNELS_TEST_BACKENDS leaves them out
# (the emulated-CUDA test run).
HAS_CPU = "cpu" in COMPILED_BACKENDS
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not tested here: "
                               + str(lipkernels.backend_status().get("cpu"))
                               + f"; LIPKERNELS_TEST_BACKENDS={os.environ.get('LIPKERNELS_TEST_BACKENDS')}")




# ------------------------------------------------------------------ data

def test_mixtures_follow_the_pacgan_protocol():
    ring, grid = data.mixture("ring8"), data.mixture("grid25")
    assert ring.sigma == 0.01 and grid.sigma == 0.05
    assert torch.allclose(ring.centers.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert sorted(set(grid.centers.flatten().tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert len(grid.centers) == 25
    x = grid.sample(20000, torch.Generator().manual_seed(0), torch.float64)
    resid = x - grid.centers[torch.cdist(x, grid.centers).argmin(1)]
    assert abs(float(resid.std()) - 0.05) < 0.002
    with pytest.raises(ValueError, match="ring8"):
        data.mixture("ring9")


@pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of the suite tests it")
def test_digits_are_the_bundled_data_upsampled():
    x, y = data.digits()
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert sorted(y.unique().tolist()) == list(range(10))
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images[:5], dtype=torch.float32)
    # Bilinear 2x (half-pixel centers): out[2i] = 3/4 x[i] + 1/4 x[i-1], out[2i+1] =
    # 3/4 x[i] + 1/4 x[i+1], indices clamped at the border; separable: U X U^T.
    u = torch.zeros(16, 8)
    for i in range(8):
        u[2 * i, i] += 0.75
        u[2 * i, max(i - 1, 0)] += 0.25
        u[2 * i + 1, i] += 0.75
        u[2 * i + 1, min(i + 1, 7)] += 0.25
    expected = u @ raw @ u.T / 16 * 2 - 1
    assert torch.allclose(x[:5, 0], expected, atol=1e-5)


# ------------------------------------------------------------------ metrics

@pytest.mark.parametrize("name", data.MIXTURES)
def test_mixture_metrics_on_true_and_collapsed_samples(name):
    mix = data.mixture(name)
    k = len(mix.centers)
    true = mix.sample(2500, torch.Generator().manual_seed(1), torch.float64)
    m = metrics.mixture_metrics(true, mix)
    # P(|N(0, s^2 I_2)| <= 3 s) = 1 - exp(-9/2) = 98.89%; binomial sd over 2500: 0.2%.
    assert m["modes"] == m["modes1"] == k
    assert abs(m["hq"] - 100 * (1 - math.exp(-4.5))) < 1.0
    # KL of a multinomial histogram from uniform: about (K - 1) / (2 N).
    assert m["kl"] < 5 * (k - 1) / (2 * 2500)
    collapsed = mix.centers[3].expand(2500, 2).clone()
    m = metrics.mixture_metrics(collapsed, mix)
    assert m == {"modes": 1, "modes1": 1, "hq": 100.0,
                 "kl": pytest.approx(math.log(k), abs=1e-12)}
    far = torch.full((2500, 2), 100.0, dtype=torch.float64)
    assert metrics.mixture_metrics(far, mix)["hq"] == 0.0


@pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of the suite tests it")
def test_frechet_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    mu1, c1, mu2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy_linalg.sqrtm(c1 @ c2).real)
    assert metrics.frechet(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)


# ------------------------------------------------------------------ the kernels do not change training

def _state(run):
    t = run["trainer"]
    return ([p.detach() for p in t.G.parameters()] + [p.detach() for p in t.D.parameters()]
            + [b.detach() for b in t.D.buffers()])


def _assert_same_run(a, b, tol, what):
    for i, (x, y) in enumerate(zip(_state(a), _state(b))):
        err = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
        assert err <= tol, f"{what}: parameter/buffer {i} differs by {err:.2e} (relative to its max)"
    for key in ("d_loss", "g_loss"):
        for step, (x, y) in enumerate(zip(a[key], b[key])):
            assert abs(x - y) <= tol * max(abs(y), 1.0), f"{what}: {key} at step {step}: {x!r} vs {y!r}"


def _pair(method, data_name, steps, backend, dtype, batch):
    runs = [runner.train_run(method, data_name, steps, seed=3, backend=b, dtype=dtype, batch=batch,
                             keep_trainer=True) for b in ("reference", backend)]
    return runs


@needs_cpu
@pytest.mark.parametrize("method", METHODS)
def test_cpu_backend_trains_as_the_reference_float64(method):
    """50 generator steps (and their n_critic D steps) on ring8: same parameters, buffers
    (spectral-norm u, v) and losses to 1e-9, and the same metrics."""
    ref, cpu = _pair(method, "ring8", 50, "cpu", torch.float64, 32)
    _assert_same_run(cpu, ref, 1e-9, f"{method} ring8 float64")
    assert cpu["final"]["modes"] == ref["final"]["modes"] and cpu["final"]["hq"] == ref["final"]["hq"]
    assert cpu["final"]["kl"] == pytest.approx(ref["final"]["kl"], abs=1e-9)


@needs_cpu
@pytest.mark.parametrize("method", METHODS)
def test_cpu_backend_trains_as_the_reference_float32(method):
    """float32: 8 steps to 1e-4. Longer float32 runs drift apart (README: Training):
    rounding differences of 1e-7 grow through the GAN dynamics (GraN on ring8 passes
    1e-4 after about 10 steps), while float64 stays within 1e-12 over 50 steps."""
    ref, cpu = _pair(method, "ring8", 8, "cpu", torch.float32, 32)
    _assert_same_run(cpu, ref, 1e-4, f"{method} ring8 float32")


@needs_cpu
def test_cpu_backend_trains_as_the_reference_digits_float64():
    """The convolutional networks (SNConv2d discriminator, BatchNorm generator): 2 steps
    of every method on digits, float64, to 1e-9."""
    evaluator = metrics.digits_evaluator(1)
    for method in ALL_METHODS:
        runs = [runner.train_run(method, "digits", 2, seed=0, backend=b, dtype=torch.float64,
                                 batch=8, keep_trainer=True, evaluator=evaluator, n_eval=64)
                for b in ("reference", "cpu")]
        _assert_same_run(runs[1], runs[0], 1e-9, f"{method} digits float64")
        assert runs[1]["final"]["fdd"] == pytest.approx(runs[0]["final"]["fdd"], rel=1e-6)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRETING and not torch.cuda.is_available(),
                    reason="the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 "
                           "(the test command's triton run)")
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("nsgan", "wgan")])
def test_triton_backend_trains_as_the_reference(method):
    """Under the interpreter: 3 steps on ring8, float64, to 1e-9 (nsgan and wgan use no
    normalization op but clip_, which the triton backend runs through torch._foreach)."""
    if "triton" not in lipkernels.available_backends():
        pytest.skip("triton backend unavailable: " + lipkernels.backend_status()["triton"][1])
    ref, tri = _pair(method, "ring8", 3, "triton", torch.float64, 16)
    _assert_same_run(tri, ref, 1e-9, f"{method} ring8 triton")


@pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of the suite tests it")
def test_first_order_generator_step_is_exact_for_a_leaky_relu_discriminator():
    """GN-GAN's first-order G step (docs/math.md section 4) against the exact double
    backprop: the discriminator is piecewise linear, so 20 steps agree to 1e-9."""
    exact = runner.train_run("gngan", "ring8", 20, seed=1, backend="reference", dtype=torch.float64,
                             batch=32, keep_trainer=True)
    fast = runner.train_run("gngan-fo", "ring8", 20, seed=1, backend="reference", dtype=torch.float64,
                            batch=32, keep_trainer=True)
    _assert_same_run(fast, exact, 1e-9, "gngan-fo vs gngan")


# ------------------------------------------------------------------ the command

@pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of the suite tests it")
def test_train_quick_suite_writes_results(tmp_path):
    from lipkernels.cli import main
    assert main(["train", "--suite", "--quick", "--out", str(tmp_path)]) == 0
    names = sorted(os.listdir(tmp_path))
    stem = [n for n in names if n.endswith(".json")][0][:-5]
    assert {stem + ext for ext in (".json", ".md", "-samples.png", "-curves.png")} <= set(names)
    with open(tmp_path / (stem + ".json")) as f:
        res = json.load(f)
    small = protocols.protocol("small")
    assert len(res["runs"]) == len(small.pairs(ALL_METHODS, small.datasets))
    assert len(res["runs"]) == len(METHODS) * 3 + 2   # sagan, sagan-noattn: digits only
    for key in ("git", "torch", "backend_resolved", "args", "cpu"):
        assert key in res["meta"]
    assert res["meta"]["args"]["quick"] is True
    for r in res["runs"]:
        assert r["finite"] and r["seconds_per_step"] > 0
        assert r["loss_window"] == 1 and len(r["g_loss"]) == runner.QUICK_STEPS
    assert set(res["summary"]) == set(small.datasets)
    md = (tmp_path / (stem + ".md")).read_text()
    for m in ALL_METHODS:
        assert f"| {m} |" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{runner.README_BEGIN}\nold\n{runner.README_END}\nb\n")
    runner.update_readme(str(tmp_path / (stem + ".json")), str(readme))
    text = readme.read_text()
    assert text.startswith("a\n") and text.endswith("b\n") and "old" not in text
    assert "| gngan-fo |" in text and f"({stem}-samples.png)" in text


@pytest.mark.skipif(not MAIN_RUN, reason="backend-independent: the main run of the suite tests it")
def test_train_rejects_bad_arguments(tmp_path):
    from lipkernels.cli import main
    with pytest.raises(SystemExit, match="--method 'began' is not part of the small protocol"):
        main(["train", "--method", "began", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["train", "--data", "cifar10", "--quick", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        runner.train_run("nsgan", "ring8", 0)
