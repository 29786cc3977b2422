"""The verdict on a connect, as data: (stage, errno) -> outcome, nginx's code, next-upstream kind, log level, line.

Everything nbconn decides about a connect is decided here, by :func:`verdict`,
a pure function over the table :data:`VERDICT_TABLE`: no sockets, no clock, no
I/O (h11's style: the rules are values a test can check without a network).
:mod:`nbconn.flow` does the syscalls and asks this module what each result means.

The rules are nginx 1.22.1's, read from its source (tag ``release-1.22.1``):

* ``ngx_event_connect_peer`` (src/event/ngx_event_connect.c, lines 20-329)
  starts a connect and returns a code:

  - ``NGX_ERROR`` when a step before ``connect()`` fails: ``socket()`` (ALERT,
    line 47), ``setsockopt(SO_RCVBUF)`` (ALERT, ``goto failed``, line 70),
    ``ioctl(FIONBIO)`` (ALERT, line 89), ``bind()`` (CRIT, line 153), or
    ``epoll_ctl(EPOLL_CTL_ADD)`` (``ngx_epoll_add_connection`` in
    src/event/modules/ngx_epoll_module.c, ALERT, line 712); also
    ``ngx_get_connection`` finding no free connection ("N worker_connections are
    not enough", src/core/ngx_connection.c line 1118, ALERT, no errno; line 53
    of ngx_event_connect.c returns NGX_ERROR) -- the most common of them in
    practice -- and ``proxy_bind ... transparent``'s
    ``setsockopt(IP_TRANSPARENT)`` (``ngx_event_connect_set_transparent``,
    ALERT, line 362; ``goto failed``, line 100).  The HTTP upstream then answers
    500 (``ngx_http_upstream_connect``, src/http/ngx_http_upstream.c line 1544):
    no next peer is tried, and ``ngx_http_upstream_finalize_request`` frees the
    peer as a success (line 4484, state 0): no failure is counted.
  - A failing ``setsockopt(SO_KEEPALIVE)`` is logged "failed, ignored" (ALERT,
    line 83) and the connect goes on; so is ``IP_BIND_ADDRESS_NO_PORT`` (line
    122), silently when the errno is EOPNOTSUPP or ENOPROTOOPT.
  - ``NGX_OK`` when ``connect()`` returned 0, ``NGX_AGAIN`` for -1/EINPROGRESS.
  - ``NGX_DECLINED`` for every other ``connect()`` errno (line 246); the caller
    moves on with ``ngx_http_upstream_next(r, u, NGX_HTTP_UPSTREAM_FT_ERROR)``
    (ngx_http_upstream.c line 1559).  Only the log level depends on the errno
    (lines 220-238): ECONNREFUSED, EAGAIN (Linux: a full AF_UNIX backlog),
    ECONNRESET, ENETDOWN, ENETUNREACH, EHOSTDOWN, EHOSTUNREACH at ERR (the
    peer's fault), anything else at CRIT (this host's fault).

* ``ngx_http_upstream_test_connect`` (ngx_http_upstream.c lines 2732-2779)
  judges a pending connect once the socket is writable: ``getsockopt(SO_ERROR)``
  0 is ``NGX_OK``; an errno is ``NGX_ERROR``, logged through
  ``ngx_connection_error`` (src/core/ngx_connection.c lines 1487-1542), and the
  caller runs ``ngx_http_upstream_next(..., NGX_HTTP_UPSTREAM_FT_ERROR)``
  (line 2077).  ``ngx_connection_error`` logs ERR for 0, ECONNRESET, EPIPE,
  ENOTCONN, ETIMEDOUT, ECONNREFUSED, ENETDOWN, ENETUNREACH, EHOSTDOWN,
  EHOSTUNREACH (upstream peers have ``log_error = NGX_ERROR_ERR``, line 498)
  and ALERT for every other errno.

* The connect timer: ``ngx_http_upstream_send_request_handler`` sees
  ``c->write->timedout`` and calls ``ngx_http_upstream_next(...,
  NGX_HTTP_UPSTREAM_FT_TIMEOUT)`` (line 2305), which logs "upstream timed out"
  at ERR with ETIMEDOUT (line 4306) and closes without reading SO_ERROR.  No
  function returns a code there; nginx's name for that end is the
  next-upstream kind, and that is what the verdict reports as its code.

nginx appends its current action to each line: "while connecting to upstream"
(``r->connection->log->action``, set at ngx_http_upstream.c line 1518).
"""

