"""The benchmark suite's machinery (it is run for real by `lipkernels bench`; the test
command also runs its quick preset): cases build and run, results carry provenance,
files and the README table are written."""
from __future__ import annotations

import json
import os

import torch

from lipkernels import benchmark
from lipkernels.benchmark import cases, report, timing


def test_interleaved_timing_and_ratio():
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               torch.device("cpu"), rounds=4, warmup=1)
    assert calls == ["a", "b"] * 5          # alternation, warm-up included
    assert len(times["a"]) == len(times["b"]) == 4
    assert timing.median_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0


def test_launch_counts_see_the_fused_op():
    g = torch.randn(8, 100)
    from lipkernels import ops
    fused = timing.count_launches(lambda: ops.sample_norm(g), torch.device("cpu"))
    many = timing.count_launches(lambda: (g * g).sum(1).sqrt().mul(2).add(1), torch.device("cpu"))
    assert fused >= 1 and many >= 5 and fused < many


def test_quick_preset_runs_every_kind_of_case(tmp_path):
    results = benchmark.run("quick", only="r1", log=lambda *a: None)
    rows = results["results"]
    assert rows and all(r["case"].startswith("r1") for r in rows)
    baseline = [r for r in rows if r["baseline"]]
    assert baseline and all(abs(r["speedup"] - 1.0) < 1e-9 for r in baseline)
    for r in rows:
        assert r["median_ms"] > 0 and r["launches"] >= 1 and r["bandwidth_fraction"] > 0
    meta = results["provenance"]
    for key in ("device", "torch", "lipkernels", "git", "torch_threads", "date", "copy_bandwidth_GBps"):
        assert meta[key] not in (None, "")
    # every kind of case is defined by the quick preset
    kinds = {c.kind for c in cases.all_cases(cases.preset("quick", torch.device("cpu")), torch.device("cpu"))}
    assert kinds == {"spectral norm", "per-sample", "train step"}

    path = report.save(results, str(tmp_path), plot=True)
    with open(path) as f:
        assert json.load(f)["provenance"]["preset"] == "quick"
    assert os.path.exists(path[:-5] + ".png")
    text = report.table(results)
    assert "r1 fwd" in text and "speedup" in text


def test_readme_block_is_replaced(tmp_path, monkeypatch):
    results = {"provenance": {"date": "2026-01-01T00:00:00", "preset": "default", "device": "Test CPU",
                              "device_type": "cpu", "cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2,
                              "torch": "x", "torch_cuda": None, "triton": None, "lipkernels": "y",
                              "git": "abc", "copy_bandwidth_GBps": 10.0},
               "results": [{"kind": "per-sample", "case": "gn fwd", "shape": "(2, 3)", "impl": "cpu",
                            "baseline": False, "median_ms": 0.5, "speedup": 3.0, "bytes": 24,
                            "bandwidth_fraction": 0.5, "launches": 1}]}
    results_dir = tmp_path / "results"
    path = report.save(results, str(results_dir), plot=False)
    monkeypatch.setattr(report, "RESULTS", str(results_dir))
    monkeypatch.setattr(report, "REPO", str(tmp_path))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:cpu -->\nold\n<!-- /bench:cpu -->\nend\n")
    report.update_readme(str(readme))
    text = readme.read_text()
    assert "old" not in text and "| per-sample | gn fwd | (2, 3) | cpu | 0.500 ms | 3.00x | - | - | 50% | 1 |" in text
    assert "Test CPU" in text and text.endswith("end\n") and os.path.basename(path) in text
