"""The package's structure (issue 16, section 3): the import graph of lipkernels has no
cycle, lipkernels/ops reaches the backends only through lipkernels.backends, and every
backend has one kernel object, which the plain path, the torch.func path and
``backends.kernels`` all use.

The import graph: one node per module of ``lipkernels/**/*.py`` (a package is its
``__init__``); an edge ``a -> b`` for every import in ``a`` of a lipkernels module ``b``,
at module level or inside a function or class (a lazy import is still a dependency
between the two modules), relative imports resolved:

* ``import a.b.c`` and ``from a.b.c import name`` import ``a.b.c``;
  ``from a.b import c`` where ``a.b.c`` is a module imports ``a.b.c`` (and, where
  another name of the same statement is not a module, ``a.b`` for that name);
* importing ``a.b.c`` also runs the ``__init__`` of the packages ``a.b`` and ``a``:
  edges to them, except to the packages that contain the importing module itself.
  Those are always imported (or being imported) before a module inside them runs, so
  an import cannot start them; without this exception every package whose
  ``__init__`` imports a submodule that imports a sibling (``from . import x``) would
  be a cycle. This also leaves out the edges into the top-level ``lipkernels/__init__``
  that the rule would give every module (``from .. import backends``); a direct
  dependency on a package's own names (``from .. import set_backend``, or
  ``import lipkernels``) is an edge all the same, and so are the re-exports of
  ``lipkernels/__init__.py`` and ``lipkernels/ops/__init__.py`` (edges from them).
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Optional, Set

import pytest
import torch
from torch.func import vmap

from lipkernels import backends, ops

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: The raw kernel entry points of every backend's kernel object, and of the compiled ones.
RAW = ("norm_epilogue", "norm_epilogue_backward")
RAW_SN = ("sn_forward", "sn_backward")


# ------------------------------------------------------------------ the import graph

def modules_of(root: pathlib.Path) -> Dict[str, pathlib.Path]:
    """``{dotted name: path}`` of every lipkernels module under ``root`` (compiled
    extension modules too, as nodes without edges)."""
    found = {}
    for path in sorted((root / "lipkernels").rglob("*")):
        if path.suffix == ".py":
            parts = list(path.relative_to(root).with_suffix("").parts)
        elif path.suffix in (".so", ".pyd"):
            parts = list(path.relative_to(root).parts)
            parts[-1] = parts[-1].split(".")[0]
        else:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def import_graph(root: pathlib.Path) -> Dict[str, Set[str]]:
    """``{module: modules it imports}`` by the rules of the module docstring."""
    modules = modules_of(root)
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        if path.suffix != ".py":
            continue
        own_package = name if _is_package(path) else name.rpartition(".")[0]
        enclosing = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        direct: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                direct.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = own_package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    direct.add(sub if sub in modules else base)
        for target in direct:
            if not (target == "lipkernels" or target.startswith("lipkernels.")):
                continue
            if target not in modules:
                raise AssertionError(f"{path}: imports {target}, which is not a lipkernels module")
            graph[name].add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package not in enclosing:
                    graph[name].add(package)
        graph[name].discard(name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the graph (``[a, b, ..., a]``), or None."""
    state: Dict[str, int] = {}   # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT)
    assert "lipkernels.ops" in graph and "lipkernels.triton.sample_norm" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_cycle(tmp_path):
    """The rules above find a cycle through a package __init__ (the shape of the one
    issue 16 removed: a backend module importing lipkernels.ops._layout ran ops/__init__,
    which imports the ops, which reach the backend through lipkernels.backends), and do
    not count a package importing its submodules that import their siblings."""
    files = {
        "__init__.py": "from . import ops, backends\n",
        "backends.py": "def f():\n    from . import kern\n",
        "kern/__init__.py": "def g():\n    from . import impl\n",
        "kern/impl.py": "from ..ops._layout import x\n",
        "ops/__init__.py": "from .op import y\n",
        "ops/_layout.py": "x = 1\n",
        "ops/op.py": "from .. import backends\nfrom . import _layout\n",
    }
    for rel, text in files.items():
        target = tmp_path / "lipkernels" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and "lipkernels.ops" in cycle and "lipkernels.backends" in cycle, cycle
    (tmp_path / "lipkernels" / "kern" / "impl.py").write_text("from .._layout import x\n")
    (tmp_path / "lipkernels" / "_layout.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_ops_import_no_backend_module():
    """lipkernels/ops reaches the backends' kernels only through lipkernels.backends:
    no import of the Triton backend or of the compiled extension's kernel object."""
    graph = import_graph(ROOT)
    forbidden = ("lipkernels.triton", "lipkernels._cpp_kernels", "lipkernels._C")
    for module, targets in sorted(graph.items()):
        if module == "lipkernels.ops" or module.startswith("lipkernels.ops."):
            bad = sorted(t for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))
            assert not bad, f"{module} imports {bad}"


