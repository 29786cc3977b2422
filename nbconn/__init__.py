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

The public surface here: :func:`connect`, :func:`connect_many` (:mod:`nbconn.api`),
:class:`Settings` (:mod:`nbconn.settings`: how to connect, validated once; every entry point takes one),
:class:`Result`, :class:`Step` (:mod:`nbconn.result`), :class:`Target`,
:func:`parse_target` (:mod:`nbconn.targets`).  Everything else is a module of its own,
imported by name (``from nbconn import lab``, ``from nbconn.experiments import measure``,
``from nbconn.view import plots``); README.md's Architecture
section says which module may import which.

Why the names load on first use (PEP 562 ``__getattr__``) rather than with ``import``
statements here: ``python -m nbconn`` imports this package before ``nbconn.__main__``
can catch a Ctrl-C, so this file imports nothing -- a Ctrl-C at start-up lands in
``__main__``'s handler (one line, exit 130), and ``import nbconn`` stays light
(matplotlib and ipywidgets load only when you use the plots or widgets).
"""

from __future__ import annotations

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "connect": "api", "connect_many": "api", "Settings": "settings",
    "Result": "result", "Step": "result",
    "Target": "targets", "parse_target": "targets",
}

__all__ = [*_PUBLIC, "__version__"]


#: submodules reachable as attributes after a bare ``import nbconn`` (``nbconn.lab.listening()``)
_SUBMODULES = ("lab", "nginx", "experiments", "view", "cli")


def __getattr__(name: str):
    """``nbconn.connect`` etc. from their modules, and ``nbconn.lab`` etc., on first use."""
    import importlib

    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'nbconn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])
