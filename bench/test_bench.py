"""Every case of the benchmark suite as pytest-benchmark tests, grouped by case (see
lipkernels/benchmark/cases.py for what each measures)."""
from __future__ import annotations

import os

import pytest
import torch

from lipkernels.benchmark import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = cases.preset(os.environ.get("LIPKERNELS_BENCH_PRESET", "quick"), DEVICE)
PARAMS = [pytest.param(case, impl, id=f"{case.name} {case.shape} [{impl}]")
          for case in cases.all_cases(PRESET, DEVICE) for impl in case.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_bench(benchmark, case, impl):
    fn = case.impls[impl]()
    benchmark.group = f"{case.name} {case.shape}"
    benchmark.extra_info.update(impl=impl, baseline=impl == case.baseline, bytes=case.bytes)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def call():
        fn()
        sync()
    benchmark.pedantic(call, rounds=PRESET.min_rounds, warmup_rounds=PRESET.warmup, iterations=1)
