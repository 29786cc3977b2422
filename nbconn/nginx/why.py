"""From one nginx error-log line to the step of the connect flow that wrote it.

People meet the connect flow first as a line in nginx's error log::

    2026/12/03 03:00:00 [error] 811#811: *52 connect() failed (111: Connection refused) while connecting
    to upstream, client: 192.0.2.7, server: _, request: "GET / HTTP/1.1", upstream: "http://192.0.2.9:8080/"

:func:`decode` names, for such a line: the step it comes from, the errno and what the
kernel did to produce it, nginx's code and next-upstream kind, whether nginx tries
another peer and counts the failure against ``max_fails`` (and which directives change
that), the level nginx logs it at (and whether the line's level is unexpected), and
the notebook that teaches it.  :class:`Summary` folds many decoded lines into counts
per cause and per upstream, first and last time seen, and bursts.

Pure (h11's style): no sockets, no files, no clock.  Where the facts live:

* the verdict -- stage, errno -> outcome, NGX code, next-upstream kind, level, log
  text -- is :func:`nbconn.errors.verdict`, asked here, never restated;
* whether a failure moves the request on to another peer and counts against
  ``max_fails`` is asked of the upstream model, :mod:`nbconn.nginx.upstream` (a two-server
  and a one-server upstream, stepped by hand, see :func:`_model`);
* the facts neither holds -- the lines that are not a connect step (``no live
  upstreams``, ``upstream server temporarily disabled``, ``worker_connections are not
  enough``, the header-reading lines, the stream module's differences), what the
  kernel did for each errno, the directives and the notebooks -- are the tables
  below, each row citing nginx 1.22.1 (tag ``release-1.22.1``) or Linux by file and
  function.

A line that matches none of nginx's upstream-connect texts is "outside the connect
flow": named as such, never guessed at.
"""

from __future__ import annotations

import errno as _errno
import re
from collections import namedtuple

from .. import errors

# -- the steps, in the words of the issue (and notebook 00's five steps) ---------------------------------------
STEP_PICK = "picking a peer (the round robin, before any syscall)"
STEP_SOCKET = "socket"
STEP_OPTIONS = "options"
STEP_BIND = "bind"
STEP_REGISTER = "epoll registration"
STEP_AT_ONCE = "connect at once"
# epoll reports the socket (EPOLLOUT for a completed handshake; EPOLLERR|EPOLLHUP with IN and OUT for a refusal,
# whose read handler -- ngx_http_upstream_process_header -- then reads SO_ERROR): not "after EPOLLOUT" alone
STEP_SO_ERROR = "after epoll reported the socket, via SO_ERROR"
STEP_TIMER = "the connect timer"
STEP_SEND = "after the connect: sending the request"
STEP_HEADER = "after the connect: reading the header"
STEP_PROXYING = "after the connect: proxying (stream)"
STEP_ACCOUNTING = "after a failure: the round robin's accounting"
# proxy_pass https://: after the connect succeeded, before the request (ngx_http_upstream_ssl_init_connection)
STEP_TLS = "after the connect: the TLS handshake (proxy_pass https://)"
#: before SSL_do_handshake(): the saved session set on the new SSL connection, still "while connecting to upstream"
STEP_TLS_SETUP = "after the connect: setting up TLS, before the handshake (proxy_pass https://)"

OUTSIDE = "outside the connect flow"

HTTP, STREAM = "http", "stream"

# nginx's log->action texts (ngx_http_upstream.c 1.22.1 lines 1518, 2081, 2364; ngx_stream_proxy_module.c 1.22.1
# lines 705, 1630): " while <action>" ends the message.
_ACTIONS = {
    "connecting to upstream",
    # ngx_http_upstream.c 1.22.1 line 1727; the stream module's too (ngx_stream_proxy_module.c line 1090)
    "SSL handshaking to upstream",
    "sending request to upstream",
    "reading response header from upstream",
    "proxying and reading from upstream",
    "proxying connection",
}

# -- reading a line ---------------------------------------------------------------------------------------
# ngx_log_error_core (src/core/ngx_log.c 1.22.1): "YYYY/MM/DD HH:MM:SS [level] pid#tid: *cid message".
_HEAD = re.compile(r"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[([a-z]+)\] \d+#\d+: (?:\*\d+ )?")
_LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
# ngx_http_log_error (ngx_http_request.c 1.22.1 line 3806) and ngx_stream_log_error (ngx_stream_handler.c line 373)
# start the context with ", client: " (", udp client: " for a UDP stream session).
_CONTEXT = re.compile(r", (?:udp )?client: ")
_HTTP_UPSTREAM = re.compile(r'upstream: "[a-z]+://(unix:[^:"]*|\[[^\]"]*\](?::\d+)?|[^/"]*)')
_STREAM_UPSTREAM = re.compile(r'upstream: "([^"]*)"')
_ERR = r"\((?P<err>\d+): [^)]*\)"

Line = namedtuple("Line", ["time", "level", "message", "action", "module", "upstream"])
Line.__doc__ = """One error-log line taken apart: ``time`` ("2026/12/03 03:00:00") and ``level`` ("error") are None
for a bare message; ``message`` is nginx's text before " while"; ``action`` the text after it (or None);
``module`` "http", "stream" or None (the context does not say); ``upstream`` the peer or group named in the
context ("192.0.2.9:8080", "unix:/run/app.sock", "backend"), or None."""


def split(text: str, *, bare: bool = True) -> Line | None:
    """Take an error-log line apart.  ``bare``: a message without date and level is accepted (a line pasted on
    the command line); otherwise such a line is not an nginx error-log line and None is returned."""
    text = text.rstrip("\r\n")
    head = _HEAD.match(text)
    if head is not None and head.group(2) in _LEVELS:
        when, level, rest = head.group(1), head.group(2), text[head.end():]
    elif bare:
        when, level, rest = None, None, text.strip()
    else:
        return None
    context = _CONTEXT.search(rest)
    message, tail = (rest[:context.start()], rest[context.start():]) if context else (rest, "")
    action = None
    at = message.rfind(" while ")
    if at >= 0 and message[at + 7:] in _ACTIONS:
        message, action = message[:at], message[at + 7:]
    module, upstream = None, None
    if "bytes from/to client:" in tail:  # ngx_stream_proxy_log_error (ngx_stream_proxy_module.c line 2022)
        module = STREAM
        found = _STREAM_UPSTREAM.search(tail)
    else:
        if ', request: "' in tail or '://' in tail:  # ngx_http_log_error_handler (ngx_http_request.c 3850, 3873)
            module = HTTP
        found = _HTTP_UPSTREAM.search(tail)
    if found:
        upstream = found.group(1)
    if action in ("proxying and reading from upstream", "proxying connection"):
        module = STREAM
    elif action in ("sending request to upstream", "reading response header from upstream"):
        module = HTTP
    return Line(when, level, message, action, module, upstream)


