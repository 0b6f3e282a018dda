"""The README's and the documentation pages' code blocks run and fit the page; the version is written once.

Every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs, in order, in a fresh
namespace per file, on CPU tensors: a reader lands on a page from a search, so each page's code
runs top to bottom with its own imports and no name from another page. One HTML comment
(invisible in the rendered page) steers it:

* ``<!-- no-run: <reason> -->`` on the line just before a block: the block is not run (a sketch with
  ``...``, a block that needs a GPU, ``torchrun`` or a download); it is reported as a skip with its
  reason, and still has to compile.

A page whose runnable blocks import TRL or verl is marked ``trainers``:
deselected by default, run with ``-m trainers`` in the trainers' environment (.ci/run's second one).
A block that imports TRL, verl or transformers runs when they are installed; without them the file
is skipped, except under ``CI=true`` (CI installs them), where it fails. docs/contributing.md says
the same for authors. Without a browser, the pages' code lines are checked against the width a code
block shows at 1280 px; ``tests/test_site.py`` checks the built site in Chromium.
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


def run_blocks(path: Path, namespace: dict) -> int:
    """Run the runnable blocks of ``path`` in ``namespace``; return the count."""
    count = 0
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
    """Whether a runnable block of ``path`` imports TRL or verl."""
    return any(TRAINERS.search(b.code) for b in blocks(path) if b.no_run is None)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.trainers) if needs_trainer(p) else p
                                  for p in RUNNABLE], ids=_name)
def test_code_blocks_run(path: Path) -> None:
    runnable = [b for b in blocks(path) if b.no_run is None]
    namespace: dict = {"__name__": f"docs_{path.stem}"}  # fresh: nothing from another page
    with torch.random.fork_rng():  # the pages seed torch; leave the global RNG as the next test expects
        assert run_blocks(path, namespace) == len(runnable)


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
    page.write_text("<!-- no-run: a sketch -->\n```python\nimport trl\n```\n\n```python\nimport trlx_like\n```\n")
    assert not needs_trainer(page)


def test_every_markdown_file_is_collected() -> None:
    # README and every page, so a page added later is tested without editing this file.
    assert ROOT / "README.md" in FILES and DOCS / "getting-started.md" in FILES
    assert len(FILES) >= 15
    assert ROOT / "README.md" in RUNNABLE and DOCS / "getting-started.md" in RUNNABLE


# A code block shows 80 columns at 1280 px (Material's code font, measured in Chromium by
# tests/test_site.py, which checks the built site); 79 leaves a column for other systems' fonts.
COLUMNS = 79
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")


def code_lines(path: Path) -> list[tuple[int, str]]:
    """The lines inside the fenced code blocks of ``path`` (any language), less the fence's indent."""
    found, fence, indent = [], None, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, indent = match.group(2), match.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is not None:
            found.append((number, line.removeprefix(indent)))
    return found


def prose(path: Path) -> str:
    """``path``'s text outside its fenced code blocks."""
    inside = {number for number, _ in code_lines(path)}
    return "\n".join(line for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                     if number not in inside)


PAGES = sorted(DOCS.rglob("*.md"))
GUIDE = [page for page in PAGES if page.parent == DOCS and page.name != "changelog.md"]  # changelog: an include


def test_code_blocks_fit_the_page() -> None:
    too_long = [f"{_name(page)}:{number}: {len(line)} columns" for page in PAGES
                for number, line in code_lines(page) if len(line) > COLUMNS]
    assert not too_long, f"code lines wider than {COLUMNS} columns are cut off at 1280 px: wrap them: {too_long}"


def test_pages_stand_alone() -> None:
    # The docs test once let a page continue another page's example; a reader from a search cannot.
    chained = [_name(page) for page in FILES
               if re.search(r"(?m)^<!-- docs-test: after ", page.read_text(encoding="utf-8"))]
    assert not chained, f"{chained}: each page's code must run on its own, with its own imports"


@pytest.mark.parametrize("page", GUIDE, ids=_name)
def test_guide_pages_have_sections(page: Path) -> None:
    # Sections give a page its table of contents and anchors a link can point to (#trl, #verl).
    assert re.search(r"(?m)^## \S", prose(page)), f"{_name(page)} has no ## section"


def test_home_page_has_a_row_for_every_page() -> None:
    index = prose(DOCS / "index.md")
    linked = set(re.findall(r"\]\(([\w/-]+\.md)[)#]", index))
    missing = [page.name for page in GUIDE if page.name not in linked | {"index.md"}]
    assert not missing, f"docs/index.md links to no {missing}: add a row to its 'Where to start' table"
    assert "api/rlloss.md" in linked
    assert "```bash\npip install -e .\n```" in (DOCS / "index.md").read_text(encoding="utf-8"), (
        "the home page shows the install command")


_PYPI_INSTALL = re.compile(r"pip install\s+(?:-\S+\s+)*[\"']?rlloss\b")


def test_install_commands_work_from_a_checkout() -> None:
    # rlloss is not on PyPI yet: `pip install rlloss` or "rlloss[trl]" fails as written.
    from rlloss.integrations import EXTRAS

    by_name = [f"{_name(path)}: {match.group(0)}" for path in FILES
               for match in _PYPI_INSTALL.finditer(path.read_text(encoding="utf-8"))]
    by_name += [f"EXTRAS[{name!r}]: {command}" for name, command in EXTRAS.items() if _PYPI_INSTALL.search(command)]
    assert not by_name, f"install commands that name rlloss on PyPI: {by_name}; use pip install -e \".[extra]\""
    assert EXTRAS == {"trl": 'pip install -e ".[trl]"', "verl": 'pip install -e ".[verl]"'}


def _api_hook():
    """docs/_api.py, the hook that writes the API pages' summaries and groups (needs the docs extra)."""
    pytest.importorskip("griffe", reason='the docs extra is not installed (pip install -e ".[docs]")')
    pytest.importorskip("mkdocs", reason='the docs extra is not installed (pip install -e ".[docs]")')
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_api_hook", DOCS / "_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_groups_document_every_public_name() -> None:
    api = _api_hook()
    page = api._groups("rlloss")
    # Every name rlloss exports at run time (the hook reads the source statically) has its entry.
    functions = [name for name in rlloss.__all__ if not isinstance(getattr(rlloss, name), type(rlloss))]
    missing = [name for name in functions if f"::: rlloss.{name}\n" not in page]
    assert not missing, f"docs/api/rlloss.md lacks {missing}"
    sections = re.findall(r"(?m)^## (.+)$", page)
    assert sections == [heading for heading, _ in api.GROUPS]
    # A module in no group fails the build instead of dropping its names from the reference.
    api.GROUPS = tuple((heading, tuple(m for m in modules if m != "rlloss.kl")) for heading, modules in api.GROUPS)
    with pytest.raises(Exception, match=r"rlloss\.kl_estimate .*in no group"):
        api._groups("rlloss")


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