from __future__ import annotations

import errno as _errno
import os
from collections import namedtuple

from .strace import c_escape

# -- nbconn's outcomes: the plain word a person wants ---------------------------------

CONNECTED = "connected"
REFUSED = "refused"
TIMED_OUT = "timed_out"
RESET = "reset"
UNREACHABLE = "unreachable"
ERROR = "error"

OUTCOMES = (CONNECTED, REFUSED, TIMED_OUT, RESET, UNREACHABLE, ERROR)

_OUTCOME_BY_ERRNO = {
    _errno.ECONNREFUSED: REFUSED,
    # Linux: a full AF_UNIX backlog makes a non-blocking connect() fail with EAGAIN;
    # nginx treats it exactly like ECONNREFUSED (ngx_event_connect.c line 226).
    _errno.EAGAIN: REFUSED,
    _errno.ETIMEDOUT: TIMED_OUT,  # SO_ERROR: the kernel gave up resending the SYN
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


# -- nginx's names ---------------------------------------------------------------------

NGX_OK = "NGX_OK"
NGX_AGAIN = "NGX_AGAIN"
NGX_DECLINED = "NGX_DECLINED"
NGX_ERROR = "NGX_ERROR"

NGX_HTTP_UPSTREAM_FT_ERROR = "NGX_HTTP_UPSTREAM_FT_ERROR"
NGX_HTTP_UPSTREAM_FT_TIMEOUT = "NGX_HTTP_UPSTREAM_FT_TIMEOUT"

# Log levels, as nginx writes them in brackets: "[error]", "[crit]", "[alert]".
NGX_LOG_ERR = "error"
NGX_LOG_CRIT = "crit"
NGX_LOG_ALERT = "alert"

#: connect() errnos ngx_event_connect_peer logs at ERR (ngx_event_connect.c lines 220-234); others CRIT.
NGX_CONNECT_ERR_LEVEL_ERRNOS = frozenset({
    _errno.ECONNREFUSED,
    _errno.EAGAIN,  # NGX_LINUX only: AF_UNIX backlog full
    _errno.ECONNRESET,
    _errno.ENETDOWN,
    _errno.ENETUNREACH,
    _errno.EHOSTDOWN,
    _errno.EHOSTUNREACH,
})

#: errnos ngx_connection_error logs at ERR for an upstream peer (ngx_connection.c lines 1508-1533); others ALERT.
NGX_CONNECTION_ERROR_ERR_ERRNOS = frozenset({
    0,
    _errno.ECONNRESET,
    _errno.EPIPE,
    _errno.ENOTCONN,
    _errno.ETIMEDOUT,
    _errno.ECONNREFUSED,
    _errno.ENETDOWN,
    _errno.ENETUNREACH,
    _errno.EHOSTDOWN,
    _errno.EHOSTUNREACH,
})

# -- what each call can answer (used by the table tests, and to read the table) ----------

#: Every errno a non-blocking connect() on Linux can fail with at once: connect(2)'s ERRORS section, plus
#: what the kernel returns for routes (ENETDOWN, EHOSTUNREACH, EHOSTDOWN), AF_UNIX paths (ENOENT, ENOTDIR,
#: ELOOP, ENAMETOOLONG) and memory (ENOBUFS, ENOMEM), and ECONNRESET, which nginx's level table names: for TCP
#: it is no reply to the handshake -- a reply is processed in release_sock after connect() chose EINPROGRESS,
#: and an RST in SYN-SENT is ECONNREFUSED (net/ipv4/tcp_input.c tcp_reset) -- so nbconn.nginx.why says so.
CONNECT_ERRNOS = tuple(sorted({
    _errno.EACCES, _errno.EPERM, _errno.EADDRINUSE, _errno.EADDRNOTAVAIL, _errno.EAFNOSUPPORT, _errno.EAGAIN,
    _errno.EALREADY, _errno.EBADF, _errno.ECONNREFUSED, _errno.EFAULT, _errno.EINTR, _errno.EISCONN,
    _errno.ENETUNREACH, _errno.ENOTSOCK, _errno.EPROTOTYPE, _errno.ETIMEDOUT, _errno.EINVAL,
    _errno.ENETDOWN, _errno.EHOSTUNREACH, _errno.EHOSTDOWN, _errno.ECONNRESET, _errno.ENOENT, _errno.ENOTDIR,
    _errno.ELOOP, _errno.ENAMETOOLONG, _errno.ENOBUFS, _errno.ENOMEM,
}))

#: Every errno getsockopt(SO_ERROR) can report after a pending connect on Linux: the handshake's own
#: failures (RST -> ECONNREFUSED, SYNs unanswered -> ETIMEDOUT, a reset -> ECONNRESET), the ICMP errors
#: the kernel converts (net/ipv4/icmp.c icmp_err_convert[]: ENETUNREACH, EHOSTUNREACH, ENOPROTOOPT,
#: ECONNREFUSED, EMSGSIZE, EOPNOTSUPP, ENONET, EHOSTDOWN), EPROTO, and the local ones (ENETDOWN,
#: EADDRNOTAVAIL, ENOBUFS, EPIPE).  A SYN resend whose route lookup fails (net/ipv4/af_inet.c
#: inet_sk_rebuild_header) keeps that errno in sk_err_soft, and tcp_write_err reports it instead of ETIMEDOUT
#: when the retries run out: ENETUNREACH (the route went), EHOSTUNREACH (an unreachable route), EACCES (a
#: prohibit route) and EPERM (an IPsec policy with action block; tests/test_why.py measures it).  EPERM is not
#: a netfilter verdict: tcp_connect (net/ipv4/tcp_output.c) passes on only -ECONNREFUSED from sending the
#: first SYN, a resend's transmit error is not stored in sk_err or sk_err_soft, so a netfilter DROP looks like
#: a lost SYN and the connect ends ETIMEDOUT.  A blackhole route met by a resend leaves EINVAL the same way
#: (tests/test_why.py measures each route case and the IPsec one).
SO_ERROR_ERRNOS = tuple(sorted({
    _errno.ECONNREFUSED, _errno.ETIMEDOUT, _errno.ECONNRESET, _errno.ENETUNREACH, _errno.EHOSTUNREACH,
    _errno.ENOPROTOOPT, _errno.EMSGSIZE, _errno.EOPNOTSUPP, _errno.ENONET, _errno.EHOSTDOWN, _errno.EACCES,
    _errno.EPERM, _errno.EPROTO, _errno.ENETDOWN, _errno.EADDRNOTAVAIL, _errno.ENOBUFS, _errno.EPIPE,
    _errno.EINVAL,
}))


def errno_name(err: int | None) -> str | None:
    """``111`` -> ``"ECONNREFUSED"``; 0 and None -> None (no error); unknown numbers -> ``"E<n>"``."""
    if not err:
        return None
    name = _errno.errorcode.get(err)  # not .get(err, f"E{err}"): that builds the fallback on every call
    return name if name is not None else f"E{err}"


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


# -- the verdict table ---------------------------------------------------------------

#: What one step's result means.  ``ngx_code`` None means "nginx goes on to the next step".
#: (collections.namedtuple, not typing.NamedTuple: ``import nbconn`` stays free of typing's import cost.)
Verdict = namedtuple("Verdict", [
    "outcome",  # nbconn's word; None while the connect is still under way
    "ngx_code",  # NGX_OK / NGX_AGAIN / NGX_DECLINED / NGX_ERROR, or NGX_HTTP_UPSTREAM_FT_TIMEOUT (timer)
    "ngx_next",  # the next-upstream kind nginx tries another peer with, None when it does not
    "level",  # the error-log level, None when nginx logs nothing
    "log",  # the error-log line (without date and level), None when nginx logs nothing
])

#: One row of :data:`VERDICT_TABLE`: how nginx treats a failure at one stage.
Rule = namedtuple("Rule", [
    "ngx_code",  # None: "failed, ignored", the connect goes on
    "ngx_next",
    "err_level_errnos",  # errnos logged at ERR ...
    "level",  # ... every other errno at this level (None: not logged)
    "text",  # the message before "(errno: text)"; {detail} is the stage's detail (peer, option, fd)
    "source",  # where nginx 1.22.1 decides it
])


#: stage -> how nginx treats a failure there.  "setsockopt" rows are keyed by option (see _SETSOCKOPT_RULES).
VERDICT_TABLE: dict[str, Rule] = {
    "socket": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_ALERT, "socket() failed",
                   "ngx_event_connect.c ngx_event_connect_peer line 47"),
    # no errno: nginx logs with err 0, so the line has no "(N: text)"; detail is worker_connections
    "get_connection": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_ALERT, "{detail} worker_connections are not enough",
                           "ngx_connection.c ngx_get_connection line 1118; ngx_event_connect.c line 61"),
    "nonblocking": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_ALERT, "{detail} failed",
                        "ngx_event_connect.c ngx_event_connect_peer line 89 (ngx_nonblocking_n)"),
    "bind": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_CRIT, "bind({detail}) failed",
                 "ngx_event_connect.c ngx_event_connect_peer line 153"),
    "epoll_ctl": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_ALERT, "epoll_ctl(EPOLL_CTL_ADD, {detail}) failed",
                      "ngx_epoll_module.c ngx_epoll_add_connection line 712"),
    "connect": Rule(NGX_DECLINED, NGX_HTTP_UPSTREAM_FT_ERROR, NGX_CONNECT_ERR_LEVEL_ERRNOS, NGX_LOG_CRIT,
                    "connect() to {detail} failed",
                    "ngx_event_connect.c ngx_event_connect_peer lines 209-246; ngx_http_upstream.c line 1559"),
    "so_error": Rule(NGX_ERROR, NGX_HTTP_UPSTREAM_FT_ERROR, NGX_CONNECTION_ERROR_ERR_ERRNOS, NGX_LOG_ALERT,
                     "connect() failed",
                     "ngx_http_upstream.c ngx_http_upstream_test_connect line 2773; ngx_connection.c "
                     "ngx_connection_error lines 1508-1537; ngx_http_upstream.c line 2077"),
    "timeout": Rule(NGX_HTTP_UPSTREAM_FT_TIMEOUT, NGX_HTTP_UPSTREAM_FT_TIMEOUT, frozenset({_errno.ETIMEDOUT}),
                    NGX_LOG_ERR, "upstream timed out",
                  "ngx_http_upstream.c ngx_http_upstream_send_request_handler line 2305, "
                  "ngx_http_upstream_next line 4306"),
}

