"""What the nbconn book needs beyond the stock toolchain.  Two jobs:

1. Mermaid without the web.  sphinxcontrib-mermaid writes each diagram as ``<pre class="mermaid">`` (good) and then
   loads Mermaid as an ES module from jsdelivr (not good: the book must never call out).  Pointing it at a local
   ``.mjs`` is not enough either: Chromium refuses ES-module imports from file:// pages, and a reader opens
   build/book/index.html straight from disk.  So its page hook is replaced by ours, which adds Mermaid's classic
   browser bundle (fetched from the npm registry at build time by tools/book.py) from the book's own _static/ on
   the pages that have a diagram, and runs it once the page has loaded.

2. Docstring markup.  The API pages come from nbconn's docstrings, which other parts of the project edit all the
   time; a docutils complaint about one of them (an indented line, a table column one space off) is reported in a
   summary at the end of the build instead of failing the book.  Everything else stays an error under ``-W``:
   broken cross-references (also inside docstrings), missing images, pages left out of the toctree.

3. Widgets.  A stored ipywidgets output is only a reference to a model in a kernel; without the kernel (and without
   the widget manager from a CDN) it would render as nothing.  Each such output becomes a visible note that says
   where the panel comes alive: JupyterLab.  Done here, at build time, so notebooks stay exactly as committed.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MERMAID_JS = "mermaid.min.js"

# Theme-aware start: sphinx-book-theme flips <html data-theme> between light and dark.
MERMAID_START = """
window.addEventListener("load", function () {
  var dark = document.documentElement.dataset.theme === "dark";
  mermaid.initialize({startOnLoad: false, theme: dark ? "dark" : "default", securityLevel: "strict"});
  mermaid.run({querySelector: "pre.mermaid"}).catch(function (err) { console.error("mermaid:", err); });
});
"""


def _use_local_mermaid(app: Sphinx) -> None:
    bundle = os.environ.get("NBCONN_BOOK_MERMAID")
    if not bundle or not os.path.isfile(bundle):
        raise RuntimeError("NBCONN_BOOK_MERMAID must name Mermaid's bundle: build the book with ./dev book")
    if os.path.dirname(bundle) not in app.config.html_static_path:  # conf.py puts it there: _static/mermaid.min.js
        raise RuntimeError("html_static_path must hold the directory of NBCONN_BOOK_MERMAID")
    from sphinxcontrib import mermaid as sphinx_mermaid

    # Drop sphinxcontrib-mermaid's page hook (the one that adds the CDN module import); keep its directive.
    for listener in list(app.events.listeners.get("html-page-context", [])):
        if listener.handler is sphinx_mermaid.install_js:
            app.disconnect(listener.id)


def _add_mermaid(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    from sphinxcontrib.mermaid import mermaid as mermaid_node

    if doctree is None or doctree.next_node(mermaid_node) is None:
        return
    app.add_js_file(MERMAID_JS)
    app.add_js_file(None, body=MERMAID_START)


def _drop_init_directives(app: Sphinx, doctree: nodes.document) -> None:
    """A diagram's ``%%{init: ...}%%`` line (notebook 00 asks JupyterLab for larger text with one) stops the book's
    Mermaid bundle from drawing that diagram at all, with no error: the book drops the line (its CSS sizes text)."""
    from sphinxcontrib.mermaid import mermaid as mermaid_node

    for node in doctree.findall(mermaid_node):
        code = node.get("code", "")
        lines = code.splitlines()
        kept = [line for line in lines if not line.strip().startswith("%%{init")]
        if len(kept) != len(lines):
            node["code"] = "\n".join(kept)


def _widget_note(app: Sphinx, doctree: nodes.document) -> None:
    for raw in list(doctree.findall(nodes.raw)):
        if raw.get("format") != "html" or WIDGET_VIEW not in raw.astext():
            continue
        note = nodes.admonition(classes=["note", "nbconn-widget"])
        note += nodes.title(text="Live widget: run this notebook in JupyterLab")
        para = nodes.paragraph()
        para += nodes.Text("This cell shows an interactive ipywidgets panel. It needs a running Python kernel, "
                           "which a static page has not got. Run the notebook in JupyterLab (")
        para += nodes.literal(text="./dev lab")
        para += nodes.Text(") to use it; the book shows the cell's code and the outputs that do not need a kernel.")
        note += para
        raw.replace_self(note)


_docstring_markup: list[str] = []


class _DocstringMarkup(logging_std.Filter):
    """Take docutils' markup complaints about docstrings out of the warning stream (see 2. above)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        location = str(getattr(record, "location", "") or "")
        if getattr(record, "type", "") == "docutils" and "docstring of " in location:
            message = record.getMessage().splitlines()[0]
            _docstring_markup.append(f"{os.path.relpath(location.split(':docstring')[0])}: "
                                     f"{location.split('docstring of ')[-1]}: {message}")
            return False
        return True


def _install_docstring_filter(app: Sphinx) -> None:
    for handler in logging_std.getLogger("sphinx").handlers:
        if isinstance(handler, logging.WarningStreamHandler):
            handler.filters.insert(0, _DocstringMarkup())  # before Sphinx counts it as a warning


def _report_docstring_markup(app: Sphinx, exception) -> None:
    if _docstring_markup:
        found = sorted(set(_docstring_markup))
        # stderr, not the logger: `./dev book` runs Sphinx with -q, and these should be seen
        print(f"nbconn_book: {len(found)} docstring markup problem(s) shown as plain text, not failing the book "
              "(fix them in nbconn/):\n  " + "\n  ".join(found), file=sys.stderr)


def setup(app: Sphinx) -> dict:
    _install_docstring_filter(app)
    app.connect("build-finished", _report_docstring_markup)
    app.setup_extension("sphinxcontrib.mermaid")
    app.connect("builder-inited", _use_local_mermaid)
    app.connect("html-page-context", _add_mermaid)
    app.connect("doctree-read", _widget_note)
    app.connect("doctree-read", _drop_init_directives)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
