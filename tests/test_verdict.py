"""The verdict table, socket-free: every errno connect() and SO_ERROR can give, against nginx 1.22.1's rules.

The expected levels are restated here from the source, not imported from nbconn.errors, so a slip in the
table shows up as a difference:
- ngx_event_connect_peer (src/event/ngx_event_connect.c lines 220-238): connect() errnos at ERR;
- ngx_connection_error (src/core/ngx_connection.c lines 1508-1537): SO_ERROR errnos at ERR, others ALERT.
"""

import errno as E
import os

import pytest

from nbconn import errors
from nbconn.errors import CONNECT_ERRNOS, SO_ERROR_ERRNOS, STAGES, verdict

CONNECT_ERR = {E.ECONNREFUSED, E.EAGAIN, E.ECONNRESET, E.ENETDOWN, E.ENETUNREACH, E.EHOSTDOWN, E.EHOSTUNREACH}
CONNECTION_ERROR_ERR = {E.ECONNRESET, E.EPIPE, E.ENOTCONN, E.ETIMEDOUT, E.ECONNREFUSED, E.ENETDOWN,
                        E.ENETUNREACH, E.EHOSTDOWN, E.EHOSTUNREACH}
OUTCOME = {E.ECONNREFUSED: "refused", E.EAGAIN: "refused", E.ETIMEDOUT: "timed_out", E.ECONNRESET: "reset",
           E.ENETUNREACH: "unreachable", E.EHOSTUNREACH: "unreachable", E.ENETDOWN: "unreachable",
           E.EHOSTDOWN: "unreachable"}


def test_the_lists_cover_connect2_and_the_icmp_errors():
    # connect(2), ERRORS section
    for name in ("EACCES", "EPERM", "EADDRINUSE", "EADDRNOTAVAIL", "EAFNOSUPPORT", "EAGAIN", "EALREADY", "EBADF",
                 "ECONNREFUSED", "EFAULT", "EINTR", "EISCONN", "ENETUNREACH", "ENOTSOCK", "EPROTOTYPE", "ETIMEDOUT"):
        assert getattr(E, name) in CONNECT_ERRNOS, name
    # net/ipv4/icmp.c icmp_err_convert[] and the handshake's own failures
    for name in ("ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH", "EHOSTUNREACH", "ENOPROTOOPT",
                 "EMSGSIZE", "EOPNOTSUPP", "ENONET", "EHOSTDOWN", "EACCES"):
        assert getattr(E, name) in SO_ERROR_ERRNOS, name
    assert E.EINPROGRESS not in CONNECT_ERRNOS  # not a failure: NGX_AGAIN


def test_connect_success_and_in_progress():
    assert verdict("connect", 0) == (errors.CONNECTED, "NGX_OK", None, None, None)
    assert verdict("connect", E.EINPROGRESS) == (None, "NGX_AGAIN", None, None, None)


@pytest.mark.parametrize("err", CONNECT_ERRNOS, ids=[E.errorcode[e] for e in CONNECT_ERRNOS])
def test_every_connect_errno_is_declined_next_upstream(err):
    v = verdict("connect", err, detail="127.0.0.1:80")
    assert v.ngx_code == "NGX_DECLINED" and v.ngx_next == "NGX_HTTP_UPSTREAM_FT_ERROR"
    assert v.level == ("error" if err in CONNECT_ERR else "crit")
    assert v.outcome == OUTCOME.get(err, "error")
    assert v.log == f"connect() to 127.0.0.1:80 failed ({err}: {os.strerror(err)}) while connecting to upstream"


@pytest.mark.parametrize("err", SO_ERROR_ERRNOS, ids=[E.errorcode[e] for e in SO_ERROR_ERRNOS])
def test_every_so_error_errno_is_ngx_error_next_upstream(err):
    v = verdict("so_error", err)
    assert v.ngx_code == "NGX_ERROR" and v.ngx_next == "NGX_HTTP_UPSTREAM_FT_ERROR"
    assert v.level == ("error" if err in CONNECTION_ERROR_ERR else "alert")
    assert v.outcome == OUTCOME.get(err, "error")
    assert v.log == f"connect() failed ({err}: {os.strerror(err)}) while connecting to upstream"