# -- which nginx text a message is --------------------------------------------------------------------------
# (cause kind, pattern).  The texts are nginx 1.22.1's, cited in _KINDS below.
_PATTERNS = (
    ("connect", re.compile(rf"connect\(\) to (?P<detail>.+) failed {_ERR}")),
    ("so_error", re.compile(rf"connect\(\) failed {_ERR}")),
    ("timeout", re.compile(rf"upstream timed out {_ERR}")),
    ("no_live", re.compile(r"no live upstreams")),
    ("disabled", re.compile(r"upstream server temporarily disabled")),
    ("socket", re.compile(rf"socket\(\) failed {_ERR}")),
    ("worker_connections", re.compile(r"(\d+) worker_connections are not enough")),
    ("files", re.compile(r"the new socket has number (\d+), but only (\d+) files are available")),
    ("setsockopt", re.compile(rf"setsockopt\((?P<detail>SO_RCVBUF|SO_KEEPALIVE|IP_TRANSPARENT|IP_BIND_ADDRESS_NO_PORT)\)"
                              rf" failed"
                              rf"(?:, ignored)? {_ERR}")),
    ("nonblocking", re.compile(rf"(?P<detail>ioctl\(FIONBIO\)|fcntl\(O_NONBLOCK\)) failed {_ERR}")),
    ("bind", re.compile(rf"bind\((?P<detail>.+)\) failed {_ERR}")),
    ("epoll_ctl", re.compile(rf"epoll_ctl\(EPOLL_CTL_ADD, (?P<detail>\d+)\) failed {_ERR}")),
    ("closed", re.compile(r"upstream prematurely closed connection")),
    ("recv", re.compile(rf"recv\(\) failed {_ERR}")),
    ("writev", re.compile(rf"writev\(\) failed {_ERR}")),
    # proxy_pass https:// (texts: ngx_event_openssl.c ngx_ssl_handshake, ngx_ssl_set_session; ngx_http_upstream.c
    # ngx_http_upstream_ssl_handshake); ngx_ssl_error appends " (SSL: " and OpenSSL's queued errors
    ("tls_ssl", re.compile(r"SSL_do_handshake\(\) failed \(SSL: (?P<detail>.*)\)(?: \((?P<err>\d+): [^)]*\))?")),
    ("tls_closed", re.compile(rf"peer closed connection in SSL handshake(?: {_ERR})?")),
    ("tls_verify", re.compile(r"upstream SSL certificate verify error: \((?P<code>\d+):(?P<detail>.*)\)")),
    ("tls_name", re.compile(r'upstream SSL certificate does not match "(?P<detail>.*)"')),
    ("tls_set_session", re.compile(r"SSL_set_session\(\) failed(?: \(SSL: (?P<detail>.*)\))?")),
    # after the handshake, on the SSL connection: ngx_ssl_write / ngx_ssl_handle_recv -> ngx_ssl_connection_error
    ("ssl_write", re.compile(rf"SSL_write\(\) failed (?:\(SSL: (?P<detail>.*)\)|{_ERR})")),
    ("ssl_read", re.compile(r"SSL_read\(\) failed \(SSL: (?P<detail>.*)\)")),
)

# the actions each kind is written under; a kind met under another action is outside the connect flow
_KIND_ACTIONS = {
    "connect": {"connecting to upstream"}, "so_error": {"connecting to upstream"},
    "socket": {"connecting to upstream"}, "worker_connections": {"connecting to upstream"},
    "files": {"connecting to upstream"}, "setsockopt": {"connecting to upstream"},
    "nonblocking": {"connecting to upstream"}, "bind": {"connecting to upstream"},
    "epoll_ctl": {"connecting to upstream"}, "no_live": {"connecting to upstream"},
    "timeout": {"connecting to upstream", "sending request to upstream", "reading response header from upstream",
                "SSL handshaking to upstream"},
    "disabled": {"connecting to upstream", "sending request to upstream", "reading response header from upstream",
                 "SSL handshaking to upstream"},
    "tls_ssl": {"SSL handshaking to upstream"}, "tls_closed": {"SSL handshaking to upstream"},
    "tls_verify": {"SSL handshaking to upstream"}, "tls_name": {"SSL handshaking to upstream"},
    # set_session runs in ngx_http_upstream_ssl_init_connection before the action becomes the handshake's
    "tls_set_session": {"connecting to upstream"},
    "closed": {"reading response header from upstream"},
    "recv": {"reading response header from upstream", "proxying and reading from upstream"},
    "writev": {"sending request to upstream"},
    "ssl_write": {"sending request to upstream"},
    "ssl_read": {"reading response header from upstream", "proxying and reading from upstream"},
}

# -- facts errors.py does not hold: one row per kind ------------------------------------------------------------
Kind = namedtuple("Kind", ["step", "stage", "level", "ngx_code", "ngx_next", "outcome", "source", "notebook",
                           "directives"])
Kind.__doc__ = """One kind of line.  ``stage``: the nbconn.errors stage whose verdict gives its level, NGX code,
next-upstream kind and outcome; None for a line that is not a connect step, whose row holds them (``level`` None:
ngx_connection_error's rule, by errno).  ``source``: where nginx 1.22.1 writes it."""

_NB = {
    "01": "01_socket_and_options.ipynb", "02": "02_nonblocking.ipynb", "03": "03_epoll.ipynb",
    "04": "04_connect.ipynb", "05": "05_writable_then_so_error.ipynb", "06": "06_timeouts.ipynb",
    "07": "07_many_connects.ipynb", "10": "10_nginx_side_by_side.ipynb", "13": "13_keepalive.ipynb",
    "15": "15_tls.ipynb",
}
_NEXT = ("proxy_next_upstream", "proxy_next_upstream_tries", "proxy_next_upstream_timeout", "max_fails",
         "fail_timeout")
_FT_ERROR, _FT_TIMEOUT = errors.NGX_HTTP_UPSTREAM_FT_ERROR, errors.NGX_HTTP_UPSTREAM_FT_TIMEOUT
_ALERT, _ERR = errors.NGX_LOG_ALERT, errors.NGX_LOG_ERR


def _step(step, stage, source, notebook, directives) -> Kind:
    """A connect step: everything but the facts below comes from nbconn.errors.verdict(stage, errno)."""
    return Kind(step, stage, None, None, None, None, source, notebook, directives)


