"""The built documentation site, as a reader sees it in a browser: headless Chromium at 1280 and 1920 px.

Every page of ``site/`` (``mkdocs build`` first; ``RLLOSS_SITE_DIR`` names another folder) is
served from 127.0.0.1 and opened in Debian's ``chromium`` driven by Playwright. The tests fail on

* a code block cut off on the right (its ``pre`` or ``code`` scrolls sideways), API pages included,
  or a table that needs a sideways scroll, or a name in a table broken over two lines;
* a page without ``##`` sections (no table of contents, nothing to link to);
* a header without the light/dark toggle or the repository link;
* an API page whose summary table does not link every entry, or an ``rlloss`` page without its groups;
* a formula left untypeset, a figure that does not open full size, no memory plot beside the speed plot;
* any request to another host, or any request that fails: the site works offline.

These need the built site and a browser, so the default test run leaves them out (marker ``site``);
``.ci/run`` builds the site and runs ``python -m pytest -q -m site tests/test_site.py``. Without
Playwright or Chromium the tests skip with a message, except under ``CI=true``, where they fail.
Playwright's own browser download is not used: ``apt-get install -y chromium``.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.site

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get("RLLOSS_SITE_DIR", ROOT / "site")).resolve()
WIDTHS = (1280, 1920)
# Chromium with no network of its own: nothing but the pages' own requests reach the local server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The rlloss API page's groups, as issue #27 lists what a reader looks for.
API_GROUPS = ("Losses and recipes", "Advantages and returns", "Objectives and KL",
              "Aggregation and distributed counts", "Corrections", "From logits and hidden states", "Integrations")

# Measured in the page, per page: what overflows, the sections, the API summary's links.
MEASURE = r"""() => {
  const article = document.querySelector("article");
  const firstLine = (el) => (el.innerText || "").split("\n").sort((a, b) => b.length - a.length)[0].slice(0, 100);
  const cut = [];
  for (const pre of article.querySelectorAll("pre")) {
    for (const el of [pre, pre.querySelector("code")]) {
      if (el && el.scrollWidth > el.clientWidth + 1) {
        cut.push(`${el.scrollWidth - el.clientWidth} px: ${firstLine(el)}`);
        break;
      }
    }
  }
  for (const el of article.querySelectorAll('mjx-container[display="true"]')) {
    if (el.scrollWidth > el.clientWidth + 1) cut.push(`formula, ${el.scrollWidth - el.clientWidth} px`);
  }
  const tables = [];
  for (const wrap of article.querySelectorAll(".md-typeset__scrollwrap, .md-typeset__table")) {
    const over = wrap.scrollWidth - wrap.clientWidth;
    if (over > 1) tables.push(`${over} px: ${firstLine(wrap)}`);
  }
  const broken = [];
  for (const code of article.querySelectorAll("td code, th code")) {
    // A name (an identifier, dotted or called) on two lines; a value may break at a space or a hyphen.
    const text = code.textContent;
    if (/^[A-Za-z_][\w.]*(\(\))?$/.test(text) && code.getClientRects().length > 1) broken.push(text);
  }
  const summary = article.querySelector("table");
  const links = summary ? [...summary.querySelectorAll("a[href]")].map((a) => a.getAttribute("href")) : [];
  const headings = [...article.querySelectorAll(".doc-heading[id]")].map((h) => ({
    id: h.id, module: !!h.querySelector("code.doc-symbol-module"),
  }));
  return {
    blocks: article.querySelectorAll("pre").length,
    cut, tables, broken, links, headings,
    h1: (article.querySelector("h1") || {textContent: ""}).textContent.replace(/¶$/, "").trim(),
    h2: [...article.querySelectorAll("h2")].map((h) => h.textContent.replace(/¶$/, "").trim()),
    firstTableBeforeH2: !!summary && [...article.querySelectorAll("h2")].every(
      (h) => summary.compareDocumentPosition(h) & Node.DOCUMENT_POSITION_FOLLOWING),
    math: article.querySelectorAll("mjx-container").length,
    arithmatex: article.querySelectorAll(".arithmatex").length,
    images: [...article.querySelectorAll("img")].map((img) => {
      const link = img.closest("a");
      const box = img.getBoundingClientRect();
      return {src: img.getAttribute("src"), href: link && link.getAttribute("href"),
              lightbox: !!link && link.classList.contains("glightbox"), top: box.top, left: box.left};
    }),
  };
}"""


def _pages() -> list[str]:
    """Every page of the built site, as a path below its root ("" for the home page)."""
    pages = []
    for index in sorted(SITE.rglob("index.html")):
        relative = index.parent.relative_to(SITE)
        if relative.parts[:1] in (("search",), ("repo",), ("assets",)):
            continue
        pages.append("" if relative == Path(".") else relative.as_posix() + "/")
    return pages


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI installs it: see .ci/run)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"no built site in {SITE}: run `mkdocs build --strict` first")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SITE)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed: pip install playwright")
    executable = next((path for path in (os.environ.get("RLLOSS_CHROMIUM"), "/usr/bin/chromium",
                                         shutil.which("chromium"), shutil.which("chromium-browser"))
                       if path and Path(path).is_file()), None)
    if executable is None:
        _unavailable("no Chromium: apt-get install -y chromium (Debian's package; Playwright's own "
                     "browser download is not used)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda width: f"{width}px")
def visit(request: pytest.FixtureRequest, server: str, browser: object) -> dict:
    """Every page opened at one width: the measurements, plus every request made and every failure."""
    width = request.param
    page = browser.new_page(viewport={"width": width, "height": 900})
    requests: list[str] = []
    failed: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    # A request cancelled by the next navigation (a favicon still loading) is no failure; a missing
    # file is an HTTP error, an unreachable host a network error.
    page.on("requestfailed",
            lambda req: req.failure != "net::ERR_ABORTED" and failed.append(f"{req.url} ({req.failure})"))
    page.on("response", lambda res: res.status >= 400 and failed.append(f"{res.url} (HTTP {res.status})"))
    results = {}
    for path in _pages():
        page.goto(server + path, wait_until="load")
        if page.locator(".arithmatex").count():  # MathJax typesets after load
            page.wait_for_selector("article mjx-container", timeout=15_000)
        results[path] = page.evaluate(MEASURE)
    header = {
        "toggles": page.locator("header form[data-md-component=palette] label").count(),
        "source": page.locator("header a.md-source").first.get_attribute("href"),
    }
    # The toggle switches the scheme: light to dark and back.
    page.goto(server, wait_until="load")
    before = page.locator("body").get_attribute("data-md-color-scheme")
    page.locator("header form[data-md-component=palette] label:visible").first.click()
    header["schemes"] = (before, page.locator("body").get_attribute("data-md-color-scheme"))
    page.close()
    return {"width": width, "pages": results, "requests": requests, "failed": failed, "header": header,
            "origin": server}


def test_the_site_has_its_pages(visit: dict) -> None:
    pages = visit["pages"]
    assert {"", "getting-started/", "recipes/", "api/rlloss/", "speed-and-memory/"} <= set(pages)
    assert sum(result["blocks"] for result in pages.values()) >= 100  # the API pages' signatures included


def test_no_code_block_is_cut_off(visit: dict) -> None:
    cut = {path or "/": result["cut"] for path, result in visit["pages"].items() if result["cut"]}
    assert not cut, f"code blocks cut off on the right at {visit['width']} px: {cut}"


def test_tables_fit_and_names_do_not_break(visit: dict) -> None:
    scroll = {path or "/": result["tables"] for path, result in visit["pages"].items() if result["tables"]}
    assert not scroll, f"tables that need a sideways scroll at {visit['width']} px: {scroll}"
    broken = {path or "/": result["broken"] for path, result in visit["pages"].items() if result["broken"]}
    assert not broken, f"names in tables broken over two lines at {visit['width']} px: {broken}"


def test_every_page_has_sections(visit: dict) -> None:
    # ## headings: a table of contents, and anchors a link can point to.
    bare = [path or "/" for path, result in visit["pages"].items() if not result["h2"] and path != "404/"]
    assert not bare, f"pages without a ## section: {bare}"
    assert {"TRL", "verl"} <= set(visit["pages"]["integrations/"]["h2"])


def test_header_has_the_palette_toggle_and_the_repository_link(visit: dict) -> None:
    header = visit["header"]
    assert header["toggles"] >= 2, "the header has no light/dark toggle"
    assert header["schemes"][0] != header["schemes"][1], f"the toggle does not switch: {header['schemes']}"
    assert header["source"] and re.match(r"https://\S+/\S+", header["source"]), "the header has no repository link"


def _entries(result: dict) -> set[str]:
    """The page's documented objects whose parent is a module: what its summary must link."""
    modules = {heading["id"] for heading in result["headings"] if heading["module"]}
    modules.add(result["h1"].strip().strip("`").strip())  # the page's own module (its heading is hidden)
    return {heading["id"] for heading in result["headings"] if heading["id"].rsplit(".", 1)[0] in modules}


