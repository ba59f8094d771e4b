"""Backend selection, fallback and errors; the command line; the CMake-built library;
the CPU output cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lipkernels
from lipkernels import backends, cli, ops

from conftest import COMPILED_BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_available_backends_lists_reference_and_what_works():
    names = lipkernels.available_backends()
    assert names[0] == "reference"
    status = lipkernels.backend_status()
    assert set(status) == set(backends.BACKENDS)
    for name, (ok, why) in status.items():
        assert ok == (name in names)
        assert ok or why, f"{name} is unavailable without a reason"


def test_cpu_backend_is_built_here():
    # The test command builds the extension; a missing build must not pass silently.
    assert "cpu" in lipkernels.available_backends(), lipkernels.backend_status()["cpu"][1]


def test_set_and_use_backend_restore():
    assert lipkernels.get_backend() == "auto"
    with lipkernels.use_backend("reference"):
        assert lipkernels.get_backend() == "reference"
        with lipkernels.use_backend("auto"):
            assert lipkernels.get_backend() == "auto"
        assert lipkernels.get_backend() == "reference"
    assert lipkernels.get_backend() == "auto"
    lipkernels.set_backend("reference")
    try:
        assert lipkernels.get_backend() == "reference"
    finally:
        lipkernels.set_backend("auto")


def test_use_backend_restores_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with lipkernels.use_backend("reference"):
            1 / 0
    assert lipkernels.get_backend() == "auto"


def test_auto_picks_the_first_available_for_the_device():
    expected = next(b for b in backends.AUTO_ORDER["cpu"] if lipkernels.backend_status()[b][0])
    assert backends.select(torch.device("cpu")) == expected
    # A device type without a compiled backend falls back to the reference.
    assert backends.select(torch.device("meta")) == "reference"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises_with_reason(name):
    ok, why = lipkernels.backend_status()[name]
    if ok:
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=f"'{name}' is not available: .+"):
        lipkernels.set_backend(name)
    with pytest.raises(RuntimeError, match="not available"):
        with lipkernels.use_backend(name):
            pass
    assert lipkernels.get_backend() == "auto"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        lipkernels.set_backend("fast")


def test_backend_on_the_wrong_device():
    with lipkernels.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="runs on cpu tensors"):
            ops.sample_norm(torch.randn(2, 3, device="meta"))


def test_reference_runs_anywhere():
    with lipkernels.use_backend("reference"):
        out = ops.sample_norm(torch.randn(2, 3, device="meta"))
    assert out.shape == (2,) and out.device.type == "meta"


def test_extension_missing_falls_back_to_reference():
    """Without the compiled library, auto uses the reference and 'cpu' says why."""
    code = (
        "import torch, lipkernels\n"
        "assert lipkernels.available_backends() == ['reference'], lipkernels.available_backends()\n"
        "g = torch.randn(3, 4); f = torch.randn(3)\n"
        "assert torch.allclose(lipkernels.ops.gn_normalize(f, g), lipkernels.ops.gn_normalize_reference(f, g))\n"
        "m = lipkernels.nn.SNLinear(4, 2); m(torch.randn(3, 4)).sum().backward()\n"
        "try:\n"
        "    lipkernels.set_backend('cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'LIPKERNELS_DISABLE_EXTENSION' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, LIPKERNELS_DISABLE_EXTENSION="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "reference", "cpu", "cuda", "triton", "unavailable"):
        assert word in out


def test_cli_check(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for backend in COMPILED_BACKENDS:
        assert backend in out
    assert "FAIL" not in out and "gn_normalize" in out
    rows = [line.split() for line in out.splitlines()]
    for backend in COMPILED_BACKENDS:   # every op in every dtype, the half types included
        for op in ("gn_normalize", "power_iteration", "clip_"):
            for dtype in ("float64", "float32", "float16", "bfloat16"):
                assert [op, backend, dtype] in [r[:3] for r in rows], (op, backend, dtype)


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "lipkernels")
    assert os.path.exists(exe), "the `lipkernels` entry point is not installed"
    result = subprocess.run([exe, "info"], capture_output=True, text=True, check=True)
    assert "backends" in result.stdout


def test_cmake_built_library():
    """The library built by CMakeLists.txt loads and passes `lipkernels check`."""
    lib = os.path.join(ROOT, "build", "cmake", "liblipkernels.so")
    if not os.path.exists(lib):
        if os.environ.get("LIPKERNELS_REQUIRE_CMAKE") == "1":
            pytest.fail(f"{lib} was not built (make cmake-build)")
        pytest.skip("CMake build not present (the test command builds it)")
    env = dict(os.environ, LIPKERNELS_LIBRARY=lib)
    code = ("import lipkernels, lipkernels.cli, sys\n"
            "assert lipkernels._extension.path().endswith('liblipkernels.so')\n"
            "sys.exit(lipkernels.cli.main(['check']))\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_output_cache_reuses_and_releases_blocks(backend):
    g = torch.randn(4, 1 << 17)  # 2 MiB: served from the cache
    lipkernels.empty_cache()
    assert lipkernels.cpu_cache_bytes() == 0
    out = torch.ops.lipkernels.sample_scale(g, torch.full((4,), 2.0))
    assert torch.equal(out, 2.0 * g)
    ptr = out.data_ptr()
    del out
    assert lipkernels.cpu_cache_bytes() >= g.numel() * 4
    again = torch.ops.lipkernels.sample_scale(g, torch.full((4,), 3.0))
    assert again.data_ptr() == ptr and torch.equal(again, 3.0 * g)
    del again
    lipkernels.empty_cache()
    assert lipkernels.cpu_cache_bytes() == 0