def test_ops_hold_no_kernel_adapter():
    """No backend-specific adapter code in lipkernels/ops: no operator namespace reached
    directly (``torch.ops.<namespace>``), no definition of a kernel object's entry points
    (those live with the backends: lipkernels/_cpp_kernels.py, lipkernels/triton,
    lipkernels/_epilogue.py)."""
    entry_points = set(RAW + RAW_SN)
    for path in sorted((ROOT / "lipkernels" / "ops").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "ops"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                raise AssertionError(f"{path}:{node.lineno}: torch.ops used in lipkernels/ops")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.name not in entry_points, f"{path}:{node.lineno}: defines {node.name}"


def test_import_lipkernels_does_not_import_triton():
    """The Triton backend's kernel modules are imported when the backend is first used."""
    code = "import sys, lipkernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ one kernel object per backend

def _backend_devices():
    """(backend, device type) for every available backend and device type it runs on here."""
    out = []
    for name in backends.available_backends():
        for device_type in backends.devices(name):
            device_type = "cpu" if device_type == "*" else device_type
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            marks = [pytest.mark.triton] if name == "triton" else []
            out.append(pytest.param(name, device_type, id=f"{name}-{device_type}", marks=marks))
    return out


@pytest.mark.parametrize("name,device_type", _backend_devices())
def test_one_kernel_object_per_backend(name, device_type):
    device = torch.device(device_type)
    row = backends.backend(name)
    kern = row.kernels(device_type)
    assert row.kernels(device_type) is kern
    for attr in RAW:
        assert callable(getattr(kern, attr, None)), f"{name}: no {attr}"
    with backends.use_backend(name):
        assert backends.kernels(device) is kern
        assert backends.kernels(device) is kern  # the cached choice
        if name == "reference":
            # The reference's ops are the formulas beside each op in lipkernels.ops.
            assert backends.implementation(device) is None
            return
        # The plain path's ops are attributes of the same object.
        assert backends.implementation(device) is kern
    for attr in RAW_SN + tuple(op for op in backends.OPS if op != "clip_"):
        assert callable(getattr(kern, attr, None)), f"{name}: no {attr}"


@pytest.mark.parametrize("name,device_type", _backend_devices())
def test_kernels_follows_the_selection(name, device_type):
    """backends.kernels chooses as backends.implementation does: auto, use_backend,
    set_backend."""
    device = torch.device(device_type)
    for selected in ("auto", name):
        with backends.use_backend(selected):
            chosen = backends.select(device)
            assert backends.kernels(device) is backends.backend(chosen).kernels(device_type)
    previous = backends.get_backend()
    try:
        backends.set_backend(name)
        assert backends.kernels(device) is backends.backend(name).kernels(device_type)
    finally:
        backends.set_backend(previous)


@pytest.mark.skipif(not backends.is_available("cpu"), reason="no compiled extension")
def test_kernels_refuses_a_backend_on_another_device():
    with backends.use_backend("cpu"):
        for accessor in (backends.implementation, backends.kernels):
            with pytest.raises(RuntimeError, match="runs on cpu tensors here, but the tensors are on cuda"):
                accessor(torch.device("cuda"))


@pytest.mark.parametrize("name,device_type", [p for p in _backend_devices() if p.values[0] != "reference"])
def test_plain_and_func_paths_call_the_kernel_object(name, device_type, monkeypatch):
    """A plain call runs the kernel object's public op, a call under vmap its raw
    kernels (the torch.func path): the object backends.kernels returns."""
    device = torch.device(device_type)
    with backends.use_backend(name):
        kern = backends.kernels(device)
        seen = []
        for attr in ("sample_norm", "spectral_normalize"):
            # Instance attributes (the public ops): patched on the object.
            original = getattr(kern, attr)
            monkeypatch.setattr(kern, attr, lambda *a, _o=original, _n=attr: seen.append((_n, kern))
                                or _o(*a))
        for attr in RAW + RAW_SN:
            # Methods: patched on the class (an instance attribute would outlive the test).
            original = getattr(type(kern), attr)
            monkeypatch.setattr(type(kern), attr, lambda self, *a, _o=original, _n=attr:
                                seen.append((_n, self)) or _o(self, *a))
        g = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
        ops.sample_norm(g)
        vmap(ops.sample_norm)(g)
        assert [n for n, _ in seen] == ["sample_norm", "norm_epilogue"], seen
        assert all(obj is kern for _, obj in seen)
        seen.clear()
        w = torch.randn(4, 3, dtype=torch.float64, device=device)
        u = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64, device=device), dim=0)
        v = torch.nn.functional.normalize(torch.randn(3, dtype=torch.float64, device=device), dim=0)
        ops.spectral_normalize([w], [u], [v], 1, 1e-12, False)
        vmap(lambda w: ops.spectral_normalize([w], [u], [v], 1, 1e-12, False)[0])(
            w.unsqueeze(0).expand(2, 4, 3))
        assert [n for n, _ in seen] == ["spectral_normalize", "sn_forward"], seen
        assert all(obj is kern for _, obj in seen)


