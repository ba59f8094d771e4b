"""The compiled backends called from several Python threads at once (torch releases the
GIL inside ops, so the kernels and the CPU output cache run concurrently): every thread
gets the results of a single-threaded run, bit for bit. CI also runs this file under
ThreadSanitizer (make sanitize-tsan: the CPU kernels, the output cache and the
emulated CUDA kernels built with -fsanitize=thread)."""
from __future__ import annotations

import threading

import pytest
import torch

import lipkernels
from lipkernels import ops

from conftest import COMPILED_BACKENDS, backend_context

THREADS = 4
ROUNDS = 3


def _work(seed: int):
    """A little of everything: per-sample ops forward and backward (outputs large enough
    for the output cache), spectral norm forward and backward, clipping."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(16, 3, 64, 65, generator=gen).requires_grad_(True)
    f = torch.randn(16, generator=gen).requires_grad_(True)
    out = [ops.gn_normalize(f, g), ops.gran_normalize(f, g, 1e-3), ops.gradient_penalty(g),
           ops.r1_penalty(g), ops.sample_norm(g)]
    grads = torch.autograd.grad(sum(o.sum() for o in out), [f, g])
    ws = [torch.randn(64, 27, generator=gen).requires_grad_(True), torch.randn(32, 300, generator=gen)]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0], generator=gen), dim=0) for w in ws]
    vs = [torch.nn.functional.normalize(torch.randn(w.shape[1], generator=gen), dim=0) for w in ws]
    w_sn = ops.spectral_normalize(ws, us, vs, 2)
    dw = torch.autograd.grad(w_sn[0].square().sum(), ws[0])
    clipped = [torch.randn(1000, generator=gen), torch.randn(7, 9, generator=gen)]
    ops.clip_(clipped, 0.5)
    return [o.detach() for o in out] + list(grads) + [w.detach() for w in w_sn] + list(dw) + us + vs + clipped


@pytest.mark.tsan_subset
@pytest.mark.parametrize("name", COMPILED_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no compiled backend available"))])
def test_threads_get_the_single_threaded_results(name):
    with backend_context(name):
        expected = {seed: _work(seed) for seed in range(THREADS)}
        results, errors = {}, []

        def run(seed):
            try:
                with lipkernels.use_backend(name):
                    for r in range(ROUNDS):
                        results[(seed, r)] = _work(seed)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for (seed, r), got in results.items():
        for i, (a, b) in enumerate(zip(got, expected[seed])):
            assert torch.equal(a, b), f"{name}: thread {seed}, round {r}, output {i} differs"
    lipkernels.empty_cache()