#: setsockopt failures, per nbconn option name.  nginx 1.22.1's ngx_event_connect_peer sets four options:
#: SO_RCVBUF fails the connect (line 70, ``goto failed``), SO_KEEPALIVE is "failed, ignored" (line 83),
#: IP_TRANSPARENT (proxy_bind ... transparent) fails it (ngx_event_connect_set_transparent, line 364),
#: IP_BIND_ADDRESS_NO_PORT is "failed, ignored" and silent for EOPNOTSUPP/ENOPROTOOPT (lines 119-127).
#: nginx does not set the other options nbconn offers; nbconn ignores their failure as nginx does SO_KEEPALIVE's.
_SETSOCKOPT_RULES: dict[str, Rule] = {
    "rcvbuf": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_ALERT, "setsockopt(SO_RCVBUF) failed",
                   "ngx_event_connect.c ngx_event_connect_peer line 70"),
    "keepalive": Rule(None, None, frozenset(), NGX_LOG_ALERT, "setsockopt(SO_KEEPALIVE) failed, ignored",
                      "ngx_event_connect.c ngx_event_connect_peer line 83"),
    # proxy_bind ADDR transparent: fatal, unlike SO_KEEPALIVE (EPERM without CAP_NET_ADMIN/CAP_NET_RAW)
    "transparent": Rule(NGX_ERROR, None, frozenset(), NGX_LOG_ALERT, "setsockopt(IP_TRANSPARENT) failed",
                        "ngx_event_connect.c ngx_event_connect_set_transparent line 362; goto failed line 100"),
    "bind_address_no_port": Rule(None, None, frozenset(), NGX_LOG_ALERT,
                                 "setsockopt(IP_BIND_ADDRESS_NO_PORT) failed, ignored",
                                 "ngx_event_connect.c ngx_event_connect_peer lines 119-127"),
}
_SETSOCKOPT_QUIET = {"bind_address_no_port": frozenset({_errno.EOPNOTSUPP, _errno.ENOPROTOOPT})}

