"""nbconn: nginx's client-side non-blocking TCP connect, run for real and measured.

The five steps of ``ngx_event_connect_peer`` (nginx ``src/event/ngx_event_connect.c``):

1. ``socket()``
2. socket options (set, then read back what the kernel kept)
3. non-blocking: ``ioctl(FIONBIO)``
4. ``epoll_ctl(ADD, EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET)``
5. ``connect()``: 0, or EINPROGRESS -> timer + writable -> ``getsockopt(SO_ERROR)``

Quick start::

    import nbconn
    with nbconn.lab.listening() as target:
        res = nbconn.connect(target)
        print(res.trace())

Where things live: :mod:`nbconn.flow` (one attempt, the five steps),
:mod:`nbconn.loop` (epoll + timer heap), :mod:`nbconn.options`,
:mod:`nbconn.errors` (errno -> outcome, nginx's codes), :mod:`nbconn.targets`,
:mod:`nbconn.lab` (local peers that behave or misbehave on purpose).

``import nbconn`` stays light: matplotlib and ipywidgets load only when you use
the plots or widgets.
"""

from __future__ import annotations

import importlib
import sys

try:
    from .api import connect, connect_many
    from .result import Result, Step
    from .targets import Target, parse_target
except KeyboardInterrupt:
    # Ctrl-C while `python -m nbconn` (argv[0] is "-m" while Python locates the module) or the `nbconn`
    # script is still importing: one line and exit 130, as nbconn.cli.main does later.  A library
    # import (a notebook, pytest) gets its KeyboardInterrupt back untouched.
    if sys.argv[:1] == ["-m"] or sys.argv[0].rsplit("/", 1)[-1] == "nbconn":
        sys.stderr.write("nbconn: interrupted\n")
        raise SystemExit(130) from None
    raise

__version__ = "0.1.0"

__all__ = ["connect", "connect_many", "Result", "Step", "Target", "parse_target", "__version__"]

_LAZY_SUBMODULES = ("lab", "measure", "plots", "widgets", "data", "upstream", "nginx", "cli")


def __getattr__(name: str):
    """Load heavier submodules on first use: ``nbconn.lab``, ``nbconn.plots``, ..."""
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'nbconn' has no attribute {name!r}")