_KINDS = {
    "socket": _step(STEP_SOCKET, "socket", "ngx_event_connect.c ngx_event_connect_peer line 47", _NB["01"],
                    ("worker_rlimit_nofile", "worker_connections")),
    "worker_connections": Kind(STEP_SOCKET, None, _ALERT, errors.NGX_ERROR, None, errors.ERROR,
                               "ngx_connection.c ngx_get_connection line 1119, called by ngx_event_connect_peer "
                               "line 53 (the new socket is closed, NGX_ERROR)", _NB["07"],
                               ("worker_connections", "keepalive")),
    "files": Kind(STEP_SOCKET, None, _ALERT, errors.NGX_ERROR, None, errors.ERROR,
                  "ngx_connection.c ngx_get_connection line 1106, called by ngx_event_connect_peer line 53",
                  _NB["07"], ("worker_rlimit_nofile",)),
    "setsockopt": _step(STEP_OPTIONS, "setsockopt", "ngx_event_connect.c ngx_event_connect_peer lines 70, 83, 122; "
                        "ngx_event_connect_set_transparent line 362 (proxy_bind ... transparent)",
                        _NB["01"], ("proxy_socket_keepalive",)),
    "nonblocking": _step(STEP_OPTIONS, "nonblocking", "ngx_event_connect.c ngx_event_connect_peer line 89",
                         _NB["02"], ()),
    "bind": _step(STEP_BIND, "bind", "ngx_event_connect.c ngx_event_connect_peer line 153", _NB["01"],
                  ("proxy_bind",)),
    "epoll_ctl": _step(STEP_REGISTER, "epoll_ctl", "ngx_epoll_module.c ngx_epoll_add_connection line 712",
                       _NB["03"], ()),
    "connect": _step(STEP_AT_ONCE, "connect", "ngx_event_connect.c ngx_event_connect_peer lines 209-246",
                     _NB["04"], _NEXT + ("proxy_bind", "keepalive")),
    "so_error": _step(STEP_SO_ERROR, "so_error", "ngx_http_upstream.c ngx_http_upstream_test_connect line 2773 / "
                      "ngx_stream_proxy_module.c ngx_stream_proxy_test_connect line 1572; ngx_connection.c "
                      "ngx_connection_error", _NB["05"], _NEXT + ("proxy_connect_timeout",)),
    "timeout": _step(STEP_TIMER, "timeout", "ngx_http_upstream.c ngx_http_upstream_next line 4306 / "
                     "ngx_stream_proxy_module.c ngx_stream_proxy_connect_handler line 1518", _NB["06"],
                     ("proxy_connect_timeout",) + _NEXT),
    "no_live": Kind(STEP_PICK, None, _ERR, "NGX_BUSY", "NGX_HTTP_UPSTREAM_FT_NOLIVE", None,
                    "ngx_http_upstream.c ngx_http_upstream_connect line 1553 / ngx_stream_proxy_module.c "
                    "ngx_stream_proxy_connect line 744 (the round robin returned NGX_BUSY)", _NB["10"],
                    ("max_fails", "fail_timeout", "backup", "down")),
    "disabled": Kind(STEP_ACCOUNTING, None, "warn", None, None, None, "ngx_http_upstream_round_robin.c "
                     "ngx_http_upstream_free_round_robin_peer line 640 / ngx_stream_upstream_round_robin.c line 647",
                     _NB["10"], ("max_fails", "fail_timeout")),
    "closed": Kind(STEP_HEADER, None, _ERR, None, _FT_ERROR, "closed", "ngx_http_upstream.c "
                   "ngx_http_upstream_process_header line 2438, then ngx_http_upstream_next(FT_ERROR) line 2442",
                   _NB["13"], ("proxy_next_upstream", "keepalive", "keepalive_timeout", "max_fails", "fail_timeout")),
    "recv": Kind(STEP_HEADER, None, None, None, _FT_ERROR, None, "os/unix/ngx_recv.c ngx_unix_recv line 188 "
                 "(ngx_connection_error); ngx_http_upstream.c ngx_http_upstream_process_header line 2442", _NB["10"],
                 ("proxy_next_upstream", "keepalive", "max_fails", "fail_timeout")),
    "writev": Kind(STEP_SEND, None, None, None, _FT_ERROR, None, "os/unix/ngx_writev_chain.c ngx_writev line 210 "
                   "(ngx_connection_error); ngx_http_upstream.c ngx_http_upstream_send_request", _NB["10"],
                   ("proxy_next_upstream", "keepalive", "max_fails", "fail_timeout")),
    # proxy_pass https:// after the handshake: the level is ngx_ssl_connection_error's (by OpenSSL reason, or by
    # errno when OpenSSL queued none), decided in decode()
    "ssl_write": Kind(STEP_SEND, None, None, None, _FT_ERROR, None, "ngx_event_openssl.c ngx_ssl_write -> "
                      "ngx_ssl_connection_error; ngx_http_upstream.c ngx_http_upstream_send_request", _NB["15"],
                      ("proxy_next_upstream", "max_fails", "fail_timeout")),
    "ssl_read": Kind(STEP_HEADER, None, None, None, _FT_ERROR, errors.ERROR, "ngx_event_openssl.c "
                     "ngx_ssl_handle_recv -> ngx_ssl_connection_error (a reset with no OpenSSL error is NGX_DONE, "
                     "logged as 'upstream prematurely closed connection'); ngx_http_upstream.c "
                     "ngx_http_upstream_process_header line 2442", _NB["15"],
                     ("proxy_next_upstream", "max_fails", "fail_timeout")),
    # "upstream timed out" under the header-reading action: proxy_read_timeout, not the connect timer
    "timeout_header": Kind(STEP_HEADER, None, _ERR, None, _FT_TIMEOUT, errors.TIMED_OUT, "ngx_http_upstream.c "
                           "ngx_http_upstream_process_header line 2366 -> ngx_http_upstream_next(FT_TIMEOUT) line "
                           "4306", _NB["10"], ("proxy_read_timeout",) + _NEXT),
}

#: "upstream timed out" after the connect: the timer is proxy_send_timeout / proxy_read_timeout, not the connect's --
#: except in the TLS handshake, where it is still the connect's (ngx_http_upstream_ssl_init_connection line 1733)
_AFTER_CONNECT_TIMEOUTS = {"sending request to upstream": "timeout_send",
                           "reading response header from upstream": "timeout_header",
                           "SSL handshaking to upstream": "tls_timeout"}

# -- the TLS handshake's lines: their verdicts are nbconn.nginx.tls.handshake_verdict's (asked in decode_line) ----------
_TLS_NEXT = ("proxy_next_upstream", "proxy_next_upstream_tries", "max_fails", "fail_timeout")
#: kind -> the handshake_verdict kind that gives its level, NGX code, next-upstream kind and outcome
_TLS_VERDICT_KIND = {"tls_ssl": "ssl", "tls_closed": "closed", "tls_verify": "verify", "tls_name": "hostname",
                     "tls_timeout": "timeout"}
_TLS_FAILED = "ngx_http_upstream_ssl_handshake -> ngx_http_upstream_next(FT_ERROR) line 1814"
_KINDS.update({
    "tls_ssl": Kind(STEP_TLS, None, None, None, None, None, "ngx_event_openssl.c ngx_ssl_handshake line 1857 "
                    "(ngx_ssl_connection_error: ERR for the handshake-failure reasons it lists, else CRIT); "
                    "ngx_http_upstream.c " + _TLS_FAILED, _NB["15"],
                    ("proxy_ssl_protocols", "proxy_ssl_ciphers", "proxy_ssl_conf_command") + _TLS_NEXT),
    "tls_closed": Kind(STEP_TLS, None, None, None, None, None, "ngx_event_openssl.c ngx_ssl_handshake lines 1842-1843 "
                       "(ngx_connection_error); ngx_http_upstream.c " + _TLS_FAILED, _NB["15"],
                       ("proxy_connect_timeout",) + _TLS_NEXT),
    "tls_verify": Kind(STEP_TLS, None, None, None, None, None, "ngx_http_upstream.c ngx_http_upstream_ssl_handshake "
                       "line 1780 (proxy_ssl_verify on) -> ngx_http_upstream_next(FT_ERROR) line 1814", _NB["15"],
                       ("proxy_ssl_verify", "proxy_ssl_trusted_certificate", "proxy_ssl_verify_depth") + _TLS_NEXT),
    "tls_name": Kind(STEP_TLS, None, None, None, None, None, "ngx_http_upstream.c ngx_http_upstream_ssl_handshake "
                     "line 1787 (ngx_ssl_check_host) -> ngx_http_upstream_next(FT_ERROR) line 1814", _NB["15"],
                     ("proxy_ssl_name", "proxy_ssl_verify") + _TLS_NEXT),
    "tls_timeout": Kind(STEP_TLS, None, None, None, None, None, "ngx_http_upstream.c ngx_http_upstream_ssl_handshake "
                        "line 1807 (c->write->timedout) -> ngx_http_upstream_next(FT_TIMEOUT), which logs it at line "
                        "4306", _NB["15"], ("proxy_connect_timeout",) + _TLS_NEXT),
    # proxy_ssl_session_reuse: the only session line nginx 1.22.1 writes for an upstream.  The peer's saved session
    # is set in ngx_http_upstream_ssl_init_connection (line 1710) before the handshake; a failure finalizes 500.
    "tls_set_session": Kind(STEP_TLS_SETUP, None, _ALERT, errors.NGX_ERROR, None, errors.ERROR, "ngx_event_openssl.c "
                            "ngx_ssl_set_session line 1705, called by ngx_http_upstream_set_round_robin_peer_session "
                            "(ngx_http_upstream_round_robin.c line 729) from ngx_http_upstream_ssl_init_connection "
                            "line 1710 -> ngx_http_upstream_finalize_request(500)", _NB["15"],
                            ("proxy_ssl_session_reuse",)),
})
_KINDS["timeout_send"] = Kind(STEP_SEND, None, _ERR, None, _FT_TIMEOUT, errors.TIMED_OUT, "ngx_http_upstream.c "
                              "ngx_http_upstream_send_request_handler line 2304 (c->write->timedout) -> "
                              "ngx_http_upstream_next(FT_TIMEOUT) line 4306", _NB["10"],
                              ("proxy_send_timeout",) + _NEXT)

