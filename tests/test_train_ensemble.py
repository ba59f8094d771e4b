"""lipkernels.train.ensemble: the seeds of one method trained as one stacked ensemble
(torch.func.stack_module_state + vmap + grad / functional_call) give, member by member,
the unbatched runs of runner.train_run: the same random draws, per-step losses and
final weights."""
from __future__ import annotations

import functools

import pytest
import torch

from lipkernels.train import methods, protocols, runner
from lipkernels.train.ensemble import EnsembleTrainer, seeded_member

from conftest import MAIN_RUN

pytestmark = [pytest.mark.skipif(not MAIN_RUN, reason="the default backend's ensemble: the "
                                                      "main run of the suite tests it"),
              pytest.mark.usefixtures("single_thread")]

#: Every method of the small protocol that runs on the 2-D data (sagan is digits only).
SUPPORTED = ["nsgan", "wgan", "wgangp", "sngan", "gngan", "gngan-fo", "grand", "granc"]
SEEDS = (0, 1, 2)
BATCH = 32
STEPS = 20
#: float64: the ensemble's numbers differ from the unbatched run's by rounding only (the
#: input gradient by torch.func.vjp instead of a double backward, batched matmuls);
#: measured at most ~1e-12 after 20 steps, so 1e-9 leaves room and still catches any
#: wrong draw, step or update (those differ by >= 1e-6).
TOL64 = 1e-9
#: float32, a few steps: rounding of ~1e-7 relative per op (float32's epsilon 1.2e-7) on
#: values of order 1, compounded over 5 steps; measured at most ~4e-7. 1e-5 is 25 times
#: that and still 20 times below one optimizer step (Adam moves a weight by ~lr = 1e-4
#: to 2e-4 per step, torch's RMSprop by 10 lr = 5e-4 in its first), so a missed,
#: repeated or differently drawn step fails.
#: One exception, for the final weights: Adam turns rounding noise in a gradient that is
#: ~0 into steps of up to lr in either direction (a step is about lr g / (|g| + eps), with
#: eps = 1e-8: a g of +-1e-9 moves the weight by +-0.1 lr), so a single element can differ
#: by a fraction of 2 lr per step (measured 2.2e-5 in one element of SNGAN's D, torch 2.11, reference
#: backend, from the second step on; docs/training.md says the same of any two float32
#: implementations). The final weights are therefore held to their *mean* absolute
#: difference within TOL32 (a missed or repeated step moves every weight by ~lr: 1e-4)
#: and each element within 2 lr per step.
TOL32 = 1e-5
STEPS32 = 5


@functools.lru_cache(maxsize=None)
def unbatched(method: str, seed: int, steps: int, dtype: torch.dtype, data: str = "ring8",
              protocol=None, batch: int = BATCH) -> dict:
    return runner.train_run(method, data, steps, seed=seed, batch=batch, dtype=dtype,
                            keep_trainer=True, n_eval=64, protocol=protocol)