def test_reference_kernels_match_the_reference_ops():
    """The reference's kernel object (the JVP steps call it): outputs of the reference
    formulas, and the gradients autograd gives them."""
    kern = backends.backend("reference").kernels("cpu")
    g = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(4, dtype=torch.float64, requires_grad=True)
    go = torch.randn(4, dtype=torch.float64)
    for epilogue, ff, param, ref in (
            ("norm", None, 0.0, lambda f, g: ops.sample_norm_reference(g)),
            ("gn", f, 0.0, ops.gn_normalize_reference),
            ("gran", f, 1e-3, lambda f, g: ops.gran_normalize_reference(f, g, 1e-3)),
            ("gp", None, 1.0, lambda f, g: (ops.sample_norm_reference(g) - 1.0) ** 2),
            ("r1", None, 0.0, lambda f, g: ops.sample_norm_reference(g) ** 2)):
        out, norm = kern.norm_epilogue(g.detach(), None if ff is None else ff.detach(), epilogue, param)
        expected = ref(ff, g)
        torch.testing.assert_close(out, expected.detach())
        torch.testing.assert_close(norm, ops.sample_norm_reference(g).detach())
        grad_f, grad_g = kern.norm_epilogue_backward(go, g.detach(), None if ff is None else ff.detach(),
                                                     norm, epilogue, param)
        inputs = (g,) if ff is None else (g, ff)
        grads = torch.autograd.grad(expected, inputs, go)
        torch.testing.assert_close(grad_g, grads[0])
        if ff is None:
            assert grad_f.numel() == 0
        else:
            torch.testing.assert_close(grad_f, grads[1])
