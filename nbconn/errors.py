"""What an errno means for a connect: nbconn's outcome, and nginx's verdict.

Two readers look at the same errno and decide different things:

* A person wants a plain word: did it connect, was it refused, did it time out?
  That is :func:`outcome_for`.
* nginx wants to know what to do next.  ``ngx_event_connect_peer``
  (nginx ``src/event/ngx_event_connect.c``) returns

  - ``NGX_OK``       when ``connect()`` returned 0 (connected at once),
  - ``NGX_AGAIN``    when it returned -1/EINPROGRESS (handshake under way; the
    caller, ``ngx_http_upstream_connect`` in ``src/http/ngx_http_upstream.c``,
    then arms the connect timer with ``ngx_add_timer(c->write,
    u->conf->connect_timeout)``),
  - ``NGX_DECLINED`` for *every other* ``connect()`` errno: the socket is closed
    and the upstream moves to the next peer.  nginx only changes the *log level*:
    ECONNREFUSED, ECONNRESET, ENETDOWN, ENETUNREACH, EHOSTDOWN, EHOSTUNREACH
    and, on Linux, EAGAIN (an AF_UNIX listener whose backlog is full) are logged
    at ``error``; anything else at ``crit`` (something is wrong with this host,
    not with the peer),
  - ``NGX_ERROR``    when a step *before* ``connect()`` failed: ``socket()``
    (e.g. EMFILE), ``ioctl(FIONBIO)``, ``bind()``, or ``epoll_ctl()``.  The HTTP
    upstream then answers 500 instead of trying another peer.

  When the handshake was pending, the decision comes later:
  ``ngx_http_upstream_test_connect`` reads ``getsockopt(SO_ERROR)``: 0 means
  ``NGX_OK``, any errno means ``NGX_ERROR`` and ``ngx_http_upstream_next(...,
  NGX_HTTP_UPSTREAM_FT_ERROR)``.  If the write event's *timer* fires first,
  ``ngx_http_upstream_next(..., NGX_HTTP_UPSTREAM_FT_TIMEOUT)`` runs and the
  socket is closed without reading SO_ERROR at all.

This module holds those tables and nothing else: no sockets, no I/O.
"""

from __future__ import annotations

import errno as _errno
import os

# -- nbconn's outcomes -------------------------------------------------------

CONNECTED = "connected"
REFUSED = "refused"
TIMED_OUT = "timed_out"
RESET = "reset"
UNREACHABLE = "unreachable"
ERROR = "error"

OUTCOMES = (CONNECTED, REFUSED, TIMED_OUT, RESET, UNREACHABLE, ERROR)

_OUTCOME_BY_ERRNO = {
    _errno.ECONNREFUSED: REFUSED,
    # Linux: a full AF_UNIX backlog makes a non-blocking connect() fail with
    # EAGAIN; nginx treats it exactly like ECONNREFUSED (see module docstring).
    _errno.EAGAIN: REFUSED,
    _errno.ETIMEDOUT: TIMED_OUT,
    _errno.ECONNRESET: RESET,
    _errno.ENETUNREACH: UNREACHABLE,
    _errno.EHOSTUNREACH: UNREACHABLE,
    _errno.ENETDOWN: UNREACHABLE,
    _errno.EHOSTDOWN: UNREACHABLE,
}


def outcome_for(err: int) -> str:
    """The plain-word outcome of a connect that ended with errno ``err`` (0 = connected)."""
    if err == 0:
        return CONNECTED
    return _OUTCOME_BY_ERRNO.get(err, ERROR)


# -- nginx's codes ------------------------------------------------------------

NGX_OK = "NGX_OK"
NGX_AGAIN = "NGX_AGAIN"
NGX_DECLINED = "NGX_DECLINED"
NGX_ERROR = "NGX_ERROR"

#: connect() errnos that ngx_event_connect_peer logs at "error" (the peer's
#: fault: try the next one).  Every other errno is logged at "crit".
NGX_CONNECT_ERR_LEVEL_ERRNOS = frozenset(
    {
        _errno.ECONNREFUSED,
        _errno.EAGAIN,  # Linux only, AF_UNIX backlog full
        _errno.ECONNRESET,
        _errno.ENETDOWN,
        _errno.ENETUNREACH,
        _errno.EHOSTDOWN,
        _errno.EHOSTUNREACH,
    }
)


def ngx_connect_code(connect_err: int) -> str:
    """nginx's return code from ngx_event_connect_peer for what connect() returned.

    ``connect_err`` is 0 for success, else the errno of the failed call.
    """
    if connect_err == 0:
        return NGX_OK
    if connect_err == _errno.EINPROGRESS:
        return NGX_AGAIN
    return NGX_DECLINED


def ngx_log_level(connect_err: int) -> str:
    """The level nginx logs an immediate connect() failure at: "error" or "crit"."""
    return "error" if connect_err in NGX_CONNECT_ERR_LEVEL_ERRNOS else "crit"


def errno_name(err: int | None) -> str | None:
    """``111`` -> ``"ECONNREFUSED"``; 0 and None -> None (no error); unknown numbers -> ``"E<n>"``."""
    if not err:
        return None
    return _errno.errorcode.get(err, f"E{err}")


def errno_number(name: str) -> int:
    """``"ECONNREFUSED"`` -> 111 (the inverse of :func:`errno_name`)."""
    value = getattr(_errno, name, None)
    if isinstance(value, int):
        return value
    if name.startswith("E") and name[1:].isdigit():
        return int(name[1:])
    raise ValueError(f"unknown errno name {name!r}")


def strerror(err: int) -> str:
    """The C library's text for an errno, as nginx prints it: ``(111: Connection refused)``."""
    return f"({err}: {os.strerror(err)})"


_SETUP_TEXT = {
    "socket": "socket() failed",
    "nonblocking": "ioctl(FIONBIO) failed",
    "bind": "bind() failed",
    "epoll_ctl": "epoll_ctl(EPOLL_CTL_ADD) failed",
}


def ngx_error_log_line(*, stage: str, err: int, peer: str = "<peer>") -> str:
    """The line nginx's error log would carry for this failure (without the date/level prefix).

    ``stage`` is "socket", "nonblocking", "bind", "epoll_ctl" (a step before
    connect(), from ngx_event_connect_peer), "connect" (connect() failed at
    once, ngx_event_connect_peer), "so_error" (ngx_http_upstream_test_connect)
    or "timer" (ngx_http_upstream_next with NGX_HTTP_UPSTREAM_FT_TIMEOUT).
    nginx appends its current action, "while connecting to upstream".
    """
    tail = "while connecting to upstream"
    if stage == "timer":
        return f"upstream timed out {strerror(_errno.ETIMEDOUT)} {tail}"
    if stage == "connect":
        return f"connect() to {peer} failed {strerror(err)} {tail}"
    if stage == "so_error":
        return f"connect() failed {strerror(err)} {tail}"
    return f"{_SETUP_TEXT.get(stage, stage + ' failed')} {strerror(err)} {tail}"