#: the option names nbconn.errors knows setsockopt failures by
_SETSOCKOPT_OPTION = {"SO_RCVBUF": "rcvbuf", "SO_KEEPALIVE": "keepalive", "IP_TRANSPARENT": "transparent",
                      "IP_BIND_ADDRESS_NO_PORT": "bind_address_no_port"}

# -- what the kernel did: (kind, errno, unix?) -> text; unix? None matches both -------------------------------
# Measured here where marked: a lab namespace with `ip route add unreachable|prohibit` and no default route
# (Linux 6.x): connect() fails at once with EHOSTUNREACH, EACCES, ENETUNREACH respectively.
#: how a SYN resend's failed route lookup ends a connect (net/ipv4/af_inet.c inet_sk_rebuild_header, then
#: net/ipv4/tcp_timer.c tcp_write_err)
_SOFT = ("the resend's route lookup failed (net/ipv4/af_inet.c inet_sk_rebuild_header), the errno was kept in "
         "sk_err_soft, and tcp_write_err reported it instead of ETIMEDOUT when the retries ran out")

_KERNEL = {
    ("connect", _errno.ECONNREFUSED, False): "an RST answered the SYN (no socket listens on that port: "
        "net/ipv4/tcp_ipv4.c tcp_v4_send_reset) and connect() itself reported it -- unusual on Linux for TCP: even "
        "on loopback connect() returns EINPROGRESS and the refusal comes through SO_ERROR (notebook 04 measured "
        "20/20), because the RST is processed only after connect() has released the socket",
    ("connect", _errno.ECONNREFUSED, True): "the socket file exists but no process listens on it: a stale socket "
        "left by a backend that died or restarted (net/unix/af_unix.c unix_stream_connect)",
    ("connect", _errno.EAGAIN, True): "the unix socket's accept backlog is full -- its process does not accept() "
        "fast enough -- and a non-blocking AF_UNIX connect does not wait (net/unix/af_unix.c unix_stream_connect, "
        "unix_recvq_full -> -EAGAIN); nginx treats it like ECONNREFUSED",
    # connect(2)'s "insufficient entries in the routing cache" is obsolete: the IPv4 routing cache was removed in
    # Linux 3.6, and running out of local ports gives EADDRNOTAVAIL (notebook 04 measures it).
    ("connect", _errno.EAGAIN, False): "not something Linux 6.x returns from a TCP connect(): connect(2)'s EAGAIN "
        "'insufficient entries in the routing cache' predates Linux 3.6, which removed the IPv4 routing cache, and "
        "running out of local ports gives EADDRNOTAVAIL (net/ipv4/inet_hashtables.c __inet_hash_connect; notebook "
        "04 measures it); look for another socket type or a non-Linux kernel",
    ("connect", _errno.ENOENT, True): "no socket file at that path: the backend has not created it (not running, "
        "another path, or a private /tmp) (net/unix/af_unix.c unix_find_bsd -> kern_path)",
    ("connect", _errno.EACCES, True): "the worker's user (the `user` directive) may not write to the socket file "
        "or search a directory above it (net/unix/af_unix.c unix_find_bsd -> path_permission(MAY_WRITE))",
    ("connect", _errno.EACCES, False): "the route to the address is of type prohibit (measured here: `ip route add "
        "prohibit` makes connect() fail at once with EACCES), or a security module / cgroup BPF program refused it",
    # Not netfilter: tcp_connect (net/ipv4/tcp_output.c) hands back only -ECONNREFUSED from tcp_transmit_skb; the
    # -EPERM of an NF_DROP on the first SYN is taken for a lost SYN (connect() says EINPROGRESS, the SYN is resent,
    # the connect ends in ETIMEDOUT or nginx's timer).  Passing that EPERM up is a netdev patch of November 2025,
    # later than 6.18.  Measured here, each in a namespace: an xfrm block policy makes connect() fail with EPERM at
    # once; an nftables output drop gives EINPROGRESS, then ETIMEDOUT; reject gives ECONNREFUSED / EHOSTUNREACH.
    ("connect", _errno.EPERM, None): "something refused the connect before any SYN was built: a cgroup BPF "
        "connect4/connect6 program (net/ipv4/tcp_ipv4.c tcp_v4_pre_connect -> BPF_CGROUP_RUN_PROG_INET4_CONNECT; "
        "kernel/bpf/cgroup.c __cgroup_bpf_run_filter_sock_addr), a security module (net/socket.c "
        "__sys_connect_file -> security_socket_connect), or an IPsec policy with action block (measured here: `ip "
        "xfrm policy add dir out dst ADDR action block` makes connect() fail at once with EPERM; "
        "net/xfrm/xfrm_policy.c xfrm_lookup_with_ifid via ip_route_connect); nothing was sent. Not a netfilter "
        "rule on Linux 6.18: tcp_connect (net/ipv4/tcp_output.c) passes on only ECONNREFUSED from sending the SYN, "
        "so a netfilter DROP of the SYN looks like a lost SYN -- connect() returns EINPROGRESS, the SYN is resent, "
        "and the line you get is 'upstream timed out' or SO_ERROR ETIMEDOUT; a REJECT comes back as SO_ERROR "
        "ECONNREFUSED (tcp reset, port unreachable) or EHOSTUNREACH (host unreachable, admin prohibited) (measured "
        "here with nftables output rules in a namespace)",
    ("connect", _errno.EADDRNOTAVAIL, None): "no free local port toward this address and port: every port of "
        "net.ipv4.ip_local_port_range is in use (many connections, or TIME-WAIT) (net/ipv4/inet_hashtables.c "
        "__inet_hash_connect -> -EADDRNOTAVAIL); nothing was sent",
    ("connect", _errno.ENETUNREACH, None): "the routing table has no route to the destination's network (no "
        "default route; measured here in a lab namespace) (net/ipv4/route.c ip_route_output_key_hash via "
        "ip_route_connect); nothing was sent",
    ("connect", _errno.EHOSTUNREACH, None): "the route to the address is of type unreachable (measured here: "
        "`ip route add unreachable` makes connect() fail at once with EHOSTUNREACH; net/ipv4/fib_semantics.c "
        "fib_props[RTN_UNREACHABLE]); nothing was sent",
    ("connect", _errno.EINVAL, False): "the route to the address is of type blackhole (measured here: `ip route "
        "add blackhole` makes connect() fail at once with EINVAL; net/ipv4/fib_semantics.c fib_props[RTN_BLACKHOLE]); "
        "nothing was sent",
    ("connect", _errno.ECONNRESET, None): "not a reply to the handshake: for a non-blocking TCP socket connect() "
        "chooses its answer (EINPROGRESS) before any reply is processed -- a reply that arrives meanwhile waits in "
        "the socket's backlog until release_sock (net/core/sock.c) -- and an RST in SYN-SENT gives ECONNREFUSED, "
        "not ECONNRESET (net/ipv4/tcp_input.c tcp_reset); nginx lists ECONNRESET among connect()'s errors for "
        "other systems; on Linux look for another cause (a socket type other than TCP or AF_UNIX, or a patched "
        "kernel)",
    ("connect", _errno.ENETDOWN, None): "the interface the route uses is down",
    ("connect", _errno.ETIMEDOUT, None): "connect() itself reported ETIMEDOUT: unusual for a non-blocking socket",
    ("so_error", _errno.ECONNREFUSED, None): "an RST answered the SYN after connect() had returned EINPROGRESS: no "
        "socket listens on that port of the remote host (or an ICMP port unreachable: net/ipv4/icmp.c "
        "icmp_err_convert[]); the kernel set sk_err and closed the socket (net/ipv4/tcp_input.c tcp_reset -> "
        "tcp_done), "
        "and epoll reported EPOLLIN|EPOLLOUT|EPOLLERR|EPOLLHUP|EPOLLRDHUP (notebook 05 measures it): EPOLLERR from "
        "sk_err, the rest from the CLOSE state and shutdown both ways that tcp_done set (net/ipv4/tcp.c "
        "tcp_poll); EPOLLERR|EPOLLHUP send nginx to the read handler, which reads SO_ERROR",
    ("so_error", _errno.ETIMEDOUT, None): "the kernel gave up resending the SYN before nginx's "
        "proxy_connect_timeout fired (net/ipv4/tcp_timer.c tcp_write_timeout -> tcp_write_err). With the defaults "
        "(tcp_syn_retries 6, tcp_syn_linear_timeouts 4) the kernel gives up at the timer that fires at 131 s, "
        "late by up to a few seconds of timer-wheel rounding (notebook 06 recorded 133.68 s; tcp_model_timeout's "
        "127 s is only the time budget). nginx has no 75 s cap (that figure in its docs is about the OS), so this "
        "line means either proxy_connect_timeout is longer than that, or the kernel's limit was shortened: "
        "net.ipv4.tcp_syn_retries, tcp_syn_linear_timeouts or tcp_rto_max_ms (6.15+) lowered, or TCP_SYNCNT / "
        "TCP_USER_TIMEOUT set on the socket (measured here: tcp_rto_max_ms 1000 in a namespace, the rest default, "
        "ends it after about 7 s and six resends: every timer is capped at 1 s and so is tcp_model_timeout's "
        "budget)",
    ("so_error", _errno.EHOSTUNREACH, None): "an ICMP host unreachable came back for the SYN (a router, or this "
        "host's own ARP/neighbour resolution failed for an on-link peer) (net/ipv4/icmp.c icmp_err_convert[], "
        "net/ipv4/tcp_ipv4.c tcp_v4_err: in SYN-SENT the error ends the connect); or, with no ICMP, the route to "
        "the peer became an unreachable route between SYN resends: the resend's failed route lookup "
        "(net/ipv4/af_inet.c inet_sk_rebuild_header) kept the errno in sk_err_soft and tcp_write_err reported it "
        "when the retries ran out",
    ("so_error", _errno.ENETUNREACH, None): "either an ICMP net unreachable came back for the SYN from a router on "
        "the path (net/ipv4/icmp.c icmp_err_convert[], net/ipv4/tcp_ipv4.c tcp_v4_err), or, with no ICMP at all, "
        "the route to the peer disappeared between SYN resends: the resend's route lookup failed "
        "(net/ipv4/af_inet.c inet_sk_rebuild_header; IPv6 inet6_sk_rebuild_header), the errno was kept in "
        "sk_err_soft, and tcp_write_err reported it instead of ETIMEDOUT when the retries ran out (notebook 05 "
        "measures this: ENETUNREACH after about 3 s with TCP_SYNCNT 1)",
    # A SYN resend's failed route lookup, kept in sk_err_soft (measured here, each in a namespace, TCP_SYNCNT 1: the
    # route deleted -> ENETUNREACH, replaced by unreachable -> EHOSTUNREACH, prohibit -> EACCES, blackhole -> EINVAL,
    # an xfrm block policy added -> EPERM; each at give-up, about 3 s).  icmp_err_convert[] has no EACCES/EINVAL/EPERM.
    ("so_error", _errno.EACCES, None): "no ICMP: the route to the peer became a prohibit route between SYN resends: "
        + _SOFT + " (measured here); net/ipv4/icmp.c icmp_err_convert[] never gives EACCES",
    ("so_error", _errno.EINVAL, None): "no ICMP: the route to the peer became a blackhole route between SYN resends: "
        + _SOFT + " (measured here)",
    ("so_error", _errno.EPERM, None): "no ICMP and not netfilter: an IPsec policy with action block for the peer "
        "was added between SYN resends (net/xfrm/xfrm_policy.c xfrm_lookup_with_ifid): " + _SOFT + " (measured "
        "here); a netfilter verdict on a resend is stored nowhere",
    ("so_error", _errno.ECONNRESET, None): "the handshake was reset after connect() returned EINPROGRESS",
    ("so_error", _errno.EHOSTDOWN, None): "an ICMP host unknown came back for the SYN (icmp_err_convert[])",
    ("timeout", _errno.ETIMEDOUT, None): "nothing: the socket was still in SYN-SENT -- SYNs or SYN-ACKs lost, a "
        "host that has gone, a firewall that drops, or a full accept queue dropping SYNs -- when nginx's own timer "
        "fired; nginx closed it without reading SO_ERROR",
    ("timeout_header", _errno.ETIMEDOUT, None): "nothing: the connection was up and the request sent, but no "
        "complete response header arrived within proxy_read_timeout (the backend is slow or stuck)",
    ("timeout_send", _errno.ETIMEDOUT, None): "nothing: the connection was up but the request could not be "
        "written within proxy_send_timeout (the peer's receive window stayed shut) -- or the connect never "
        "finished: nginx 1.22.1 can take a pending connect for done when one epoll event's handler reuses the "
        "connection twice (notebook 14, section 5), and the connect timer becomes proxy_send_timeout",
    ("socket", _errno.EMFILE, None): "the worker process reached its open-file limit, RLIMIT_NOFILE "
        "(worker_rlimit_nofile, ulimit -n) (fs/file.c alloc_fd)",
    ("socket", _errno.ENFILE, None): "the whole system reached fs.file-max open files",
    ("socket", _errno.ENOBUFS, None): "the kernel had no memory for a new socket",
    ("socket", _errno.ENOMEM, None): "the kernel had no memory for a new socket",
    ("socket", _errno.EAFNOSUPPORT, None): "the address family is not available (IPv6 disabled in this kernel)",
    ("setsockopt", _errno.EPERM, None): "IP_TRANSPARENT (proxy_bind ... transparent) needs CAP_NET_RAW or "
        "CAP_NET_ADMIN in the socket's network namespace, and the worker process lacks both (net/ipv4/ip_sockglue.c "
        "do_ip_setsockopt, IP_TRANSPARENT): nginx ends the request with 500",
    ("bind", _errno.EADDRNOTAVAIL, None): "proxy_bind names an address that is not on this host (add "
        "`transparent`, or an address the host has)",
    ("bind", _errno.EADDRINUSE, None): "no free local port on the proxy_bind address (bind() picks the port when "
        "IP_BIND_ADDRESS_NO_PORT is not in effect)",
    ("closed", 0, None): "the upstream closed the connection (FIN: recv() returned 0) before a complete response "
        "header arrived: the backend crashed or exited, or it closed an idle keepalive connection just as nginx "
        "reused it",
    ("recv", _errno.ECONNRESET, None): "the upstream's kernel sent RST: the backend closed with unread data or "
        "SO_LINGER {1, 0}, or was killed; on a reused keepalive connection, the backend had already closed it",
    ("writev", _errno.EPIPE, None): "the upstream had already closed the connection when nginx wrote the request",
    ("writev", _errno.ECONNRESET, None): "the upstream reset the connection when nginx wrote the request",
    ("ssl_read", 0, None): "no syscall failed: OpenSSL found an error in the upstream's TLS records or an alert "
        "(the reason in the line); a reset with nothing in OpenSSL's queue is logged as 'upstream prematurely "
        "closed connection' instead",
}