STAGES = ("socket", "get_connection", "setsockopt", "nonblocking", "bind", "epoll_ctl", "connect", "so_error",
          "timeout")  # "timeout": the connect timer expired (wev->timedout); in the trace "timer" is the arming

_TAIL = " while connecting to upstream"
_CONNECTED = Verdict(CONNECTED, NGX_OK, None, None, None)
_IN_PROGRESS = Verdict(None, NGX_AGAIN, None, None, None)
_GO_ON = Verdict(None, None, None, None, None)
# The answers every connect asks for, looked up before anything else (verdict() runs inside the handshake time).
_FAST = {("connect", 0): _CONNECTED, ("connect", _errno.EINPROGRESS): _IN_PROGRESS, ("so_error", 0): _CONNECTED}


def setsockopt_rule(option: str, opt_name: str = "") -> Rule:
    """The rule for a failing setsockopt of nbconn option ``option`` (``opt_name``: e.g. "SO_SNDBUF")."""
    rule = _SETSOCKOPT_RULES.get(option)
    if rule is None:
        rule = Rule(None, None, frozenset(), NGX_LOG_ALERT, f"setsockopt({opt_name or option}) failed, ignored",
                    "not set by nginx 1.22.1; ignored as ngx_event_connect_peer ignores SO_KEEPALIVE (line 83)")
    return rule


