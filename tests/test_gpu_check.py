"""make gpu-check's machinery without a GPU: the Nsight Compute CSV parser and the
comparison with the GPU cost model (on a CSV laid out as ncu writes it), ncu's kernel
filter, the profiler workload's rehearsal on the cpu backend, and tools/gpu_check.py's
time boxes and summary. The real run is `make gpu-check` on a GPU machine."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time

import pytest

from lipkernels.benchmark import ncu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _csv(kernels):
    """kernels: [(name, {metric: (unit, value)})] -> ncu --csv --page details text."""
    lines = ["==PROF== Connected to process 1234", HEADER]
    for i, (name, metrics) in enumerate(kernels):
        for metric, (unit, value) in metrics.items():
            lines.append(f'"{i}","1234","python","h","{name}","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0",'
                         f'"Command line profiler metrics","{metric}","{unit}","{value}"')
    return "\n".join(lines) + "\n"


def _metrics(read, write, sectors=4096, requests=1024, achieved=40.0, theoretical=50.0, ns=5000):
    return {"dram__bytes_read.sum": ("byte", f"{read:,}"), "dram__bytes_write.sum": ("byte", f"{write:,}"),
            "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum": ("sector", f"{sectors:,}"),
            "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum": ("", f"{requests:,}"),
            "sm__warps_active.avg.pct_of_peak_sustained_active": ("%", f"{achieved}"),
            "sm__maximum_warps_per_active_cycle_pct": ("%", f"{theoretical}"),
            "gpu__time_duration.sum": ("nsecond", f"{ns:,}")}


def _model():
    k = lambda name, load, store: dict(name=name, dram_load_bytes=load, dram_store_bytes=store,  # noqa: E731
                                       dram_scratch_bytes=0, load_requests=1024, load_sectors=4096,
                                       load_bytes=load, store_bytes=store)
    rows = [dict(backend="cuda", op="sample_norm", shape="64x3x32x32", mode="fwd",
                 kernels=["sample_reduce_kernel<float, false>"],
                 per_kernel=[k("sample_reduce_kernel<float, false>", 786432, 512)]),
            dict(backend="cuda", op="spectral_normalize", shape="SNGAN CNN D (8 layers)", mode="fwd",
                 kernels=["sn_pass_kernel<float>", "cudaMemsetAsync", "sn_divide_kernel<float>"],
                 per_kernel=[k("sn_pass_kernel<float>", 100000, 1000), k("sn_divide_kernel<float>", 100000, 100000)]),
            dict(backend="cuda", op="sample_norm", shape="256x3x128x128", mode="fwd",   # not in the workload
                 kernels=["sample_reduce_kernel<float, false>"], per_kernel=[]),
            dict(backend="triton", op="sample_norm", shape="64x3x32x32", mode="fwd",
                 kernels=["_sumsq_kernel", "_finish_kernel"],
                 per_kernel=[k("_sumsq_kernel", 786432, 4096), k("_finish_kernel", 4096, 512)])]
    resources = {"cuda": {"sample_reduce_kernel<float, false>": dict(regs=32, smem=0, threads=256)}}
    return dict(path="model.json", date="d", rows=rows, resources=resources)


def test_base_name_strips_namespaces_templates_and_parameters():
    for name in ("void lipkernels::cuda::sample_reduce_kernel<float, false>(const float *, int)",
                 "sample_reduce_kernel<float, false>", "sample_reduce_kernel"):
        assert ncu.base_name(name) == "sample_reduce_kernel"
    assert ncu.base_name("_sumsq_kernel") == "_sumsq_kernel"


def test_kernel_filter_takes_ours_and_not_torchs():
    regex = ncu.kernel_regex(_model())
    assert regex.startswith("regex:")
    pattern = re.compile(regex[len("regex:"):])
    for ours in ("sample_reduce_kernel", "void lk::sn_pass_kernel<float>(Args)", "_finish_kernel"):
        assert pattern.search(ours), ours
    for theirs in ("reduce_kernel", "void at::native::vectorized_elementwise_kernel<4, FillFunctor>(int)",
                   "cudaMemsetAsync", "triton_poi_fused_finish_kernel_0"):
        assert not pattern.search(theirs), theirs


def test_csv_parser_reads_units_and_thousands_separators():
    text = _csv([("sample_reduce_kernel", _metrics(790528, 512)), ("vectorized_elementwise_kernel",
                                                                  {"dram__bytes_read.sum": ("Kbyte", "2.5")})])
    kernels = ncu.parse_csv(text)
    assert [k["id"] for k in kernels] == [0, 1]
    assert kernels[0]["metrics"]["dram__bytes_read.sum"] == 790528
    assert kernels[0]["metrics"]["gpu__time_duration.sum"] == pytest.approx(5e-6)
    assert kernels[1]["metrics"]["dram__bytes_read.sum"] == 2500
    assert ncu.parse_csv("==PROF== no kernels were profiled\n") == []


def test_compare_matches_launches_in_order_and_flags_a_model_off_by_2x():
    measured = ncu.parse_csv(_csv([
        ("sample_reduce_kernel", _metrics(790528, 512)),
        ("sn_pass_kernel", _metrics(100000, 1000)),
        ("sn_divide_kernel", _metrics(100000, 500000)),          # the model says 100 kB: 5x off
        ("_sumsq_kernel", _metrics(786432, 4096, sectors=9000)),
        ("_finish_kernel", _metrics(4096, 512)),
    ]))
    result = ncu.compare(measured, _model())
    rows = result["rows"]
    assert [(r["backend"], r["kernel"]) for r in rows] == [
        ("cuda", "sample_reduce_kernel<float, false>"), ("cuda", "sn_pass_kernel<float>"),
        ("cuda", "sn_divide_kernel<float>"), ("triton", "_sumsq_kernel"), ("triton", "_finish_kernel")]
    assert all(r["matched"] for r in rows) and result["problems"] == []
    first = rows[0]
    assert first["dram_read"]["ratio"] == pytest.approx(786432 / 790528)
    assert first["sectors_per_request"] == dict(predicted=4.0, measured=4.0, ratio=1.0)
    assert first["occupancy"]["model_theoretical"] == pytest.approx(100.0)   # 32 regs x 256 threads
    assert first["occupancy"]["achieved"] == 40.0
    assert rows[2]["off_by_more_than_2x"] == ["dram_write"]
    assert [r["off_by_more_than_2x"] for r in rows if r is not rows[2]] == [[]] * 4
    # the interpreter's requests are whole programs: no per-warp ratio for Triton
    assert rows[3]["sectors_per_request"]["predicted"] is None
    md = ncu.markdown(result)
    assert "**dram_write**" in md and md.count("\n| cuda |") == 3


def test_compare_reports_missing_and_mismatched_launches():
    measured = ncu.parse_csv(_csv([("sn_pass_kernel", _metrics(1, 1)), ("_sumsq_kernel", _metrics(1, 1))]))
    result = ncu.compare(measured, _model())
    assert any("cuda: 1 launches measured, the model has 3" in p for p in result["problems"])
    assert any("is sn_pass_kernel, the model has sample_reduce_kernel" in p for p in result["problems"])
    assert not ncu.compare([], _model())["rows"]


def test_profiler_workload_rehearses_on_the_cpu_backend(capsys):
    import lipkernels
    if "cpu" not in lipkernels.available_backends():
        pytest.skip("the cpu backend is not built")
    assert ncu.workload(dry_run=True) == ["cpu"]


def test_committed_model_has_the_workloads_launches():
    """The newest committed GPU cost model has per-kernel counts for every launch of the
    profiler workload (make gpu-check compares them with ncu's)."""
    model = ncu.load_model()
    for backend in ncu.BACKENDS:
        rows = ncu._workload_rows(model, backend)
        assert rows, f"no {backend} rows at {ncu.SHAPE} / {ncu.MODEL} in {model['path']}"
        for r in rows:
            assert [k["name"] for k in r["per_kernel"]] == [k for k in r["kernels"] if k != "cudaMemsetAsync"]


def test_a_step_is_killed_at_its_time_box_and_the_summary_says_so(tmp_path):
    gc = _gpu_check()
    check = gc.Check(str(tmp_path), sys.executable, str(tmp_path / "no-wheels"), budget_s=60)
    step = gc.Step("sleepy", 1.0, "a step that hangs")
    t0 = time.monotonic()
    rc = check.run(step, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"])
    assert rc is None and time.monotonic() - t0 < 10
    check.finish(step, rc)
    ok = gc.Step("quick", 10.0, "a step that passes")
    check.finish(ok, check.run(ok, [sys.executable, "-c", "print('1 passed in 0.01s')"]))
    bad = gc.Step("bad", 10.0, "a step that fails")
    check.finish(bad, check.run(bad, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]))
    check.skip(gc.Step("gpu-only", 10.0, ""), "no GPU")
    check.facts["wall_s"] = 1.0
    check.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: (s["status"], s["why"]) for s in summary["steps"]}
    assert status["sleepy"] == ("timed out", "killed at its limit of 1 s")
    assert status["quick"] == ("passed", "1 passed in 0.01s")
    assert status["bad"][0] == "failed" and "exit 3" in status["bad"][1] and "boom" in status["bad"][1]
    assert status["gpu-only"] == ("skipped", "no GPU")
    assert "| sleepy | timed out |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "sleepy.log").read_text().startswith("$ ")


def test_the_overall_deadline_shortens_every_step(tmp_path):
    gc = _gpu_check()
    check = gc.Check(str(tmp_path), sys.executable, "", budget_s=1.5)
    step = gc.Step("long", 100.0, "")
    t0 = time.monotonic()
    assert check.run(step, [sys.executable, "-c", "import time; time.sleep(30)"]) is None
    assert time.monotonic() - t0 < 10