# -- the next-peer and max_fails answers, asked of nbconn.nginx.upstream -----------------------------------------------
_model_cache: dict = {}


def _model(outcome: str, *, single: bool) -> tuple:
    """Ask the upstream model (pure: a hand clock, no I/O) what a failed attempt does: (the request moves on to
    another peer, the failure is counted against max_fails)."""
    key = (outcome, single)
    if key not in _model_cache:
        from .upstream import Upstream

        up = Upstream(["127.0.0.1:1"] if single else ["127.0.0.1:1", "127.0.0.1:2"], clock=lambda: 1000)
        req = up.request()
        peer = req.next_peer()
        req.report(outcome)
        _model_cache[key] = (req.result is None, peer.fails > 0)
    return _model_cache[key]


def _next_peer(kind: str, ngx_code: str | None, ngx_next: str | None, module: str | None,
               outcome: str | None = None) -> dict:
    """Whether nginx tries another peer and counts the failure against max_fails, and why.  ``outcome``: the
    failed try's outcome, asked of the model for a TLS line (its failures are the handshake's, not a refusal)."""
    if kind == "no_live":
        parts = ["no server is eligible (all down, or each has failed max_fails times within its fail_timeout, or "
                 "all were tried); no connect was made, nothing is counted"]
        if module != STREAM:
            parts.append("HTTP: 502 (ngx_http_upstream_next with FT_NOLIVE)")
        if module != HTTP:
            parts.append("stream: the session ends, 502 in $status")
        return {"tries_another": False, "counts_against_max_fails": False, "detail": "; ".join(parts)}
    if kind == "disabled":
        return {"tries_another": None, "counts_against_max_fails": True,
                "detail": "the failure logged next to this line brought the server's fails to max_fails (or "
                          "beyond: while fails >= max_fails every failure logs this again). fails is no count within "
                          "a time window: only a success on a try made after fail_timeout had passed clears it "
                          "(accessed < checked). The round robin skips the server until fail_timeout has passed "
                          "since its last failure, then gives it one try (ngx_http_upstream_round_robin.c "
                          "ngx_http_upstream_free_round_robin_peer lines 591-593, 630-640; get_peer 487-511)"}
    if kind == "setsockopt" and ngx_code is None:
        return {"tries_another": False, "counts_against_max_fails": False,
                "detail": "\"failed, ignored\": nginx logs it and the connect goes on with this socket"}
    if kind == "tls_set_session":
        return {"tries_another": False, "counts_against_max_fails": False,
                "detail": "the request ends with 500 (ngx_http_upstream_ssl_init_connection lines 1709-1713, "
                          "ngx_http_upstream_finalize_request); the peer is freed with state 0, so max_fails is "
                          "not touched; unlike a failure before connect(), this try is in $upstream_addr "
                          "(u->state->peer was set at line 1550)"}
    if ngx_code == errors.NGX_ERROR and ngx_next is None or kind in ("worker_connections", "files"):
        return {"tries_another": False, "counts_against_max_fails": False,
                "detail": "NGX_ERROR: the request ends with 500 (ngx_http_upstream.c line 1544; stream: "
                          "ngx_stream_proxy_connect line 736); the peer is freed with state 0, so max_fails is "
                          "not touched (ngx_http_upstream_finalize_request line 4484)"}
    if kind == "recv" and module == STREAM:
        return {"tries_another": False, "counts_against_max_fails": False,
                "detail": "the stream session is already proxying: the error ends it (ngx_stream_proxy_process "
                          "sets eof), no other peer is tried, the peer is freed with state 0 "
                          "(ngx_stream_proxy_finalize line 1996)"}
    timeout = ngx_next == errors.NGX_HTTP_UPSTREAM_FT_TIMEOUT
    asked = outcome if kind.startswith("tls_") and outcome else "timed_out" if timeout else "refused"
    moves_on, counted = _model(asked, single=False)
    _, single_counted = _model(asked, single=True)
    word = "timeout" if timeout else "error"
    status = "504" if timeout else "502"
    parts = []
    if module != STREAM:
        parts.append(f"HTTP: another peer when '{word}' is in proxy_next_upstream (default: error timeout), tries "
                     f"are left (proxy_next_upstream_tries, at most the number of servers) and "
                     f"proxy_next_upstream_timeout has not passed; otherwise {status}")
        if kind.startswith("tls_"):
            parts.append("the request has not been sent, so any method may go on; moving on, nginx closes the "
                         "handshake's connection without a close_notify (ngx_http_upstream_next, lines 4413-4414); "
                         "the [warn] of a server this failure disables says 'while SSL handshaking to upstream'")
        if kind == "closed":
            parts.append("under proxy_pass https:// this line can also come before the TLS handshake: a peer that "
                         "closed at once, its FIN reported with the connect's EPOLLOUT, is read first by the read "
                         "handler's plain recv() (ngx_http_upstream_process_header); then no request was sent and "
                         "any method goes on")
        if kind in ("closed", "recv", "writev", "ssl_write", "ssl_read", "timeout_header", "timeout_send"):
            parts.append("the request was sent: a POST/LOCK/PATCH is retried only with 'non_idempotent' "
                         "(ngx_http_upstream_next, line 4364); a connection from the keepalive cache gives its try "
                         "back (u->peer.cached, line 4310)")
    if module != HTTP:
        parts.append("stream: another peer when proxy_next_upstream is on (the default), tries and "
                     "proxy_next_upstream_timeout allow (ngx_stream_proxy_next_upstream line 1921); otherwise the "
                     "session ends, 502 in $status")
    parts.append(f"counted against max_fails: {'yes' if counted else 'no'} (fails += 1; max_fails=0 turns the "
                 f"counting off); a single-server upstream is {'also counted' if single_counted else 'never counted'}"
                 f" and gets one try")
    return {"tries_another": moves_on, "counts_against_max_fails": counted, "detail": "; ".join(parts)}