def verdict(stage: str, err: int | None, *, detail: object = "") -> Verdict:
    """What nginx makes of ``err`` (0 or None: the call succeeded) at ``stage``.

    ``stage`` is one of :data:`STAGES`.  ``detail`` fills the log line: the peer's
    name for "connect" (``127.0.0.1:80``, ``unix:/path``), the option name for
    "setsockopt" (``rcvbuf``), the local address for "bind" (as proxy_bind names it:
    nginx logs ``pc->local->name``, ``bind(198.18.0.5) failed``), the descriptor for
    "epoll_ctl", the call for "nonblocking" (``ioctl(FIONBIO)``), worker_connections
    for "get_connection".  For "timeout" and "get_connection", ``err`` is ignored: the
    timer firing (ETIMEDOUT in the log) or the empty connection pool is the failure.
    """
    fast = _FAST.get((stage, err))
    if fast is not None:
        return fast
    if stage == "timeout":
        rule = VERDICT_TABLE["timeout"]
        err = _errno.ETIMEDOUT
    elif stage == "get_connection":
        # not a syscall: no free ngx_connection_t; ``err`` is ignored, ``detail`` is worker_connections
        rule = VERDICT_TABLE[stage]
        return Verdict(ERROR, rule.ngx_code, None, rule.level, f"{rule.text.format(detail=detail)}{_TAIL}")
    else:
        if not err:
            # connect() returned 0, SO_ERROR read 0: usable.  Any earlier step: go on to the next one.
            return _CONNECTED if stage in ("connect", "so_error") else _GO_ON
        if stage == "connect" and err == _errno.EINPROGRESS:
            return _IN_PROGRESS
        if stage == "setsockopt":
            rule = setsockopt_rule(str(detail))
            if err in _SETSOCKOPT_QUIET.get(str(detail), ()):
                return _GO_ON
        else:
            rule = VERDICT_TABLE[stage]
    level = NGX_LOG_ERR if err in rule.err_level_errnos else rule.level
    line = f"{rule.text.format(detail=c_escape(str(detail)))} {strerror(err)}{_TAIL}"  # a path stays one line
    if rule.ngx_code is None:  # "failed, ignored": logged, and the connect goes on
        return Verdict(None, None, None, level, line)
    if stage == "timeout":
        outcome = TIMED_OUT
    elif stage in ("connect", "so_error"):
        outcome = outcome_for(err)
    else:  # a step before connect(): nothing was tried, whatever the errno
        outcome = ERROR
    return Verdict(outcome, rule.ngx_code, rule.ngx_next, level, line)