def test_so_error_zero_is_connected():
    assert verdict("so_error", 0) == (errors.CONNECTED, "NGX_OK", None, None, None)


def test_eagain_means_refused_at_connect_but_alert_from_so_error():
    # Linux's full AF_UNIX backlog: ngx_event_connect_peer has EAGAIN in its ERR list, ngx_connection_error not
    assert verdict("connect", E.EAGAIN).level == "error"
    assert verdict("so_error", E.EAGAIN).level == "alert"


def test_timer_is_ft_timeout_logged_at_error():
    v = verdict("timeout", None)
    assert v == ("timed_out", "NGX_HTTP_UPSTREAM_FT_TIMEOUT", "NGX_HTTP_UPSTREAM_FT_TIMEOUT", "error",
                 "upstream timed out (110: Connection timed out) while connecting to upstream")


@pytest.mark.parametrize("stage, detail, level, text", [
    ("socket", "", "alert", "socket() failed"),
    ("nonblocking", "ioctl(FIONBIO)", "alert", "ioctl(FIONBIO) failed"),
    ("bind", "127.0.0.2:0", "crit", "bind(127.0.0.2:0) failed"),
    ("epoll_ctl", 7, "alert", "epoll_ctl(EPOLL_CTL_ADD, 7) failed"),
    ("setsockopt", "rcvbuf", "alert", "setsockopt(SO_RCVBUF) failed"),
])
@pytest.mark.parametrize("err", [E.EMFILE, E.ENFILE, E.ENOBUFS, E.ENOMEM, E.EACCES, E.EADDRINUSE, E.EINVAL])
def test_steps_before_connect_are_ngx_error_without_next_upstream(stage, detail, level, text, err):
    v = verdict(stage, err, detail=detail)
    assert (v.outcome, v.ngx_code, v.ngx_next, v.level) == ("error", "NGX_ERROR", None, level)
    assert v.log == f"{text} ({err}: {os.strerror(err)}) while connecting to upstream"


def test_ignored_setsockopt_failures_go_on_with_a_log_line():
    v = verdict("setsockopt", E.EINVAL, detail="keepalive")
    assert (v.outcome, v.ngx_code, v.ngx_next, v.level) == (None, None, None, "alert")
    assert v.log.startswith("setsockopt(SO_KEEPALIVE) failed, ignored (22: ")
    # IP_BIND_ADDRESS_NO_PORT: silent for EOPNOTSUPP / ENOPROTOOPT (ngx_event_connect.c lines 119-127)
    assert verdict("setsockopt", E.ENOPROTOOPT, detail="bind_address_no_port") == (None,) * 5
    assert verdict("setsockopt", E.EINVAL, detail="bind_address_no_port").level == "alert"
    # an option nginx does not set: ignored, as nginx ignores SO_KEEPALIVE
    assert verdict("setsockopt", E.EINVAL, detail="nodelay").ngx_code is None


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("connect", "so_error", "timeout", "get_connection")])
def test_success_before_connect_goes_on(stage):
    assert verdict(stage, 0) == (None,) * 5


def test_outcome_colours_cover_every_outcome():
    from nbconn.view import plots

    assert set(plots.OUTCOME_COLOURS) == set(errors.OUTCOMES)


def test_no_free_connection_is_ngx_error_500_without_errno():
    """ngx_get_connection (ngx_connection.c 1.22.1): "%ui worker_connections are not enough", ALERT, err 0."""
    v = verdict("get_connection", None, detail=64)
    assert (v.outcome, v.ngx_code, v.ngx_next, v.level) == ("error", "NGX_ERROR", None, "alert")
    assert v.log == "64 worker_connections are not enough while connecting to upstream"


def test_proxy_bind_transparent_failure_is_fatal():
    v = verdict("setsockopt", E.EPERM, detail="transparent")
    assert (v.outcome, v.ngx_code, v.ngx_next, v.level) == ("error", "NGX_ERROR", None, "alert")
    assert v.log == (f"setsockopt(IP_TRANSPARENT) failed ({E.EPERM}: {os.strerror(E.EPERM)}) while connecting to "
                     f"upstream")
