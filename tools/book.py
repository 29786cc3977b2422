"""Build the static HTML book of the series: ``./dev book`` -> build/book/index.html.

    ./dev book                  # build, print the path of index.html
    ./dev book --clean          # forget the previous build first

What goes in (nothing is executed: the notebooks are shown with the outputs committed in them):
  README.md (the landing page), every notebooks/NN_*.ipynb in numeric order, every docs/*.md (docs/claims.md ...),
  data/README.md and benchmarks/README.md, and an API reference generated from nbconn's docstrings.

Why a staging directory: Sphinx reads documents only from one source tree, and the pages above live all over the
repository and link each other by their repository paths (README -> notebooks/04_connect.ipynb, notebook ->
07_many_connects.ipynb).  So the build copies them into build/book-src/ at the same relative paths, which keeps every
such link valid without editing a single file, and writes the one generated page (the toctree + API index).

Nothing is fetched when the book is read: Mermaid's browser bundle comes from the npm registry at build time
(``npm pack``, cached in build/book-cache/) and is served from the book's own _static/.  Sphinx runs with
``-W --keep-going``: any warning (broken link, missing image, page left out of the toctree) fails the build.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
SRC = os.path.join(BUILD, "book-src")      # staged sources (generated, never edited by hand)
OUT = os.path.join(BUILD, "book")          # the HTML book
CACHE = os.path.join(BUILD, "book-cache")  # npm tarball + the file taken from it
CONF = os.path.join(ROOT, "docs")          # conf.py, the small extension, templates

# Mermaid's self-contained browser build (an IIFE: one classic <script>, so it also works from file://,
# where Chromium refuses to load ES modules).  Pinned: the book must not change because npm did.
MERMAID_VERSION = "11.12.1"
MERMAID_FILE = "mermaid.min.js"

# Pages other than the notebooks, in the order the sidebar shows them (present ones only).
EXTRA_PAGES = ["data/README.md", "benchmarks/README.md"]

LINK = re.compile(r"\]\(([^()\s]+)\)")  # markdown links: [text](target)


def notebooks() -> list[str]:
    """notebooks/NN_*.ipynb, in numeric order (new ones are picked up without editing this file)."""
    paths = glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb"))
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def all_notebooks() -> list[str]:
    """The series plus every other notebook committed in notebooks/: all are staged, so a committed one that is not
    named NN_* is outside the toctree and fails the build instead of silently missing from the book.  (A reader's
    own untracked Untitled.ipynb from ./dev lab is left alone.)"""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "notebooks/*.ipynb"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        tracked = [p for p in out.stdout.split("\0") if p and "/" not in p[len("notebooks/"):]] \
            if out.returncode == 0 else []
    except OSError:  # no git: the series alone
        tracked = []
    return sorted(set(notebooks()) | {p for p in tracked if os.path.isfile(os.path.join(ROOT, p))})


def docs_pages() -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def public_modules() -> list[str]:
    """Every importable public module of nbconn (no _private, no __main__), packages before their modules."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "nbconn")):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")) and
                             os.path.exists(os.path.join(dirpath, d, "__init__.py")))
        package = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        found.append(package)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("_"):
                found.append(f"{package}.{name[:-3]}")
    return sorted(found, key=lambda m: m.split("."))


def _copy(rel: str, dest_rel: str | None = None) -> None:
    dest = os.path.join(SRC, dest_rel or rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy2(os.path.join(ROOT, rel), dest)  # copy2 keeps mtimes: Sphinx rebuilds only what changed


def _linked_files(rel: str) -> set[str]:
    """Repository files (not pages of the book) that a page links to, relative to the repository root."""
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        text = f.read()
    out = set()
    for target in LINK.findall(text):
        target = target.split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(rel), target))
        if (not path.startswith("..") and os.path.isfile(os.path.join(ROOT, path))
                and not path.endswith((".md", ".ipynb"))):
            out.add(path)
    return out


