"""The package layout's promises: the host side imports no jax, and each side of
``SchedulerOutput`` stays in its own package with no edge back."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxpaged"


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_without_jax():
    code = ("import importlib, pkgutil, sys\n"
            "import jaxpaged.core as core\n"
            "for m in pkgutil.iter_modules(core.__path__):\n"
            "    importlib.import_module(f'jaxpaged.core.{m.name}')\n"
            "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('jax', 'flax', 'numpy'))\n"
            "print(len(list(pkgutil.iter_modules(core.__path__))), heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, heavy = out.stdout.strip().split(" ", 1)
    assert int(count) >= 7 and heavy == "[]", out.stdout


@pytest.mark.parametrize("package, forbidden", [
    ("core", ("jaxpaged.engine", "jaxpaged.runner", "jaxpaged.sample", "jaxpaged.models",
              "jaxpaged.llm", "jaxpaged.server", "jax", "flax", "numpy")),
    ("models", ("jaxpaged.engine", "jaxpaged.runner", "jaxpaged.sample", "jaxpaged.core",
                "jaxpaged.llm", "jaxpaged.server")),
    ("sample", ("jaxpaged.engine", "jaxpaged.runner", "jaxpaged.models", "jaxpaged.llm",
                "jaxpaged.server")),
    ("runner", ("jaxpaged.engine", "jaxpaged.llm", "jaxpaged.server")),
    ("engine", ("jaxpaged.llm", "jaxpaged.server")),
])
def test_no_edge_back(package, forbidden):
    """Data flows request -> core -> runner -> models/sample -> engine; nothing imports back."""
    offenders = []
    for path in sorted((ROOT / package).glob("*.py")):
        for name in _imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders


def test_root_holds_only_the_public_face():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == {"__init__", "llm", "cli", "outputs", "sampling_params", "config"}
