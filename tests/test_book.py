"""The static book (./dev book) in a real browser: every page opened from disk in headless Chromium.

Each page must load with no console error and no uncaught exception, every <img> must have loaded
(naturalWidth > 0), every Mermaid diagram must have been drawn, and the page must not ask for anything outside
file:// (or 127.0.0.1): requests elsewhere are recorded and aborted, so the check itself never leaves the machine.
A full-page screenshot of every page is kept in build/book-check/ (NBCONN_BOOK_CHECK_DIR overrides) for a human.

The book under test is $NBCONN_BOOK_DIR when set (.ci/run builds it once with ./dev book); otherwise this test
(re)builds build/book/ as ./dev book does when the book toolchain is installed (./dev book installs it), and skips
(fails in CI) when it is not.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from urllib.parse import urlparse

import pytest

from .conftest import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_DIR = os.environ.get("NBCONN_BOOK_CHECK_DIR") or os.path.join(ROOT, "build", "book-check")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
PAGE_TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.book, pytest.mark.slow]


def _missing(message: str):
    if os.environ.get("NBCONN_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _book_tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import book
    finally:
        sys.path.pop(0)
    return book


@pytest.fixture(scope="module")
def book_dir():
    given = os.environ.get("NBCONN_BOOK_DIR")
    if given:
        index = os.path.join(given, "index.html")
        if not os.access(index, os.R_OK):
            if os.geteuid() != 0:  # another user's build this user cannot read: the leg that built it checks it
                pytest.skip(f"NBCONN_BOOK_DIR={given}: no readable index.html for this user")
            pytest.fail(f"NBCONN_BOOK_DIR={given} has no index.html (run ./dev book)")
        return given
    if not all(importlib.util.find_spec(m) for m in ("sphinx", "myst_nb", "sphinx_book_theme")):
        _missing("the book toolchain is not installed (./dev book installs the `book` extra)")
    # what ./dev book does (incremental: seconds when little changed), so the book checked is this checkout's
    try:
        return os.path.dirname(_book_tool().build())
    except SystemExit as failed:  # the build's own one-line reason (the warnings are printed above it)
        pytest.fail(f"./dev book failed: {failed}")


def _built_on(book_dir: str) -> str | None:
    """The Python (major.minor) that built the book, from the note tools/book.py leaves in it."""
    import json

    try:
        with open(os.path.join(book_dir, "nbconn-book.json"), encoding="utf-8") as f:
            return json.load(f).get("python")
    except (OSError, ValueError):
        return None


def _pages(book_dir: str) -> list[str]:
    return sorted(os.path.relpath(p, book_dir) for p in glob.glob(os.path.join(book_dir, "**", "*.html"),
                                                                  recursive=True)
                  if not os.path.relpath(p, book_dir).startswith("_"))  # _static/ holds templates, not pages


def test_every_notebook_and_page_is_in_the_book(book_dir):
    pages = set(_pages(book_dir))
    notebooks = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
    assert notebooks, "no notebooks found"
    missing = [nb for nb in notebooks if f"notebooks/{nb[:-len('.ipynb')]}.html" not in pages]
    assert not missing, f"notebooks without a page in the book: {missing}"
    for extra in ("api/index.html", "data/README.html", "benchmarks/README.html"):
        if os.path.exists(os.path.join(ROOT, extra.replace(".html", ".md").replace("api/index.md", "nbconn"))):
            assert extra in pages, f"{extra} is missing from the book"
    with open(os.path.join(book_dir, "index.html"), encoding="utf-8") as f:
        index = f.read()
    # the landing page is the README, and its sidebar leads to every notebook in numeric order
    assert "Read it without running" in index
    order = [index.find(f'href="notebooks/{nb[:-len(".ipynb")]}.html"') for nb in notebooks]
    assert all(i >= 0 for i in order) and order == sorted(order), \
        f"sidebar does not list the notebooks in order: {list(zip(notebooks, order))}"


def test_nothing_is_loaded_from_the_network_by_the_html(book_dir):
    remote = _book_tool().offline_violations(book_dir)
    assert not remote, "absolute URLs the book would fetch:\n" + "\n".join(remote)


def test_widget_outputs_become_a_run_it_in_jupyterlab_note(book_dir):
    path = os.path.join(book_dir, "notebooks")
    widget_pages = [p for p in glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb"))
                    if "application/vnd.jupyter.widget-view+json" in open(p, encoding="utf-8").read()]
    for nb in widget_pages:
        with open(os.path.join(path, os.path.basename(nb)[:-len(".ipynb")] + ".html"), encoding="utf-8") as f:
            html = f.read()
        assert "run this notebook in JupyterLab" in html, nb
        assert 'type="application/vnd.jupyter.widget-view+json"' not in html, nb


def _allowed(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme in ("file", "data", "blob", "about"):
        return True
    return parsed.scheme in ("http", "https", "ws") and parsed.hostname in ("127.0.0.1", "localhost")


def _check_page(context, book_dir: str, rel: str, check_dir: str) -> list[str]:
    problems: list[str] = []
    outside: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: _allowed(r.url) and
            problems.append(f"failed to load {r.url}: {r.failure}"))
    page.on("request", lambda r: None if _allowed(r.url) else outside.append(r.url))
    try:
        page.goto("file://" + os.path.join(book_dir, rel), wait_until="load", timeout=PAGE_TIMEOUT_MS)
        diagrams = page.locator("pre.mermaid").count()
        if diagrams:
            try:
                page.wait_for_function(
                    "() => [...document.querySelectorAll('pre.mermaid')].every(e => e.querySelector('svg'))",
                    timeout=PAGE_TIMEOUT_MS)
            except Exception:
                problems.append(f"{diagrams} Mermaid diagram(s), not all drawn")
        # images: load the lazy ones too, then every one must have pixels
        broken = page.evaluate("""async () => {
            const imgs = [...document.images];
            imgs.forEach(i => { i.loading = "eager"; });
            await Promise.all(imgs.map(i => i.decode().catch(() => null)));
            return imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
        }""")
        problems += [f"image not loaded: {src[:120]}" for src in broken]
        shot = os.path.join(check_dir, re.sub(r"\.html$", ".png", rel))
        os.makedirs(os.path.dirname(shot), exist_ok=True)
        page.screenshot(path=shot, full_page=True)
    finally:
        page.close()
    problems += [f"request outside file:// and 127.0.0.1: {u}" for u in outside]
    return problems


@pytest.mark.timeout(900)
def test_every_page_in_headless_chromium(book_dir, tmp_path_factory):
    built_on = _built_on(book_dir)
    here = "%d.%d" % sys.version_info[:2]
    if os.environ.get("NBCONN_BOOK_DIR") and built_on and built_on != here:
        # CI's legs on other interpreters: the HTML does not depend on the interpreter that reads the test
        pytest.skip(f"the book was built and is checked on Python {built_on}; this is {here}")
    chromium = require_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (the test extra)")
    pages = _pages(book_dir)
    assert "index.html" in pages
    check_dir = CHECK_DIR
    try:
        os.makedirs(check_dir, exist_ok=True)
    except OSError:  # e.g. an unprivileged leg of CI in root's checkout: keep them elsewhere, and say where
        check_dir = str(tmp_path_factory.mktemp("book-check"))
    for old in glob.glob(os.path.join(check_dir, "**", "*.png"), recursive=True):
        os.remove(old)  # screenshots of this run only (a page removed from the book leaves none behind)
    print(f"screenshots: {check_dir}")
    found: dict[str, list[str]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
            # Anything not local is aborted before it leaves (and recorded by the page's request hook).
            context.route(re.compile(r"^(?!file:|data:|blob:|about:).*"),
                          lambda route: route.continue_() if _allowed(route.request.url) else route.abort())
            for rel in pages:
                problems = _check_page(context, book_dir, rel, check_dir)
                if problems:
                    found[rel] = problems
        finally:
            browser.close()
    assert not found, "\n".join(f"{rel}:\n  " + "\n  ".join(p) for rel, p in found.items())


@pytest.mark.timeout(600)
def test_a_broken_link_or_a_missing_image_fails_the_build(tmp_path):
    """Warnings are errors: a copy of the project whose notebook links a notebook that does not exist and shows an
    image that is not there must not build, and the failure must name both (--keep-going reports all)."""
    if not all(importlib.util.find_spec(m) for m in ("sphinx", "myst_nb", "sphinx_book_theme")):
        if os.environ.get("NBCONN_BOOK_DIR"):  # CI's other legs: the leg that built the book has the toolchain
            pytest.skip("the book toolchain is in the environment that built $NBCONN_BOOK_DIR, not here")
        _missing("the book toolchain is not installed (./dev book installs the `book` extra)")
    import json
    import shutil
    import subprocess

    for rel in ("README.md", "tools", "docs", "nbconn", "data", "benchmarks"):
        src = os.path.join(ROOT, rel)
        if os.path.isdir(src):
            shutil.copytree(src, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__", "results", "build"))
        elif os.path.exists(src):
            shutil.copy2(src, tmp_path / rel)
    first_two = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))[:2]
    (tmp_path / "notebooks").mkdir()
    for nb in first_two:
        shutil.copy2(nb, tmp_path / "notebooks")
    cache = os.path.join(ROOT, "build", "book-cache")
    if os.path.isdir(cache):  # Mermaid's bundle, already taken from npm: no second download
        (tmp_path / "build").mkdir()
        os.symlink(cache, tmp_path / "build" / "book-cache")
    broken = tmp_path / "notebooks" / os.path.basename(first_two[1])
    nb = json.loads(broken.read_text(encoding="utf-8"))
    nb["cells"].insert(1, {"cell_type": "markdown", "id": "broken-on-purpose", "metadata": {},
                           "source": ["See [the missing one](99_not_there.ipynb) and ![a plot](missing.png).\n"]})
    broken.write_text(json.dumps(nb), encoding="utf-8")
    # The README's table links every notebook: keep only the rows of the two copied, so that is not what fails.
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    kept = {os.path.basename(p) for p in first_two}
    readme = "\n".join(line for line in readme.splitlines()
                       if not re.search(r"notebooks/\d\d_\w+\.ipynb", line) or
                       all(name in kept for name in re.findall(r"notebooks/(\d\d_\w+\.ipynb)", line)))
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")

    proc = subprocess.run([sys.executable, str(tmp_path / "tools" / "book.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode != 0, "the book built although a link and an image are broken"
    assert "99_not_there.ipynb" in proc.stderr and "xref_missing" in proc.stderr, proc.stderr[-3000:]
    assert "missing.png" in proc.stderr and "image.not_readable" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "build" / "book-doctrees").exists(), "a failed build must forget its doctrees"


#: a phone's viewport (CSS px): the learner read the book at 390 px
PHONE = {"width": 390, "height": 844}


@pytest.mark.timeout(900)
def test_every_page_fits_a_phone(book_dir, tmp_path_factory):
    """At 390 px no page pans sideways, and a wide figure or a Mermaid diagram keeps a readable width inside its
    own scroller (a tap opens a figure full size, and a line above it says it scrolls) instead of being shrunk to
    the column's ~358 px.

    genindex.html, Sphinx's generated index of names, is the one page left out: a table of long names."""
    chromium = require_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (the test extra)")
    pages = [rel for rel in _pages(book_dir) if rel != "genindex.html"]
    found: dict[str, list[str]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=PHONE, service_workers="block")
            context.route(re.compile(r"^(?!file:|data:|blob:|about:).*"),
                          lambda route: route.continue_() if _allowed(route.request.url) else route.abort())
            for rel in pages:
                page = context.new_page()
                try:
                    page.goto("file://" + os.path.join(book_dir, rel), wait_until="load", timeout=PAGE_TIMEOUT_MS)
                    if page.locator("pre.mermaid").count():
                        page.wait_for_function("() => [...document.querySelectorAll('pre.mermaid')]"
                                               ".every(e => e.querySelector('svg'))", timeout=PAGE_TIMEOUT_MS)
                    problems = []
                    width = page.evaluate("document.documentElement.scrollWidth")
                    if width > PHONE["width"] + 1:
                        problems.append(f"the page pans sideways: {width} px wide at {PHONE['width']} px")
                    shrunk = page.evaluate("""async () => {
                        const imgs = [...document.querySelectorAll('.cell_output img')];
                        await Promise.all(imgs.map(i => i.decode().catch(() => null)));
                        return imgs.filter(i => i.naturalWidth > 600 && i.getBoundingClientRect().width < 600)
                                   .map(i => `${i.naturalWidth} px figure drawn ${Math.round(i.getBoundingClientRect().width)} px wide`
                                             + (i.closest('a.nbconn-figure') ? '' : ', no tap-to-open link'));
                    }""")
                    problems += shrunk
                    # a figure that scrolls says so above it: a cut-off figure with no sign of more misleads
                    problems += page.evaluate("""[...document.querySelectorAll('.cell_output img')]
                        .filter(i => i.getBoundingClientRect().width > i.closest('.cell_output').clientWidth + 8)
                        .filter(i => { const h = i.closest('a.nbconn-figure')?.previousElementSibling;
                                       return !(h && h.matches('.nbconn-scroll-hint') && h.offsetHeight > 0); })
                        .map(i => `${i.naturalWidth} px figure scrolls with no hint under it`)""")
                    problems += page.evaluate("""[...document.querySelectorAll('pre.mermaid svg')]
                        .filter(s => s.getBoundingClientRect().width < 600)
                        .map(s => `Mermaid diagram drawn ${Math.round(s.getBoundingClientRect().width)} px wide`)""")
                    if problems:
                        found[rel] = problems
                finally:
                    page.close()
        finally:
            browser.close()
    assert not found, "\n".join(f"{rel}:\n  " + "\n  ".join(p) for rel, p in found.items())
