"""The import graph points one way: leaves <- ``rlloss.kernels`` <- public modules <- ``rlloss``.

The subpackages that reach outside the library sit on top: ``rlloss.integrations`` (the trainers)
and ``rlloss.audit`` (the trainers, matplotlib); nothing below them imports them, so ``import rlloss``
imports neither, nor a trainer, nor matplotlib, and ``import rlloss.audit`` imports a trainer or
matplotlib only when a front end or a plot is used.

Leaves (``rlloss._constants``, ``rlloss._groups``, ``rlloss._validate``) import nothing of rlloss
but each other; the kernel modules import torch, triton, each other and the leaves only, at module
level (no function-local reach back into the public modules); the public modules import the
kernels only through the registered ops, on first use; no cycle anywhere, function-local imports
included.

``rlloss.kernels`` is a subpackage, so importing it normally runs ``rlloss/__init__.py`` first, which
imports every public module: that would hide what the kernels themselves import. The runtime check
therefore imports ``rlloss.kernels.ops`` in a fresh interpreter where ``rlloss`` is registered as a
bare package (its ``__init__`` not run) and looks at which ``rlloss`` modules got imported.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"rlloss._constants", "rlloss._groups", "rlloss._validate"}
SUBPACKAGES = ("audit", "integrations")  # on top of the library: only they may import a trainer
OUTSIDE = ("trl", "verl", "transformers", "matplotlib", "datasets", "tensordict", "tokenizers")


def _modules() -> dict[str, Path]:
    found = {f"rlloss.{p.stem}": p for p in (ROOT / "rlloss").glob("*.py") if p.stem != "__init__"}
    found["rlloss"] = ROOT / "rlloss" / "__init__.py"
    found.update({f"rlloss.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"})
    found["rlloss.kernels"] = ROOT / "kernels" / "__init__.py"
    for package in SUBPACKAGES:
        folder = ROOT / "rlloss" / package
        found.update({f"rlloss.{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"})
        found[f"rlloss.{package}"] = folder / "__init__.py"
    return found


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported rlloss module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = set(id(node) for node in tree.body)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        modules = _modules()
        for n in names:
            if n in modules:
                out.append((n, id(node) in top))
    return out


def test_leaves_import_only_leaves():
    for name in LEAVES:
        bad = [m for m, _ in _imports(name, _modules()[name]) if m not in LEAVES]
        assert not bad, f"{name} is a leaf but imports {bad}"


def test_kernels_import_only_kernels_and_leaves_at_module_level():
    for name, path in _modules().items():
        if not name.startswith("rlloss.kernels"):
            continue
        for module, top_level in _imports(name, path):
            assert module.startswith("rlloss.kernels") or module in LEAVES, f"{name} imports {module}"
            assert top_level, f"{name} imports {module} inside a function"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: {m for m, _ in _imports(name, path) if m != name} for name, path in modules.items()}
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}  # a parent
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(trail + [node, dep])}")
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_importing_the_kernels_imports_no_public_module():
    spec = importlib.util.find_spec("rlloss")
    code = f"""
import importlib, sys, types
bare = types.ModuleType("rlloss")
bare.__path__ = {list(spec.submodule_search_locations)!r}
sys.modules["rlloss"] = bare
importlib.import_module("rlloss.kernels.ops")
print(sorted(m for m in sys.modules if m.startswith("rlloss")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout.strip().splitlines()[-1]))
    assert "rlloss.kernels.ops" in loaded
    public = sorted(m for m in loaded if m != "rlloss" and not m.startswith("rlloss.kernels") and m not in LEAVES)
    assert not public, f"importing rlloss.kernels.ops imported public modules {public}"


def _public_modules() -> dict[str, Path]:
    """The public modules of the package itself (``rlloss/*.py`` but ``_*``; the trainer integrations,
    documented whole, are not among them)."""
    return {name: path for name, path in _modules().items()
            if name.count(".") == 1 and not name.startswith("rlloss.kernels") and not path.stem.startswith("_")}


def test_every_all_is_sorted():
    import rlloss

    for name in ["rlloss", *sorted(_public_modules())]:
        names = list(getattr(importlib.import_module(name), "__all__", []))
        assert names == sorted(names), f"{name}.__all__ is not sorted"


def test_public_modules_define_no_unexported_helper():
    # A function or class of a public module without an underscore is API: rlloss (or the module)
    # exports it. A helper that is not API carries an underscore or lives in a private module.
    import rlloss

    exported = set(rlloss.__all__)
    for name, path in sorted(_public_modules().items()):
        own = set(getattr(importlib.import_module(name), "__all__", []))
        tree = ast.parse(path.read_text())
        defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        stray = [d for d in defined if not d.startswith("_") and d not in exported | own]
        assert not stray, f"{name} defines {stray}: export them or give them an underscore"


def test_the_library_never_imports_its_top_subpackages():
    """No module of rlloss outside ``rlloss.audit`` and ``rlloss.integrations`` imports either, even in a function."""
    for name, path in _modules().items():
        if any(name == f"rlloss.{p}" or name.startswith(f"rlloss.{p}.") for p in SUBPACKAGES):
            continue
        bad = [m for m, _ in _imports(name, path) if any(m == f"rlloss.{p}" or m.startswith(f"rlloss.{p}.")
                                                        for p in SUBPACKAGES)]
        assert not bad, f"{name} imports {bad}"


def test_audit_imports_trainers_and_matplotlib_only_inside_functions():
    for name, path in _modules().items():
        if not name.startswith("rlloss.audit"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad = [n for n in names if n.split(".")[0] in OUTSIDE]
            assert not bad, f"{name} imports {bad} at module level"


def test_import_rlloss_imports_no_subpackage_trainer_or_matplotlib():
    code = ("import sys, rlloss\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OUTSIDE!r} "
            "or m in ('rlloss.audit', 'rlloss.integrations')))\n"
            "import rlloss.audit\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OUTSIDE!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    after_rlloss, after_audit = out.stdout.strip().splitlines()[-2:]
    assert after_rlloss == "[]", f"import rlloss imported {after_rlloss}"
    assert after_audit == "[]", f"import rlloss.audit imported {after_audit}"