def _landing_page(pages: list[str], nbs: list[str]) -> str:
    """README.md, then the (hidden) table of contents that puts every page in the sidebar."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()

    def toctree(caption: str, entries: list[str]) -> str:
        lines = "\n".join(os.path.splitext(e)[0] for e in entries)
        return f"\n```{{toctree}}\n:hidden:\n:maxdepth: 1\n:caption: {caption}\n\n{lines}\n```\n"

    return (readme.rstrip() + "\n" + toctree("Notebooks", nbs)
            + toctree("Reference", pages + ["api/index.md"]))


def _api_index(modules: list[str]) -> str:
    rows = "\n".join(f"   {m}" for m in modules)
    return ("# API reference\n\n"
            "Generated from nbconn's docstrings (Sphinx autodoc + autosummary), one page per public module.\n\n"
            "```{eval-rst}\n.. autosummary::\n   :toctree: generated\n   :template: nbconn-module.rst\n\n"
            f"{rows}\n```\n")


def stage() -> None:
    """(Re)write build/book-src/ from the repository."""
    nbs, pages = notebooks(), [p for p in docs_pages() + EXTRA_PAGES if os.path.isfile(os.path.join(ROOT, p))]
    if not nbs:
        sys.exit("no notebooks/NN_*.ipynb found")
    sources = all_notebooks() + pages
    wanted = {"index.md", "api/index.md"} | set(sources)
    for rel in sources + ["README.md"]:
        for linked in _linked_files(rel):
            _copy(linked)
            wanted.add(linked)
    for rel in sources:
        _copy(rel)
    modules = public_modules()
    wanted |= {os.path.join("api", "generated", f"{m}.rst") for m in modules}
    for dirpath, _, filenames in os.walk(SRC):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), SRC)
            if rel not in wanted:  # a page or module removed from the repository disappears from the book too
                os.remove(os.path.join(dirpath, name))
    _write_if_changed("index.md", _landing_page(pages, nbs))
    _write_if_changed("api/index.md", _api_index(modules))


def _write_if_changed(rel: str, text: str) -> None:
    path = os.path.join(SRC, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def mermaid_bundle() -> str:
    """Path of Mermaid's browser bundle, taken once from the npm registry's tarball (``npm pack``)."""
    target = os.path.join(CACHE, f"mermaid-{MERMAID_VERSION}", MERMAID_FILE)  # written last: its presence = done
    if os.path.isfile(target):
        return target
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is needed once to fetch Mermaid's browser bundle (apt-get install npm)")
    os.makedirs(CACHE, exist_ok=True)
    proc = subprocess.run([npm, "pack", f"mermaid@{MERMAID_VERSION}", "--silent"], cwd=CACHE,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"npm pack mermaid@{MERMAID_VERSION} failed: {proc.stderr.strip()[-500:]}")
    tgz = os.path.join(CACHE, proc.stdout.strip().splitlines()[-1])
    with tarfile.open(tgz) as tar:
        # the licence travels with the bundle into the book's _static/
        for member, name in (("package/LICENSE", "mermaid.LICENSE.txt"), (f"package/dist/{MERMAID_FILE}", MERMAID_FILE)):
            data = tar.extractfile(member).read()
            out = os.path.join(os.path.dirname(target), name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out + ".tmp", "wb") as f:
                f.write(data)
            os.replace(out + ".tmp", out)  # the bundle appears whole or not at all
    os.remove(tgz)
    return target


def build(out: str = OUT, clean: bool = False) -> str:
    """Stage, then run Sphinx (warnings are errors); returns the path of index.html."""
    doctrees = os.path.join(BUILD, "book-doctrees")
    if clean:
        for d in (SRC, out, doctrees):
            shutil.rmtree(d, ignore_errors=True)
    stage()
    env = dict(os.environ, NBCONN_BOOK_MERMAID=mermaid_bundle(), NBCONN_ROOT=ROOT)
    argv = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", "-c", CONF,
            "-d", doctrees, SRC, out]
    if subprocess.run(argv, env=env, cwd=ROOT).returncode != 0:
        # Sphinx warns about a page only when it reads it: without this, the next (incremental) build would skip
        # the pages that warned and pass.
        shutil.rmtree(doctrees, ignore_errors=True)
        sys.exit("book build failed: see the warnings above (warnings are errors; build/book-src/X is a copy of X)")
    _prune(out)
    with open(os.path.join(out, "nbconn-book.json"), "w", encoding="utf-8") as f:  # for tests/test_book.py
        json.dump({"python": "%d.%d" % sys.version_info[:2]}, f)
    remote = offline_violations(out)
    if remote:
        sys.exit("the book would load things from the network:\n  " + "\n  ".join(remote[:20]))
    return os.path.join(out, "index.html")


def unexecuted_cells() -> list[str]:
    """Code cells committed without ever being run: the book would show them with no output at all."""
    found = []
    for rel in notebooks():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            cells = json.load(f).get("cells", [])
        missing = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and "".join(c.get("source", ""))
                   .strip() and c.get("execution_count") is None and not c.get("outputs")]
        if missing:
            found.append(f"{rel}: {len(missing)} code cell(s) never executed (cells {', '.join(map(str, missing))})")
    return found


def _prune(out: str) -> None:
    """Sphinx never deletes a page whose source is gone: drop those (and their _sources copies) from the book."""
    docs = {os.path.splitext(os.path.relpath(os.path.join(d, f), SRC))[0]
            for d, _, files in os.walk(SRC) for f in files if f.endswith((".md", ".ipynb", ".rst"))}
    docs |= {"genindex", "search", "py-modindex"}
    for html in glob.glob(os.path.join(out, "**", "*.html"), recursive=True):
        rel = os.path.relpath(html, out)
        if not rel.startswith("_") and rel[:-len(".html")] not in docs:
            os.remove(html)
            for source in glob.glob(os.path.join(out, "_sources", glob.escape(rel[:-len(".html")]) + ".*")):
                os.remove(source)


# <script src>, <link href>, <img src>, <iframe src>, <source src>, CSS url() and @import: what a browser fetches unasked.
_FETCHED = re.compile(r"""<(?:script|img|iframe|source|audio|video|embed)\b[^>]*?\bsrc\s*=\s*["']?([^"'\s>]+)"""
                      r"""|<link\b[^>]*?\bhref\s*=\s*["']?([^"'\s>]+)"""
                      r"""|url\(\s*["']?([^"')\s]+)"""
                      r"""|@import\s+["']([^"']+)""", re.I)


