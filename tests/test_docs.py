"""The README's and the documentation pages' Python code blocks run, and the version is written once.

Every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs, in order, in one
namespace per file, on CPU tensors. Two HTML comments (invisible in the rendered page) steer it:

* ``<!-- docs-test: after getting-started.md -->`` as the first line of a page: the page continues
  that page's example, whose blocks run first in the same namespace;
* ``<!-- no-run: <reason> -->`` on the line just before a block: the block is not run (a sketch with
  ``...``, a block that needs a GPU or ``torchrun``); it is reported as a skip with its reason.

A page whose runnable blocks (its prerequisites' included) import TRL or verl is marked ``trainers``:
deselected by default, run with ``-m trainers`` in the trainers' environment (.ci/run's second one).
A block that imports TRL, verl or transformers runs when they are installed; without them the file
is skipped, except under ``CI=true`` (CI installs them), where it fails. docs/contributing.md says
the same for authors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import rlloss

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
OPTIONAL = ("trl", "verl", "transformers")  # installed in CI; a block needing them skips elsewhere

TRAINERS = re.compile(r"^\s*(?:import|from)\s+(?:trl|verl|rlloss\.integrations\.(?:trl|verl))\b", re.MULTILINE)

_AFTER = re.compile(r"^<!-- docs-test: after (\S+\.md) -->$")
_NO_RUN = re.compile(r"^<!-- no-run: (.*\S) -->$")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    code: str
    no_run: str | None  # the reason, for a block that is not run


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(path: Path) -> list[Block]:
    """The ```python blocks of ``path`` that open at column 0, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            if lines[i] != "```python":
                raise AssertionError(f"{_name(path)}:{i + 1}: indented ```python block; the docs test runs "
                                     "only blocks at column 0, move it out of the list or admonition")
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
            assert end is not None, f"{_name(path)}:{i + 1}: unclosed ```python block"
            before = lines[i - 1] if i > 0 else ""
            no_run = _NO_RUN.match(before)
            found.append(Block(path, i + 1, "\n".join(lines[i + 1:end]) + "\n", no_run and no_run.group(1)))
            i = end
        elif lines[i].lstrip().startswith("```python"):
            raise AssertionError(f"{_name(path)}:{i + 1}: {lines[i].strip()!r}: mark a block not to run with "
                                 "<!-- no-run: reason --> on the line before a plain ```python fence")
        i += 1
    return found


def prerequisite(path: Path) -> Path | None:
    """The page named by ``<!-- docs-test: after X.md -->`` on ``path``'s first line."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    match = _AFTER.match(first)
    if match is None:
        return None
    target = (path.parent / match.group(1)).resolve()
    assert target.is_file(), f"{_name(path)}: docs-test: after {match.group(1)}: no such page"
    return target


def run_blocks(path: Path, namespace: dict, seen: tuple[Path, ...] = ()) -> int:
    """Run the runnable blocks of ``path`` (after its prerequisite's) in ``namespace``; return the count."""
    assert path not in seen, f"docs-test: after: a cycle through {_name(path)}"
    before = prerequisite(path)
    count = run_blocks(before, namespace, (*seen, path)) if before is not None else 0
    for block in blocks(path):
        if block.no_run is not None:
            continue
        code = compile(block.code, f"{_name(path)}:{block.line}", "exec")
        try:
            exec(code, namespace)
        except ModuleNotFoundError as exc:
            if exc.name not in OPTIONAL or os.environ.get("CI") == "true":
                raise
            pytest.skip(f"{_name(path)}:{block.line} needs {exc.name} (installed in CI)")
        count += 1
    return count


RUNNABLE = [path for path in FILES if any(block.no_run is None for block in blocks(path))]


def needs_trainer(path: Path) -> bool:
    """Whether a runnable block of ``path``, or of a page it continues, imports TRL or verl."""
    before = prerequisite(path)
    return (any(TRAINERS.search(b.code) for b in blocks(path) if b.no_run is None)
            or (before is not None and needs_trainer(before)))


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.trainers) if needs_trainer(p) else p
                                  for p in RUNNABLE], ids=_name)
def test_code_blocks_run(path: Path) -> None:
    runnable = [b for b in blocks(path) if b.no_run is None]
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    with torch.random.fork_rng():  # the pages seed torch; leave the global RNG as the next test expects
        assert run_blocks(path, namespace) >= len(runnable)


NO_RUN = [block for path in FILES for block in blocks(path) if block.no_run is not None]


@pytest.mark.parametrize("block", NO_RUN, ids=lambda b: f"{_name(b.file)}:{b.line}")
def test_no_run_blocks_say_why(block: Block) -> None:
    # The block still has to be Python: a sketch with a syntax error would mislead a reader.
    compile(block.code, f"{_name(block.file)}:{block.line}", "exec")
    pytest.skip(f"not run: {block.no_run}")


def test_pages_that_import_a_trainer_are_marked(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nimport rlloss\n```\n\n"
                    "```python\nfrom rlloss.integrations.trl import GRPOTrainer\n```\n")
    assert needs_trainer(page)
    after = tmp_path / "after.md"
    after.write_text("<!-- docs-test: after page.md -->\n```python\nx = 1\n```\n")
    assert needs_trainer(after)
    page.write_text("<!-- no-run: a sketch -->\n```python\nimport trl\n```\n\n```python\nimport trlx_like\n```\n")
    assert not needs_trainer(page) and not needs_trainer(after)


def test_every_markdown_file_is_collected() -> None:
    # README and every page, so a page added later is tested without editing this file.
    assert ROOT / "README.md" in FILES and DOCS / "getting-started.md" in FILES
    assert len(FILES) >= 15
    assert ROOT / "README.md" in RUNNABLE and DOCS / "getting-started.md" in RUNNABLE


def test_readme_is_a_front_page_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # The two set-up commands, word for word (GUIDE: the whole set-up on a fresh machine).
    assert '```bash\npip install torch==2.13.0 -e ".[dev]" && python benchmarks/bench_loss.py\n```' in readme
    assert '```bash\npip install torch==2.13.0 -e ".[dev]" && TRITON_INTERPRET=1 python -m pytest -q\n```' in readme
    # CI runs both of the test line's commands word for word (in a fresh environment), and the trainers' tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert '\npip install torch==2.13.0 -e ".[dev]"' in ci and "\nTRITON_INTERPRET=1 python -m pytest -q ||" in ci
    assert "python -m pytest -q -m trainers" in ci and "python -m pytest -m trainers" in readme
    # The README links into the docs; the details live there, not here.
    size = len(readme.encode("utf-8"))
    assert size <= 12_000, f"README.md is {size} bytes: move the details into docs/ and link to them"
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"


def test_version_is_written_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    versions = re.findall(r'(?m)^version\s*=\s*"([^"]+)"', pyproject)
    assert len(versions) == 1, f"pyproject.toml: expected one version line, found {versions}"
    assert rlloss.__version__ == versions[0], (
        f"rlloss.__version__ {rlloss.__version__!r} != pyproject.toml {versions[0]!r}: reinstall (pip install -e .)")
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"(?m)^## \[{re.escape(versions[0])}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog), (
        f"CHANGELOG.md has no section for version {versions[0]}")
    assert "## [Unreleased]" in changelog
    # rlloss/__init__.py reads the version; it never writes it down a second time.
    init = (ROOT / "rlloss" / "__init__.py").read_text(encoding="utf-8")
    assert not re.search(r'__version__\s*=\s*"\d+\.\d+', init)