def worst(actual, expected) -> float:
    """Largest ``|a - e| / max(1, |e|)`` over two lists of floats or two tensors."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return float(((a - e).abs() / e.abs().clamp_min(1.0)).max()) if a.numel() else 0.0


def check_members(ens: EnsembleTrainer, logs, steps: int, tol: float, elementwise: bool = True,
                  **run_kwargs) -> float:
    """Every member's per-step losses and final G and D state (parameters and buffers:
    spectral norm's u, v too) against the unbatched run of its seed; the worst error.
    ``elementwise=False`` (float32): the final tensors by their mean absolute
    difference, each element within 2 lr per step (TOL32's comment)."""
    element_tol = tol if elementwise else 2 * max(ens.m.lr, ens.m.lr_g or 0) * steps
    err = 0.0
    for k, seed in enumerate(ens.seeds):
        run = unbatched(ens.m.name, seed, steps, ens.dtype, **run_kwargs)
        where = f"{ens.m.name} seed {seed}"
        for key in ("d_loss", "g_loss"):
            e = worst(logs[k][key], run[key])
            assert e <= tol, f"{where}: {key} per step differs by {e:.3g} (tolerance {tol:g})"
            err = max(err, e)
        G, D = ens.member(k)
        for name, mine, theirs in (("G", G, run["trainer"].G), ("D", D, run["trainer"].D)):
            a, b = mine.state_dict(), theirs.state_dict()
            assert a.keys() == b.keys(), f"{where}: {name} has keys {sorted(a)} != {sorted(b)}"
            for key in a:
                assert a[key].dtype == b[key].dtype, f"{where}: {name}.{key} dtype"
                e = worst(a[key], b[key])
                assert e <= element_tol, (f"{where}: final {name}.{key} differs by {e:.3g} "
                                          f"(tolerance {element_tol:g})")
                if not elementwise and a[key].is_floating_point():
                    mean = float((a[key].double() - b[key].double()).abs().mean())
                    assert mean <= tol, (f"{where}: final {name}.{key} differs by {mean:.3g} "
                                         f"on average (tolerance {tol:g})")
                    e = mean
                err = max(err, e)
    return err


# ------------------------------------------------------------------ the building blocks

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_member_generator_reproduces_the_global_stream(dtype):
    """After the run's seeding and build, a generator with the global RNG's state gives
    the draws train_run takes from the global RNG (z by randn, alpha by rand)."""
    p, m = protocols.find("wgangp", "ring8")
    for seed in SEEDS:
        trainer, gen = seeded_member(p, m, "ring8", seed, dtype)
        assert torch.equal(gen.get_state(), torch.get_rng_state())
        for _ in range(4):
            z = trainer.z(BATCH)                      # the Trainer's own draw (global RNG)
            assert torch.equal(z, torch.randn(BATCH, trainer.z_dim, dtype=dtype, generator=gen))
            alpha = torch.rand(BATCH, dtype=dtype)
            assert torch.equal(alpha, torch.rand(BATCH, dtype=dtype, generator=gen))
        # The same networks as train_run builds for this seed.
        torch.manual_seed(seed)
        G, D, _ = p.build(m, "ring8")
        for mine, ref in ((trainer.G, G), (trainer.D, D)):
            for a, b in zip(mine.state_dict().values(), ref.to(dtype).state_dict().values()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "rmsprop-tf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_optimizer_over_stacked_tensors_is_k_optimizers(optimizer, dtype):
    """torch's Adam and RMSprop with their default (foreach / fused) settings, and
    TFRMSprop, over stacked tensors: bit for bit K optimizers over the slices (one step
    counter per tensor, elementwise updates), gradients of every magnitude included."""
    m = {"adam": methods.METHODS["wgangp"], "rmsprop": methods.METHODS["wgan"],
         "rmsprop-tf": protocols.TOY_METHODS["wgan"]}[optimizer]
    assert m.optimizer == optimizer
    gen = torch.Generator().manual_seed(0)
    shapes, K = [(128, 2), (128,), (128, 128), (1, 128), (1,)], 3
    stacked = [torch.randn((K,) + s, generator=gen, dtype=dtype) for s in shapes]
    slices = [[t[k].clone() for t in stacked] for k in range(K)]
    opt = methods.make_optimizer(m, stacked)
    opts = [methods.make_optimizer(m, ts) for ts in slices]
    for _ in range(6):
        grads = [torch.randn(t.shape, generator=gen, dtype=dtype)
                 * 10.0 ** torch.randint(-12, 3, t.shape, generator=gen) for t in stacked]
        for t, g in zip(stacked, grads):
            t.grad = g
        opt.step()
        for k in range(K):
            for t, g in zip(slices[k], grads):
                t.grad = g[k].clone()
            opts[k].step()
    for k in range(K):
        for i, t in enumerate(stacked):
            assert torch.equal(t[k], slices[k][i]), f"tensor {i} member {k}"


# ------------------------------------------------------------------ members == runs

@pytest.mark.parametrize("method", SUPPORTED)
def test_each_member_is_the_unbatched_run_float64(method):
    ens = EnsembleTrainer(method, "ring8", SEEDS, BATCH, torch.float64)
    logs = ens.run(STEPS)
    assert len(logs) == len(SEEDS) and all(len(x["g_loss"]) == STEPS for x in logs)
    check_members(ens, logs, STEPS, TOL64)


@pytest.mark.parametrize("method", ["nsgan", "wgan", "wgangp", "sngan", "gngan", "grand"])
def test_each_member_is_the_unbatched_run_float64_autograd_backward(method):
    """grad='autograd' (vmap forward, one ordinary backward of the summed losses)."""
    ens = EnsembleTrainer(method, "ring8", SEEDS, BATCH, torch.float64, grad="autograd")
    check_members(ens, ens.run(STEPS), STEPS, TOL64)


@pytest.mark.parametrize("method", SUPPORTED)
def test_each_member_is_the_unbatched_run_float32(method):
    ens = EnsembleTrainer(method, "ring8", SEEDS, BATCH, torch.float32)
    check_members(ens, ens.run(STEPS32), STEPS32, TOL32, elementwise=False)


def test_other_protocol_and_data():
    """The WGAN-GP toy protocol's clipping baseline (TensorFlow's RMSprop, clipping,
    512-wide networks) on its 8gaussians, as train_run gives it."""
    ens = EnsembleTrainer("wgan", "8gaussians", (0, 1), 16, torch.float64, protocol="wgangp-toy")
    check_members(ens, ens.run(2), 2, TOL64, data="8gaussians", protocol="wgangp-toy", batch=16)


def test_step_returns_each_members_losses_and_member_gives_plain_modules():
    ens = EnsembleTrainer("sngan", "ring8", SEEDS, BATCH, torch.float64)
    out = ens.step()
    assert len(out) == len(SEEDS) and all(len(x) == 2 and isinstance(x[0], float) for x in out)
    G, D = ens.member(1)
    assert isinstance(G, torch.nn.Module) and isinstance(D, torch.nn.Module)
    assert not hasattr(D, "_lipkernels_sn_group")          # no Trainer's SN group hooked on
    assert next(D.parameters()).dtype == torch.float64
    # Copies: training on does not change them.
    before = {k: v.clone() for k, v in D.state_dict().items()}
    ens.step()
    assert all(torch.equal(v, before[k]) for k, v in D.state_dict().items())
    with pytest.raises(IndexError):
        ens.member(len(SEEDS))


# ------------------------------------------------------------------ unsupported

@pytest.mark.parametrize("method", ["nsgan", "sagan"])
def test_batchnorm_networks_are_refused_with_the_reason(method):
    with pytest.raises(NotImplementedError, match="BatchNorm"):
        EnsembleTrainer(method, "digits", SEEDS, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="grad must be"):
        EnsembleTrainer("nsgan", "ring8", SEEDS, BATCH, grad="jvp")
    with pytest.raises(ValueError, match="seeds"):
        EnsembleTrainer("nsgan", "ring8", (), BATCH)
    with pytest.raises(ValueError):
        EnsembleTrainer("sagan", "ring8", SEEDS, BATCH)    # digits only, as train_run says