def offline_violations(out: str) -> list[str]:
    """Every absolute (http:, https:, protocol-relative) URL the book's pages or stylesheets would load."""
    found = []
    for path in glob.glob(os.path.join(out, "**", "*.html"), recursive=True) + \
            glob.glob(os.path.join(out, "_static", "**", "*.css"), recursive=True):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for match in _FETCHED.finditer(text):
            url = next(g for g in match.groups() if g)
            if re.match(r"^(?:https?:)?//", url, re.I):
                found.append(f"{os.path.relpath(path, out)}: {url}")
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev book", description="Build the static HTML book into build/book/.")
    parser.add_argument("--clean", action="store_true", help="discard the previous build first")
    args = parser.parse_args(argv)
    start = time.monotonic()
    index = build(clean=args.clean)
    for line in unexecuted_cells():  # shown as committed; say so, so that whoever committed it runs ./dev execute
        print(f"book: note: {line}: the book shows them without output (./dev execute)", file=sys.stderr)
    pages = sum(not os.path.relpath(p, OUT).startswith("_")  # _static/ holds theme templates, not pages
                for p in glob.glob(os.path.join(OUT, "**", "*.html"), recursive=True))
    print(f"book: {pages} pages in {time.monotonic() - start:.1f} s", file=sys.stderr)
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