# -- decode -----------------------------------------------------------------------------------------------------
def _match(message: str) -> tuple:
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(message)
        if m is not None:
            return kind, m
    return None, None


#: What the kernel and OpenSSL said, for the TLS handshake's lines (kind, or "tls_ssl:REASON" first).
_TLS_SAID = {
    "tls_timeout": "nothing failed: the TCP connect had succeeded (the client's kernel saw the SYN-ACK), the "
        "ClientHello went out, and no answer completed the handshake before the timer fired -- a peer that accepts "
        "but does not speak TLS on that port, a stuck or slow TLS server, or a listener whose accept queue was full: "
        "the client is ESTABLISHED but the server dropped its final ACK and the ClientHello (tcp_check_req, "
        "tcp_abort_on_overflow 0), so nothing is queued or accepted there (the server's ListenOverflows counter "
        "says so). "
        "The timer is the connect's: proxy_connect_timeout bounds connect and handshake together when connect() "
        "returned EINPROGRESS (ngx_http_upstream_ssl_init_connection arms one only if none is set, line 1733), and "
        "a fresh proxy_connect_timeout covers the handshake alone when connect() returned 0 (AF_UNIX)",
    "tls_ssl": "OpenSSL's SSL_do_handshake() returned SSL_ERROR_SSL: the handshake broke on a TLS-level error, "
        "named in the (SSL: ...) part; the TCP connection itself was fine",
    "tls_ssl:TLSV1_ALERT_PROTOCOL_VERSION": "the peer sent a fatal protocol_version alert (70): no TLS version both "
        "sides allow -- proxy_ssl_protocols (nginx 1.22.1's default for upstreams stops at TLSv1.2) against the "
        "server's; measured here: proxy_ssl_protocols TLSv1.3 against a TLS 1.2-only server",
    "tls_ssl:SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer sent a fatal handshake_failure alert (40): usually no cipher "
        "or group in common (proxy_ssl_ciphers, the server's list), or the server wants something the client lacks",
    "tls_ssl:TLSV1_ALERT_UNKNOWN_CA": "the peer sent unknown_ca (48): it verifies a client certificate "
        "(proxy_ssl_certificate) and does not trust its issuer",
    "tls_ssl:WRONG_VERSION_NUMBER": "what came back was not a TLS record: the peer does not speak TLS on that port "
        "(plain HTTP, another protocol)",
    "tls_ssl:UNSUPPORTED_PROTOCOL": "this side's OpenSSL refused the version the server chose (below "
        "proxy_ssl_protocols' or OpenSSL's own minimum)",
    "tls_closed": "the peer closed the TCP connection (recv() returned 0) or reset it (the errno in the line) "
        "before the handshake ended, with no TLS alert: a server that drops connections it will not serve, a "
        "process that died, a load balancer in front; OpenSSL queued no error (ngx_ssl_handshake, "
        "ERR_peek_error() == 0)",
    "tls_verify": "the handshake completed; OpenSSL's check of the peer's certificate chain against "
        "proxy_ssl_trusted_certificate (depth proxy_ssl_verify_depth, 1 by default) failed with that X509_V_ERR "
        "code. nginx verifies with SSL_VERIFY_NONE and a callback that accepts everything, so verification goes on "
        "past the first error and the *last* one is logged: a lone leaf from an unknown CA gives 21 (unable to verify "
        "the first certificate), not 20 (measured here against nginx 1.22.1)",
    "tls_name": "the chain verified, but X509_check_host found proxy_ssl_name (default: the proxy_pass host, "
        "$proxy_host) in none of the certificate's DNS names (an IP literal never matches: X509_check_host compares "
        "DNS names only)",
    "tls_set_session": "OpenSSL refused the peer's saved session (SSL_set_session() returned 0; in OpenSSL 1.1 "
        "and later only when it cannot switch the connection to the session's method -- a session from another "
        "version is accepted there and simply not resumed); nothing was sent yet",
}


