"""MkDocs hook: publish the repository files that the documentation pages link to as ``../path``.

The figures stay where the code writes them (``benchmarks/results/*.png``, ``examples/results/*.png``)
and the pages link to them, and to scripts such as ``examples/length_bias.py``, with paths relative to
``docs/``: ``![...](../examples/results/compare.png)``. Such links work unchanged on GitHub. For the
site, this hook registers each linked file that exists in the repository (outside ``docs/``) under
the same ``../path`` source name MkDocs resolves the link to, and copies it to ``site/repo/<path>``.
A link to a file that does not exist, or to a Markdown file outside ``docs/`` (it would be built as
a page), is not registered, so ``mkdocs build --strict`` reports it.
Nothing is copied into ``docs/``: the images are stored once, in git, where they are produced.

It also publishes MathJax (``assets/mathjax/tex-svg.js``, named in ``mkdocs.yml``'s ``extra_javascript``)
from the installed package of the ``docs`` extra, so the formulas render with no request to another
host: the site works offline. ``tex-svg.js`` is MathJax's single-file TeX-to-SVG build (no font files).
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files, InclusionLevel

# Markdown links and images whose target starts with ../ (the repository root, seen from docs/).
_LINK = re.compile(r"\]\((\.\./[^)#\s]+)")

# MathJax's files in the package django-static-mathjax (a copy of MathJax 3; Django is not needed), and
# where the site serves them.
_MATHJAX = {"es5/tex-svg.js": "assets/mathjax/tex-svg.js", "LICENSE": "assets/mathjax/LICENSE"}


def _mathjax_dir() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "static/mathjax/es5").is_dir():
        raise PluginError('MathJax is not installed: pip install -e ".[docs]" (it brings django-static-mathjax, '
                          "whose copy of MathJax the site serves)")
    return Path(spec.origin).parent / "static" / "mathjax"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    docs = Path(config.docs_dir).resolve()
    root = docs.parent
    for page in sorted(docs.rglob("*.md")):
        page_dir = page.parent.relative_to(docs).as_posix()
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            # The name MkDocs resolves the link to: relative to the page's folder inside docs/.
            src_uri = Path(page_dir, target).as_posix() if page_dir != "." else target
            src_uri = posixpath.normpath(src_uri)  # as MkDocs resolves a link (keeps a leading ..)
            path = (docs / src_uri).resolve()
            if (not src_uri.startswith("../") or src_uri.endswith(".md") or not path.is_file()
                    or files.get_file_from_path(src_uri)):
                continue  # a Markdown file outside docs/ would become a page: --strict reports the link
            file = File.generated(config, src_uri, abs_src_path=str(path), inclusion=InclusionLevel.INCLUDED)
            file.dest_uri = "repo/" + path.relative_to(root).as_posix()
            files.append(file)
    mathjax = _mathjax_dir()
    for source, dest in _MATHJAX.items():
        files.append(File.generated(config, dest, abs_src_path=str(mathjax / source)))
    return files

