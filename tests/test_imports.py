"""The core stays framework-free: only backend modules import torch, jax, cupy or autograd."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import secondorder

FRAMEWORKS = {"torch", "jax", "jaxlib", "cupy", "cupyx", "autograd"}
SRC = pathlib.Path(secondorder.__file__).parent
BACKEND_MODULES = {"numpy.py", "torch.py", "jax.py", "cupy.py", "array_api_strict.py",
                   "_autograd_namespace.py", "_torch_namespace.py"}


def _module_level_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_backend_modules_import_frameworks():
    offenders = {}
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        checked += 1
        if path.parent.name == "backends" and path.name in BACKEND_MODULES:
            continue
        if path.parent.name == "integrations" and path.name != "__init__.py":
            continue  # an integration exists to import its framework; it is imported on request
        if path.parent.name == "distributed" and path.name in ("collectives.py", "model.py",
                                                                 "optimizer.py"):
            continue  # the torch.distributed layer, imported on request (the package is lazy)
        bad = _module_level_imports(path) & FRAMEWORKS
        if bad:
            offenders[str(path.relative_to(SRC))] = sorted(bad)
    assert checked >= 20
    assert offenders == {}


def test_backend_modules_are_where_frameworks_are_imported():
    assert "torch" in _module_level_imports(SRC / "backends" / "torch.py")
    assert "jax" in _module_level_imports(SRC / "backends" / "jax.py")


def test_import_secondorder_loads_no_framework():
    code = (
        "import sys, secondorder, secondorder.linalg, secondorder.tree, "
        "secondorder.integrations, secondorder.distributed; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'autograd') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
