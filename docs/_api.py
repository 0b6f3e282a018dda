"""MkDocs hook: the API pages' summary tables, and the ``rlloss`` page's groups.

An API page (``docs/api/*.md``) is Markdown with one line this hook expands:

* ``<!-- api-groups: rlloss -->`` (``docs/api/rlloss.md``): a summary table of every group of
  ``GROUPS``, then one section per group, which documents each name of ``rlloss.__all__`` defined in
  the group's modules, in source order. A group's module with names not exported by ``rlloss``
  (``rlloss.recipes``' other presets, ``rlloss.distributed``, the integrations) gets summary rows
  that link to their entries on the module's own page.
* ``<!-- api-summary: MODULE [MODULE ...] -->``: a summary table of each module's public names (its
  ``__all__``, else its public top-level names), in source order, each linking to its entry.

A row's one line is the first paragraph of the docstring: it is written once, in the code. The build
fails on a name of ``rlloss.__all__`` that is in no group, or a summarised name without a docstring,
so nothing public is left out of the reference or listed without a word. The objects are read from
the source with griffe, as mkdocstrings reads them: no module is imported, no trainer is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

# The rlloss page, grouped by what a reader looks for: (heading, the modules whose names it documents).
# A new module is one more line here; its exported names then appear in its group, in source order.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Losses and recipes", ("rlloss.loss", "rlloss._validate", "rlloss.recipes", "rlloss.shaping")),
    ("Advantages and returns", ("rlloss.advantages", "rlloss.returns")),
    ("Objectives and KL", ("rlloss.objectives", "rlloss.surrogates", "rlloss.kl")),
    ("Aggregation and distributed counts", ("rlloss.aggregation", "rlloss.distributed")),
    ("Corrections", ("rlloss.corrections",)),
    ("From logits and hidden states", ("rlloss.logits", "rlloss.hidden")),
    ("Integrations", ("rlloss.integrations", "rlloss.integrations.trl", "rlloss.integrations.verl")),
)

_MARKER = re.compile(r"^<!-- api-(groups|summary): ([\w. ]+?) -->$", re.MULTILINE)
_PACKAGES: dict[str, griffe.Object] = {}


def on_pre_build(config: MkDocsConfig) -> None:
    _PACKAGES.clear()  # `mkdocs serve` rebuilds: read the source again


def _get(path: str) -> griffe.Object:
    top = path.split(".")[0]
    if top not in _PACKAGES:
        root = str(Path(__file__).resolve().parent.parent)
        _PACKAGES[top] = griffe.load(top, search_paths=[root], resolve_aliases=True, resolve_external=False)
    package = _PACKAGES[top]
    return package if path == top else package[path.split(".", 1)[1]]


def _target(obj: griffe.Object | griffe.Alias) -> griffe.Object:
    return obj.final_target if obj.is_alias else obj


def _one_line(path: str) -> str:
    """The first paragraph of ``path``'s docstring, as Markdown for a table cell."""
    obj = _target(_get(path))
    if not obj.docstring or not obj.docstring.value.strip():
        raise PluginError(f"docs/_api.py: {path} has no docstring, so its summary row would be empty: "
                          "write one (its first line is the row)")
    first = re.split(r"\n\s*\n", obj.docstring.value.strip())[0]
    return " ".join(first.split()).replace("``", "`").replace("|", r"\|")


def _public_names(module: str) -> list[str]:
    """A module's public names in source order: its ``__all__``, else its public top-level objects."""
    obj = _get(module)
    if obj.exports is not None:
        names = [str(name) for name in obj.exports]
    else:
        names = [name for name, member in obj.members.items()
                 if not name.startswith("_") and not member.is_alias and not member.is_module]
    return sorted(names, key=lambda name: _target(obj[name]).lineno or 0)


def _row(label: str, path: str) -> str:
    return f"| [`{label}`][{path}] | {_one_line(path)} |"


def _table(rows: list[str]) -> str:
    return "\n".join(["| name | what it is |", "|---|---|", *rows])


def _summary(modules: list[str]) -> str:
    """The table of one or more modules' names, each relative to the first module."""
    rows = []
    for i, module in enumerate(modules):
        prefix = module.removeprefix(modules[0] + ".") + "." if i else ""
        if i:
            rows.append(_row(prefix[:-1], module))
        rows += [_row(prefix + name, f"{module}.{name}") for name in _public_names(module)]
    return _table(rows)


def _anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def _groups(package: str) -> str:
    """The summary of every group, then each group's section with its entries."""
    exported: dict[str, list[str]] = {}  # module -> its names exported by the package, in source order
    for name in _public_names(package):
        obj = _target(_get(f"{package}.{name}"))
        module = obj.path if obj.is_module else obj.module.path
        exported.setdefault(module, []).append(name)
    grouped = {module for _, modules in GROUPS for module in modules}
    missing = [f"{package}.{name} (from {module})" for module, names in exported.items()
               if module not in grouped for name in names]
    if missing:
        raise PluginError(f"docs/_api.py: {', '.join(missing)} in no group of GROUPS: add its module to a group")

    rows, sections = [], []
    for heading, modules in GROUPS:
        rows.append(f"| [**{heading}**](#{_anchor(heading)}) | |")
        section = [f"## {heading}"]
        for module in modules:
            here = [name for name in exported.get(module, []) if not _get(f"{package}.{name}").is_module]
            rows += [_row(name, f"{package}.{name}") for name in here]
            section += [f"::: {package}.{name}\n    options:\n      heading_level: 3" for name in here]
            # A public submodule (rlloss.recipes, rlloss.distributed) or a module none of whose names the
            # package exports (the integrations) has its own page; other modules' other names are private.
            own_page = module.removeprefix(package + ".") in exported.get(module, []) or not here
            elsewhere = [name for name in _public_names(module) if name not in here] if own_page else []
            if not elsewhere:
                continue
            short = module.removeprefix(package + ".")
            rows.append(_row(short, module))
            rows += [_row(f"{short}.{name}", f"{module}.{name}") for name in elsewhere]
            section.append(f"[`{module}`][{module}], on its own page: "
                           + ", ".join(f"[`{name}`][{module}.{name}]" for name in elsewhere) + ".")
        sections.append("\n\n".join(section))
    return "\n\n".join([_table(rows), *sections])


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def expand(match: re.Match[str]) -> str:
        kind, names = match.group(1), match.group(2).split()
        return _groups(names[0]) if kind == "groups" else _summary(names)

    return _MARKER.sub(expand, markdown)