@pytest.mark.parametrize("path", ["api/rlloss/", "api/recipes/", "api/distributed/", "api/integrations/"])
def test_api_pages_open_with_a_summary_linking_every_entry(visit: dict, path: str) -> None:
    result = visit["pages"][path]
    assert result["firstTableBeforeH2"], f"{path}: no summary table above the first section"
    linked = {href.rsplit("#", 1)[-1] for href in result["links"]}
    entries = _entries(result)
    assert entries, f"{path}: no documented entries"
    missing = sorted(entries - linked)
    assert not missing, f"{path}: entries the summary table does not link: {missing}"


def test_rlloss_api_page_is_grouped(visit: dict) -> None:
    result = visit["pages"]["api/rlloss/"]
    assert tuple(result["h2"]) == API_GROUPS
    assert "rlloss.policy_loss" in _entries(result) and "rlloss.group_advantages" in _entries(result)


def test_formulas_are_typeset(visit: dict) -> None:
    for path in ("", "recipes/", "aggregation/"):
        result = visit["pages"][path]
        assert result["arithmatex"] and result["math"] >= result["arithmatex"], f"{path}: formulas not typeset"


def test_figures_open_full_size_and_memory_is_beside_speed(visit: dict) -> None:
    images = [image for result in visit["pages"].values() for image in result["images"]]
    plots = [image for image in images if image["src"] and image["src"].endswith(".png")]
    assert plots and all(image["lightbox"] and image["href"] == image["src"] for image in plots), plots
    speed = {Path(image["src"]).name: image for image in visit["pages"]["speed-and-memory/"]["images"]}
    assert {"bench-cpu.png", "bench-cpu-memory.png"} <= set(speed)
    time_plot, memory_plot = speed["bench-cpu.png"], speed["bench-cpu-memory.png"]
    assert abs(time_plot["top"] - memory_plot["top"]) < 2 and memory_plot["left"] > time_plot["left"], (
        "the memory plot is not beside the speed plot")


def test_the_site_works_offline(visit: dict) -> None:
    # Material's header fetches the repository's facts (stars, forks, latest release) from GitHub's
    # API when it can; offline it leaves them out and the page is whole. Nothing else leaves the site.
    facts = "https://api.github.com/repos/" + urlparse(visit["header"]["source"]).path.strip("/")
    elsewhere = sorted({url for url in visit["requests"] if not url.startswith((visit["origin"], facts))
                        and not url.startswith(("data:", "blob:"))})
    assert not elsewhere, f"requests to other hosts (the site must work offline): {elsewhere}"
    failed = sorted({failure for failure in visit["failed"] if not failure.startswith(facts)})
    assert not failed, f"requests that failed: {failed}"
