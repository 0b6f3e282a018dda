"""The test session's own set-up: a run that would skip every kernel test must not pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine TRITON_INTERPRET=0 runs the compiled kernels")
@pytest.mark.parametrize("value", ["0", ""])
def test_interpreter_switched_off_without_cuda_is_a_loud_error(value):
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": value}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          str(tests / "test_setup.py")], cwd=tests.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "TRITON_INTERPRET" in run.stdout + run.stderr and "without CUDA" in run.stdout + run.stderr


# --- the top-level name ``kernels`` belongs to Hugging Face's package, from any working directory ----

ROOT = Path(__file__).resolve().parent.parent


def _from_root(code: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python <flags> -c code`` run at the checkout's root, where the root is first on ``sys.path``."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def test_an_installed_kernels_package_wins_at_the_checkout_root():
    """transformers >= 5 imports Hugging Face's ``kernels``; the checkout's ``kernels/`` must not hide it."""
    import importlib.machinery

    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT])
    if spec is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("Hugging Face's kernels package is not installed: the README's install brings it (transformers)")
        pytest.skip("Hugging Face's kernels package is not installed (pip install kernels)")
    run = _from_root("import kernels, rlloss.kernels.ops; print(kernels.__file__); print(rlloss.kernels.__file__)")
    assert run.returncode == 0, run.stderr
    top, ours = run.stdout.split()
    assert Path(top).resolve() == Path(spec.origin).resolve()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"


def test_another_kernels_package_later_on_the_path_wins(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'theirs'\n")
    (tmp_path / "kernels" / "sub.py").write_text("VALUE = 7\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = _from_root("import kernels, kernels.sub; print(kernels.MARK, kernels.sub.VALUE)", env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["theirs", "7"]
    # the checkout's own modules are not reachable under the top-level name
    run = _from_root("import kernels.ops", env=env)
    assert run.returncode != 0 and "No module named 'kernels.ops'" in run.stderr


def test_without_another_kernels_package_the_import_fails_as_if_the_folder_were_absent():
    run = _from_root("import kernels", "-S")  # no site-packages: only the root and the standard library
    assert run.returncode != 0
    assert "ModuleNotFoundError" in run.stderr and "rlloss.kernels" in run.stderr


# --- the trainer integrations' tests: deselected by default, never skipped in silence ---------------------------

TRAINERS = ("trl", "verl", "rlloss.integrations.trl", "rlloss.integrations.verl")


def _module_level_imports(tree) -> set[str]:
    """Modules imported at a module's top level (in a ``try`` or ``if`` too; not inside functions or classes)."""
    import ast

    found, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, (ast.Try, ast.If, ast.With)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)]
    return found


def _marked_trainers(tree) -> bool:
    import ast

    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
               and "trainers" in ast.unparse(node.value) for node in tree.body)


def test_every_module_importing_a_trainer_is_marked_trainers():
    import ast

    modules = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = _module_level_imports(tree)
        if any(name == t or name.startswith(t + ".") for name in imports for t in TRAINERS):
            modules[path.name] = _marked_trainers(tree)
    assert {"test_integrations_trl.py", "test_integrations_verl.py"} <= set(modules)
    unmarked = [name for name, marked in modules.items() if not marked]
    assert not unmarked, f"{unmarked} import a trainer at module level without pytestmark = pytest.mark.trainers"


def test_the_default_run_deselects_the_trainer_tests():
    """Counted as deselected (the README's command says so), not skipped, whether or not the trainers are here."""
    files = [str(ROOT / "tests" / name) for name in ("test_integrations_trl.py", "test_integrations_verl.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *files],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 5, out  # nothing left to run
    assert re.search(r"\b\d{2,} deselected", out) and "skipped" not in out and "error" not in out.lower(), out
