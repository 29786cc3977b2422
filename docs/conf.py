"""Sphinx configuration of the nbconn book.  Build it with ``./dev book`` (tools/book.py), not sphinx-build:
the build stages README, notebooks and docs into build/book-src/ first and passes this directory with ``-c``."""

import os
import sys

ROOT = os.environ.get("NBCONN_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                          # autodoc imports this checkout's nbconn
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "nbconn"
author = "the nbconn authors"
copyright = "the nbconn authors"
root_doc = "index"

extensions = [
    "myst_nb",                    # notebooks (stored outputs) and markdown pages
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinxcontrib.mermaid",
    "nbconn_book",                # docs/_ext/nbconn_book.py: offline Mermaid, widget note
]

# --- notebooks: shown as committed, never executed ------------------------------------------------------------
nb_execution_mode = "off"
nb_ipywidgets_js = {}             # no require.js, no @jupyter-widgets/html-manager from a CDN
nb_merge_streams = True           # one block per stream, as JupyterLab shows it
myst_fence_as_directive = ["mermaid"]   # ```mermaid fences (JupyterLab renders them natively) -> diagrams
myst_heading_anchors = 3          # [text](#a-heading) links, as in JupyterLab
myst_enable_extensions = ["colon_fence"]   # no dollarmath: "$upstream_addr" is an nginx variable, not TeX

# --- Mermaid: drawn in the browser from the book's own copy (see nbconn_book.py) --------------------------------
mermaid_output_format = "raw"

# --- API reference -----------------------------------------------------------------------------------------------
autosummary_generate = True
# ignore-module-all: each object is documented once, where it is defined (nbconn.api.connect, not also
# nbconn.connect), so a type like `Target` in a signature has one target, not two.
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_mock_imports = ["trio", "uvloop"]  # optional extras (test/bench) that ./dev book does not install
autodoc_typehints = "description"
autodoc_preserve_defaults = True  # show `timeout=5.0`, not the evaluated object
default_role = "code"             # `x` in a docstring reads as code, as in the markdown pages
templates_path = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "_templates")]  # absolute: the sources are staged elsewhere
suppress_warnings = []

# --- HTML -------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "nbconn: nginx's non-blocking connect, run for real"
# the book's CSS, and Mermaid's browser bundle that tools/book.py took from the npm registry (see nbconn_book.py)
html_static_path = ["_static"] + ([os.path.dirname(os.environ["NBCONN_BOOK_MERMAID"])]
                                  if os.environ.get("NBCONN_BOOK_MERMAID") else [])
html_css_files = ["nbconn-book.css"]
html_js_files = ["nbconn-book.js"]  # phone: figures open full size; Mermaid redrawn when the theme changes
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "use_download_button": True,  # the .ipynb itself, from the book (local file)
    "use_repository_button": False,
    "launch_buttons": {},         # no Binder/Colab: nothing leaves the reader's machine
    "navigation_with_keys": False,
    "search_bar_text": "Search the book...",
    # notebooks and docs/ (the claims table) use the whole width, as in JupyterLab: traces, log lines and the
    # claims are wide; the other pages keep the in-page table of contents on the right
    "secondary_sidebar_items": {"notebooks/*": [], "index": ["page-toc"], "api/**": ["page-toc"],
                                "docs/*": [], "data/*": ["page-toc"], "benchmarks/*": ["page-toc"]},
}
html_last_updated_fmt = None
html_copy_source = True
html_show_sphinx = False
html_context = {"default_mode": "light"}  # as JupyterLab opens; an unset mode makes the theme log a console error
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
