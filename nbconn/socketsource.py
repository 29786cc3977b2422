"""Where step 1's ``socket()`` runs: in this process (the default), or inside a lab network namespace.

A socket belongs to the network namespace it was created in, for its whole life:
``connect()`` on it routes, binds and sends there, whichever process holds it.
The lab's impaired link (:mod:`nbconn.lab.wire`) uses that.  As a normal user the
notebook cannot enter the link's namespaces, so a helper process that lives in them
creates each socket and passes the descriptor over an AF_UNIX socket
(``SCM_RIGHTS``); the flow then runs steps 2-5 on it as usual, and the trace says
where step 1 happened.

The flow asks :func:`current` once per attempt; ``with using(source):`` sets the
source for the calling thread (a :class:`contextvars.ContextVar`: another thread
keeps its own).  A source is any object with

* ``socket(family, type) -> socket.socket`` -- a new socket, made where the source
  makes them (raises OSError as ``socket()`` would, e.g. EMFILE);
* ``where`` -- a short text for the trace, e.g. ``"made in the lab's client
  namespace by pid 4242, passed over SCM_RIGHTS"``.

This module imports nothing from nbconn.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import socket as _socket


class SocketSource:
    """The interface a source has (any object with these two will do; no need to inherit).

    Not a typing.Protocol: importing typing would cost ``import nbconn`` a few ms.
    """

    where: str = ""

    def socket(self, family: int, type: int, *, timeout_s: float | None = None) -> _socket.socket:
        """A new socket; ``timeout_s`` is the connect's timer: a source that must ask another process for the
        socket (a lab helper) waits at most that long, so a wedged helper never outlasts the caller's deadline."""
        raise NotImplementedError


_current: contextvars.ContextVar = contextvars.ContextVar("nbconn_socket_source", default=None)


def current() -> SocketSource | None:
    """The source step 1 should use in this thread, or None: ``socket.socket`` right here."""
    return _current.get()


@contextlib.contextmanager
def using(source: SocketSource | None) -> Iterator[None]:
    """Within the block, step 1 of every connect in this thread asks ``source`` for its socket."""
    token = _current.set(source)
    try:
        yield
    finally:
        _current.reset(token)