def _kernel(kind: str, err: int | None, upstream: str | None) -> str:
    if kind.startswith("tls_"):
        said = _TLS_SAID.get(kind) or _TLS_SAID[kind.partition(":")[0]]
        if kind.startswith("tls_closed") and err:
            said += f"; {errors.errno_name(err)}: " + _KERNEL.get(("recv", err, None), "an error from recv()")
        return said
    unix = bool(upstream and upstream.startswith("unix:"))
    kind = "writev" if kind == "ssl_write" else kind  # the same write failing, on an SSL connection
    for key in ((kind, err or 0, unix), (kind, err or 0, None)):
        if key in _KERNEL:
            return _KERNEL[key]
    if kind in ("no_live", "disabled", "worker_connections", "files"):
        return "nothing: nginx's own decision, no syscall failed"
    if err:
        return f"{errors.errno_name(err)} from the {kind} step; nbconn has no notes on this errno here"
    return "nothing"


def outside(text: str, line: Line | None = None, reason: str = "") -> dict:
    """The answer for a line that is not one of nginx's upstream-connect texts."""
    return {"line": text, "cause": "outside", "step": OUTSIDE,
            "explanation": reason or "not one of the texts nginx 1.22.1 writes while connecting to an upstream "
                                     "or reading its header; not guessed at",
            "time": line.time if line else None, "level": line.level if line else None,
            "upstream": line.upstream if line else None}


def decode(text: str, *, bare: bool = True) -> dict | None:
    """Decode one error-log line (the whole line with its date and level, or just its message).  Returns a dict (see the module doc) whose
    ``cause`` is a short name such as ``"connect:ECONNREFUSED"`` or ``"outside"``; None when ``bare`` is False
    and ``text`` is not an nginx error-log line at all."""
    line = split(text, bare=bare)
    if line is None:
        return None
    return decode_line(text, line)


def decode_line(text: str, line: Line) -> dict:
    """:func:`decode` for a line already taken apart by :func:`split`."""
    kind, m = _match(line.message)
    if kind is None:
        return outside(text, line)
    if line.action is not None and line.action not in _KIND_ACTIONS[kind]:
        return outside(text, line, f"nginx writes this text while connecting to upstream, not while {line.action}")
    if kind == "timeout" and line.action in _AFTER_CONNECT_TIMEOUTS:
        kind = _AFTER_CONNECT_TIMEOUTS[line.action]
        if kind != "tls_timeout":  # the stream module hands shakes too; it sends no request, reads no header
            line = line._replace(module=HTTP)
    row = _KINDS[kind]
    found = m.groupdict()
    err = int(found["err"]) if found.get("err") else None
    detail = found.get("detail")
    upstream = line.upstream or (detail if kind == "connect" else None)
    if kind in _TLS_VERDICT_KIND:
        v = _tls_verdict(kind, found, err)
        expected, ngx_code, ngx_next, outcome = v.level, v.ngx_code, v.ngx_next, v.outcome
        if kind == "tls_ssl":
            reason = _tls_reason(detail)
            if reason:
                kind = f"tls_ssl:{reason}"
    elif row.stage is not None:
        v = errors.verdict(row.stage, err, detail=_SETSOCKOPT_OPTION.get(detail, detail) or "")
        expected, ngx_code, ngx_next, outcome = v.level, v.ngx_code, v.ngx_next, v.outcome
    else:
        expected, ngx_code, ngx_next, outcome = row.level, row.ngx_code, row.ngx_next, row.outcome
        if expected is None and kind in ("ssl_write", "ssl_read") and detail:
            expected = _ssl_level(detail)  # ngx_ssl_connection_error for SSL_ERROR_SSL: by OpenSSL reason
        if expected is None:  # ngx_connection_error's rule (ngx_connection.c lines 1508-1537)
            expected = _ERR if err in errors.NGX_CONNECTION_ERROR_ERR_ERRNOS else _ALERT
        if outcome is None and err:
            outcome = errors.outcome_for(err)
        if kind == "recv" and line.module == STREAM:
            ngx_next = None  # a stream session that is proxying ends; no next upstream
            row = row._replace(step=STEP_PROXYING, source="os/unix/ngx_recv.c ngx_unix_recv line 188 "
                               "(ngx_connection_error); ngx_stream_proxy_module.c ngx_stream_proxy_process line 1699")
    return _answer(text, line, kind, row, err, upstream, ngx_code, ngx_next, outcome, expected)


_OPENSSL_CODE = re.compile(r"error:([0-9A-F]{8}):")


def _tls_reason(detail: str | None) -> str | None:
    """The first OpenSSL reason name in the "(SSL: error:0A00042E:SSL routines::...)" part, or None."""
    from .tls import reason_of_code

    found = _OPENSSL_CODE.search(detail or "")
    return reason_of_code(found.group(1)) if found else None


def _ssl_level(detail: str) -> str:
    """ngx_ssl_connection_error's level for an OpenSSL error after the handshake: nbconn.nginx.tls's rule."""
    from .tls import NGX_SSL_HANDSHAKE_FAILURE_REASONS

    return _ERR if _tls_reason(detail) in NGX_SSL_HANDSHAKE_FAILURE_REASONS else errors.NGX_LOG_CRIT


def _tls_verdict(kind: str, found: dict, err: int | None):
    """nbconn.nginx.tls.handshake_verdict for a TLS line: the one table of what nginx makes of a handshake's end."""
    from .tls import handshake_verdict

    which = _TLS_VERDICT_KIND[kind]
    if which == "ssl":
        return handshake_verdict("ssl", reason=_tls_reason(found.get("detail")) or "")
    if which == "closed":
        return handshake_verdict("closed", err=err or 0)
    if which == "verify":
        return handshake_verdict("verify", verify_code=int(found["code"]), verify_message=found["detail"])
    if which == "hostname":
        return handshake_verdict("hostname", server_name=found["detail"])
    return handshake_verdict("timeout")


def _answer(text, line, kind, row, err, upstream, ngx_code, ngx_next, outcome, expected) -> dict:
    name = errors.errno_name(err) if err else None
    cause = f"{kind}:{name}" if name and not kind.startswith(("timeout", "tls_timeout", "tls_ssl:")) else kind
    level_note = None
    if line.level is not None and expected is not None and line.level != expected:
        level_note = (f"unexpected level: nginx 1.22.1 writes this line at [{expected}], this one is "
                      f"[{line.level}] -- another nginx version, a patched build, or a different cause")
    return {
        "line": text,
        "cause": cause,
        "step": row.step,
        "module": line.module,
        "time": line.time,
        "upstream": upstream,
        "errno": err,
        "errno_name": name,
        "kernel": _kernel(kind, err, upstream),
        "outcome": outcome,
        "ngx_code": ngx_code,
        "ngx_next": ngx_next,
        **_next_peer(kind, ngx_code, ngx_next, line.module, outcome),
        "directives": list(row.directives),
        "level": line.level,
        "expected_level": expected,
        "level_note": level_note,
        "notebook": row.notebook,
        "source": f"nginx 1.22.1 {row.source}",
    }


def render(answer: dict) -> str:
    """The text form of one decoded line."""
    out = [answer["line"]]
    if answer["cause"] == "outside":
        out.append(f"  {OUTSIDE}: {answer['explanation']}")
        return "\n".join(out)
    err = f"{answer['errno']} {answer['errno_name']}" if answer["errno"] else "none"
    tries = {True: "yes", False: "no", None: "-"}
    out += [
        f"  cause:      {answer['cause']}" + (f"  ({answer['module']} module)" if answer["module"] else ""),
        f"  step:       {answer['step']}",
        f"  errno:      {err}",
        f"  kernel:     {answer['kernel']}",
        f"  nginx:      code {answer['ngx_code'] or '-'}, next-upstream kind {answer['ngx_next'] or '-'}, "
        f"outcome {answer['outcome'] or '-'}",
        f"  next peer:  {tries[answer['tries_another']]}; counts against max_fails: "
        f"{tries[answer['counts_against_max_fails']]}",
        f"              {answer['detail']}",
        f"  directives: {', '.join(answer['directives']) or '-'}",
        f"  level:      [{answer['expected_level']}]" + (f"; {answer['level_note']}" if answer["level_note"] else ""),
        f"  notebook:   notebooks/{answer['notebook']}",
        f"  source:     {answer['source']}",
    ]
    return "\n".join(out)


# -- many lines: the --log summary -----------------------------------------------------------------------------
MAX_UPSTREAMS = 10_000  # distinct upstream names kept; more are counted under "(other)"
MAX_BURSTS = 20  # the largest bursts kept


class Summary:
    """Counts over a stream of lines in bounded memory: per cause and per upstream, first and last time seen,
    and bursts (``burst`` or more lines of one cause in one second).  Feed lines with :meth:`add`."""

    def __init__(self, *, burst: int = 10) -> None:
        self.burst = burst
        self.lines = 0
        self.not_nginx = 0
        self.outside = 0
        self.causes: dict = {}  # cause -> {"count", "first", "last", "example", "level_notes"}
        self.upstreams: dict = {}  # upstream -> {cause: count}
        self.bursts: list = []  # (count, second, cause), the largest MAX_BURSTS
        self.burst_count = 0
        self._second: dict = {}  # cause -> [second, count] of the current second
        self._cache: dict = {}  # message shape -> decoded (without time/upstream), bounded

    def add(self, text: str) -> str | None:
        """Count one line; returns its cause ("outside" for other nginx lines), None for a non-nginx line."""
        self.lines += 1
        line = split(text, bare=False)
        if line is None:
            self.not_nginx += 1
            return None
        # Lines of one shape decode alike: decode once per (level, message, action, module), in a bounded cache.
        key = (line.level, line.message, line.action, line.module,
               bool(line.upstream and line.upstream.startswith("unix:")))
        known = self._cache.get(key)
        if known is None:
            answer = decode_line(text, line)
            known = (answer["cause"], answer.get("step"), bool(answer.get("level_note")), answer.get("upstream"))
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[key] = known
        cause, step, unexpected, decoded_upstream = known
        if cause == "outside":
            self.outside += 1
            return cause
        when = line.time
        entry = self.causes.get(cause)
        if entry is None:
            entry = self.causes[cause] = {"count": 0, "first": when, "last": when, "step": step,
                                          "example": text.rstrip("\n")[:500], "unexpected_level": 0}
        entry["count"] += 1
        entry["last"] = when
        if unexpected:
            entry["unexpected_level"] += 1
        name = line.upstream or decoded_upstream or "(none)"
        if name not in self.upstreams and len(self.upstreams) >= MAX_UPSTREAMS:
            name = "(other)"
        per = self.upstreams.setdefault(name, {})
        per[cause] = per.get(cause, 0) + 1
        self._tick(cause, when)
        return cause

    def _tick(self, cause: str, when: str) -> None:
        current = self._second.get(cause)
        if current is not None and current[0] == when:
            current[1] += 1
            return
        if current is not None:
            self._close(cause, current)
        self._second[cause] = [when, 1]

    def _close(self, cause: str, current: list) -> None:
        if current[1] >= self.burst:
            self.burst_count += 1
            self.bursts.append((current[1], current[0], cause))
            self.bursts.sort(key=lambda b: (-b[0], b[1]))
            del self.bursts[MAX_BURSTS:]

    def finish(self) -> dict:
        """Close the open seconds and return the summary as plain data."""
        for cause, current in self._second.items():
            self._close(cause, current)
        self._second = {}
        return {
            "lines": self.lines, "not_nginx_lines": self.not_nginx, "outside_connect_flow": self.outside,
            "decoded": self.lines - self.not_nginx - self.outside,
            "causes": dict(sorted(self.causes.items(), key=lambda kv: -kv[1]["count"])),
            "upstreams": {k: dict(sorted(v.items(), key=lambda kv: -kv[1]))
                          for k, v in sorted(self.upstreams.items(), key=lambda kv: -sum(kv[1].values()))},
            "burst_threshold": self.burst, "bursts_seen": self.burst_count,
            "bursts": [{"count": n, "second": s, "cause": c} for n, s, c in self.bursts],
        }


def render_summary(summary: dict) -> str:
    out = [f"{summary['lines']} lines: {summary['decoded']} from the connect flow, "
           f"{summary['outside_connect_flow']} other nginx lines (outside the connect flow), "
           f"{summary['not_nginx_lines']} not nginx error-log lines (skipped)"]
    if summary["causes"]:
        out.append("per cause:")
        for cause, e in summary["causes"].items():
            note = f", {e['unexpected_level']} at an unexpected level" if e["unexpected_level"] else ""
            out.append(f"  {e['count']:>9}  {cause:<32} {e['step']}; first {e['first']}, last {e['last']}{note}")
    if summary["upstreams"]:
        out.append("per upstream:")
        for name, per in list(summary["upstreams"].items())[:50]:
            causes = ", ".join(f"{c} {n}" for c, n in per.items())
            out.append(f"  {sum(per.values()):>9}  {name}: {causes}")
    out.append(f"bursts ({summary['burst_threshold']} or more of one cause in one second): {summary['bursts_seen']}")
    for b in summary["bursts"][:10]:
        out.append(f"  {b['count']:>9}  {b['cause']} at {b['second']}")
    return "\n".join(out)
