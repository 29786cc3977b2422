"""The five steps against real peers on loopback and AF_UNIX: what this kernel answers, and nginx's verdict."""

import dataclasses
import errno
import json
import socket

import pytest

import nbconn
from nbconn import socketsource
from nbconn.flow import (CONNECTING, DONE, PROCESS_HEADER, SEND_REQUEST, Attempt, State, handler_reading_so_error,
                         make_plan)
from nbconn.result import format_ns
from nbconn.settings import Settings
from nbconn.lab import blackhole, listening, refused, reset, unix_full, unix_listening, unix_missing
from nbconn.loop import Loop
from nbconn.targets import parse_target

SEED_ORDER = ["socket", "nonblocking", "epoll_ctl", "connect"]


def names(res):
    return [s.name for s in res.steps]


def test_listening_peer_connects_via_einprogress(no_fd_leak):
    with listening(hold=True) as target:  # hold: the peer's FIN must not race the TCP_INFO read
        with nbconn.connect(target, keep=True) as res:
            assert res.outcome == "connected" and res.errno is None
            # Measured on this kernel: even loopback takes the EINPROGRESS road.
            assert res.connect_returned == "EINPROGRESS"
            assert (res.ngx_connect, res.ngx_decision) == ("NGX_AGAIN", "NGX_OK")
            assert res.sock is not None and res.sock.getpeername()[1] == target.port
            assert res.tcp_info["state"] == "ESTABLISHED" and res.tcp_info["rtt_us"] > 0
            assert "EPOLLOUT" in res.events
        assert res.sock is None  # the context manager closed it
    assert names(res)[:4] == SEED_ORDER
    assert names(res)[4:] == ["timer", "epoll_wait", "so_error", "tcp_info", "unregister"]


def test_closed_port_einprogress_then_so_error_econnrefused(no_fd_leak):
    with refused() as target:
        res = nbconn.connect(target)
    assert res.connect_returned == "EINPROGRESS"  # what this kernel returns from connect()
    so_error = next(s for s in res.steps if s.name == "so_error")
    assert "SO_ERROR, [111]" in so_error.call  # ...and SO_ERROR then says ECONNREFUSED
    assert (res.outcome, res.errno, res.ngx_decision, res.ngx_next) == (
        "refused", "ECONNREFUSED", "NGX_ERROR", "NGX_HTTP_UPSTREAM_FT_ERROR")
    assert res.ngx_level == "error"  # ngx_connection_error's list
    assert res.ngx_log == "connect() failed (111: Connection refused) while connecting to upstream"
    assert "EPOLLERR" in res.events and "EPOLLHUP" in res.events
    assert names(res)[-2:] == ["unregister", "close"]


@pytest.mark.timing
def test_blackhole_times_out_within_50ms_of_deadline(no_fd_leak, late_tolerance_ms):
    with blackhole() as target:
        res = nbconn.connect(target, timeout=0.3)
    assert (res.outcome, res.errno, res.timer_fired, res.ngx_decision, res.ngx_next) == (
        "timed_out", "ETIMEDOUT", True, "NGX_HTTP_UPSTREAM_FT_TIMEOUT", "NGX_HTTP_UPSTREAM_FT_TIMEOUT")
    assert 300e6 <= res.handshake_ns, res.handshake_ns
    assert "so_error" not in names(res)  # nginx closes on a timer without reading SO_ERROR
    assert res.ngx_log.startswith("upstream timed out (110: Connection timed out)")
    assert names(res)[-4:] == ["timeout", "tcp_info", "unregister", "close"]  # TCP_INFO: the SYNs sent
    assert res.handshake_ns <= 300e6 + late_tolerance_ms(50) * 1e6, res.handshake_ns


def test_ipv6_loopback(no_fd_leak):
    with listening("::1") as target:
        res = nbconn.connect(target, keep=False)
    assert res.family == "AF_INET6" and res.outcome == "connected"
    with refused("::1") as target:
        assert nbconn.connect(target).outcome == "refused"


def test_unix_listening_connects_at_once(no_fd_leak):
    with unix_listening() as target:
        with nbconn.connect(target, keep=True) as res:
            assert (res.connect_returned, res.ngx_connect, res.ngx_decision) == (0, "NGX_OK", "NGX_OK")
            assert res.tcp_info is None and res.outcome == "connected"
    assert "epoll_wait" not in names(res)
    # NGX_OK still goes through ngx_http_upstream_send_request, whose test_connect reads SO_ERROR
    assert names(res)[3:5] == ["connect", "so_error"]
    so_error = res.steps[4]
    assert so_error.call.endswith("SO_ERROR, [0], [4]) = 0") and so_error.ngx_handler == SEND_REQUEST
    assert res.ngx_handler == SEND_REQUEST and "<- test_connect in ngx_http_upstream_send_request" in res.trace()
    assert res.handshake_ns == so_error.t_ns - res.steps[3].t_start_ns  # decided by that read, as after EINPROGRESS


def test_unix_full_backlog_is_eagain_treated_as_refused(no_fd_leak):
    with unix_full() as target:
        res = nbconn.connect(target)
    # Linux answers EAGAIN; ngx_event_connect_peer treats it like ECONNREFUSED (error level, next peer)
    assert (res.connect_returned, res.outcome, res.ngx_connect, res.ngx_level) == (
        "EAGAIN", "refused", "NGX_DECLINED", "error")


def test_unix_missing_path_is_enoent_crit(no_fd_leak):
    with unix_missing() as target:
        res = nbconn.connect(target)
    assert (res.connect_returned, res.outcome, res.ngx_connect, res.ngx_level) == (
        "ENOENT", "error", "NGX_DECLINED", "crit")
    assert res.ngx_log.startswith(f"connect() to {target} failed (2: No such file or directory)")


def test_unix_path_bound_but_not_listening_is_refused(tmp_path, no_fd_leak):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        res = nbconn.connect(f"unix:{path}")
    assert (res.connect_returned, res.outcome) == ("ECONNREFUSED", "refused")


def test_reset_peer_ends_connected_or_reset(no_fd_leak):
    with reset() as target:
        with nbconn.connect(target, keep=True) as res:
            assert res.outcome in ("connected", "reset"), res.trace()
            if res.connected:
                res.sock.settimeout(2)
                with pytest.raises(ConnectionResetError):
                    res.sock.recv(1)


@pytest.mark.parametrize("method, calls", [("ioctl", ["ioctl("]), ("fcntl", ["F_GETFL", "F_SETFL"]),
                                           ("setblocking", ["setblocking(False)"])])
def test_nonblocking_methods(method, calls, no_fd_leak):
    with listening() as target:
        res = nbconn.connect(target, nonblocking=method, keep=False)
    assert res.outcome == "connected"
    texts = [s.call for s in res.steps if s.name == "nonblocking"]
    assert len(texts) == len(calls) and all(c in t for c, t in zip(calls, texts))


@pytest.mark.parametrize("trigger, mask", [("edge", "EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET"),
                                           ("level", "EPOLLIN|EPOLLOUT|EPOLLRDHUP,")])
def test_edge_and_level_triggered(trigger, mask, no_fd_leak):
    with listening() as target:
        res = nbconn.connect(target, trigger=trigger, keep=False)
    assert res.outcome == "connected"
    add = next(s for s in res.steps if s.name == "epoll_ctl")
    assert mask in add.call


def test_to_dict_is_json_and_complete():
    with listening() as target:
        res = nbconn.connect(target, keep=False, rcvbuf=4096)
    d = json.loads(json.dumps(res.to_dict()))
    for key in ("outcome", "errno", "connect_returned", "ngx_connect", "ngx_decision", "handshake_ns", "effective",
                "tcp_info", "steps"):
        assert key in d
    assert d["steps"][0]["step"] == "socket" and d["steps"][0]["ngx_step"] == 1
    assert d["steps"][0]["t_start_ns"] == 0  # times are relative to socket()'s start
    assert all(s["duration_ns"] >= 0 for s in d["steps"])
    assert d["effective"]["rcvbuf"] == 8192


def test_trace_off_records_nothing_but_still_decides():
    with listening() as target:
        res = nbconn.connect(target, trace=False, keep=False)
    assert res.connected and res.steps == [] and res.handshake_ns > 0


def test_attempt_state_machine_driven_by_hand(no_fd_leak):
    """The loop only says 'ready' or 'deadline passed': drive those transitions directly."""
    with blackhole() as target, Loop() as loop:
        tgt = parse_target(target)
        attempt = Attempt(tgt, make_plan(tgt.family, Settings(timeout=60)), loop)
        assert attempt.state is State.INIT
        attempt.start()
        assert attempt.state is CONNECTING and loop.pending == 2  # one fd, one timer
        with pytest.raises(RuntimeError, match="CONNECTING"):
            attempt.start()  # start() runs once, from INIT
        attempt.on_timer()  # as if 60 s had passed
        assert attempt.state is DONE and attempt.result.outcome == "timed_out"
        # on_timer cancelled its own timer (driven by hand, the loop did not pop it) and the fd is gone
        assert loop.pending == 0 and loop.next_deadline_ns() is None
        attempt.on_ready(0)  # a late event after the decision is ignored
        assert attempt.result.outcome == "timed_out"
        with pytest.raises(RuntimeError, match="DONE"):
            attempt.start()


def test_done_is_set_at_the_decision_before_cleanup(no_fd_leak):
    seen = []
    with listening() as target, Loop() as loop:
        tgt = parse_target(target)
        attempt = Attempt(tgt, make_plan(tgt.family, Settings()), loop, on_done=lambda a: seen.append(a.state))
        attempt.start()
        while attempt.state is not DONE:
            loop.run_once()
    assert seen == [DONE] and attempt.result.connected


def test_trace_times_start_at_socket_and_show_durations():
    with listening() as target:
        res = nbconn.connect(target)
    steps = res.steps
    assert steps[0].t_start_ns == res.started_ns and all(s.duration_ns >= 0 for s in steps)
    assert all(a.t_start_ns <= b.t_start_ns for a, b in zip(steps, steps[1:]))
    connect = next(s for s in steps if s.name == "connect")
    so_error = next(s for s in steps if s.name == "so_error")
    # "connected in X" is the difference of two times the trace shows
    assert res.handshake_ns == so_error.t_ns - connect.t_start_ns
    text = res.trace()
    assert f"connected in {format_ns(res.handshake_ns)}" in text
    assert f"connect() called at {format_ns(connect.t_start_ns - res.started_ns)}, decided at" in text
    first = text.splitlines()[0]
    assert first.split()[:2] == ["0.0", "µs"] and "<" in first and "socket(" in first


def test_step_one_asks_the_socket_source(no_fd_leak):
    class HereSource:
        where = "made by a test's source"

        def __init__(self):
            self.calls = []

        def socket(self, family, type, *, timeout_s=None):
            self.calls.append((family, type, timeout_s))
            return socket.socket(family, type)

    src = HereSource()
    with listening() as target, socketsource.using(src):
        res = nbconn.connect(target, timeout=0.5)
    # the connect's timer bounds the source's wait too (a wedged lab helper must not outlast it)
    assert res.connected and src.calls == [(socket.AF_INET, socket.SOCK_STREAM, 0.5)]
    assert "made by a test's source" in res.steps[0].call
    with refused() as target:
        res = nbconn.connect(target)
    assert src.calls == [(socket.AF_INET, socket.SOCK_STREAM, 0.5)]  # outside the block: made here again
    assert res.steps[0].call.startswith("socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC")


def test_socket_source_failure_is_socket_stage(no_fd_leak):
    class Full:
        where = "a source out of descriptors"

        def socket(self, family, type, *, timeout_s=None):
            raise OSError(errno.EMFILE, "Too many open files")

    with socketsource.using(Full()):
        res = nbconn.connect("127.0.0.1:1")
    assert (res.outcome, res.errno, res.ngx_connect, res.ngx_level) == ("error", "EMFILE", "NGX_ERROR", "alert")
    assert res.ngx_log == "socket() failed (24: Too many open files) while connecting to upstream"


def test_rcvbuf_failure_fails_the_connect_keepalive_failure_is_ignored(no_fd_leak):
    """nginx 1.22.1: setsockopt(SO_RCVBUF) failing is `goto failed`; SO_KEEPALIVE failing is "ignored".

    A real kernel refusal, no mock: the Plan's encoded value is swapped for a 1-byte optval, which
    the kernel answers with EINVAL (optlen < sizeof(int)).  The table itself: tests/test_verdict.py.
    """
    from nbconn.options import OPTIONS

    spec = OPTIONS["rcvbuf"]
    plan = make_plan(socket.AF_INET, Settings(rcvbuf=4096))
    # swap the encoded value for one the kernel refuses (a 1-byte optval: EINVAL), keeping the rest of the Plan
    bad = dataclasses.replace(plan, setsockopt_args=((spec, b"\x01", "[1]", 1),))
    with listening() as target, Loop() as loop:
        attempt = Attempt(parse_target(target), bad, loop)
        attempt.start()
    res = attempt.result
    assert (res.outcome, res.errno, res.ngx_connect, res.ngx_next, res.ngx_level) == (
        "error", "EINVAL", "NGX_ERROR", None, "alert")
    assert res.ngx_log.startswith("setsockopt(SO_RCVBUF) failed (22: ")
    assert [s.name for s in res.steps] == ["socket", "setsockopt", "close"]

    spec = OPTIONS["keepalive"]
    plan = make_plan(socket.AF_INET, Settings(keepalive=True))
    bad = dataclasses.replace(plan, setsockopt_args=((spec, b"\x01", "[1]", 1),))
    with listening() as target, Loop() as loop:
        attempt = Attempt(parse_target(target), bad, loop)
        attempt.start()
        while attempt.state is not DONE:
            loop.run_once()
    res = attempt.result
    assert res.connected and res.ngx_log is None
    assert res.ngx_log_ignored == ("[alert] setsockopt(SO_KEEPALIVE) failed, ignored (22: Invalid argument) "
                                   "while connecting to upstream",)


def test_bad_timeout_named_before_any_socket(no_fd_leak):
    for bad in (-1, 0, float("nan"), float("inf"), "1", None, True):
        with pytest.raises((ValueError, TypeError), match="timeout"):
            nbconn.connect("127.0.0.1:9", timeout=bad)
    with pytest.raises(ValueError, match="nonblocking='o_ndelay'"):
        nbconn.connect("127.0.0.1:9", nonblocking="o_ndelay")
    with pytest.raises(ValueError, match="trigger='oneshot'"):
        nbconn.connect("127.0.0.1:9", trigger="oneshot")


# -- which nginx handler reads SO_ERROR (issue 19 A4) ------------------------------------------------------

def test_handler_rule_read_handler_first_for_in_err_hup():
    """ngx_epoll_process_events: EPOLLERR/EPOLLHUP add IN|OUT, and the read handler runs first when IN is set."""
    import select

    for mask in (select.EPOLLIN, select.EPOLLERR, select.EPOLLHUP, select.EPOLLIN | select.EPOLLOUT,
                 select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP | select.EPOLLIN | select.EPOLLRDHUP):
        assert handler_reading_so_error(mask) == PROCESS_HEADER, mask
    for mask in (select.EPOLLOUT, select.EPOLLOUT | select.EPOLLRDHUP):
        assert handler_reading_so_error(mask) == SEND_REQUEST, mask


@pytest.mark.parametrize("exact", [False, True])
def test_refusal_is_read_by_process_header_success_by_send_request(exact, no_fd_leak):
    """A real RST: EPOLLERR|EPOLLHUP, so nginx's read handler (process_header) reads SO_ERROR and the write
    event is stale; a real handshake: EPOLLOUT alone, so send_request reads it.  Shown as data in the step."""
    with refused() as target:
        res = nbconn.connect(target, nginx_exact=exact)
    assert res.outcome == "refused" and "EPOLLERR" in res.events
    so_error = next(s for s in res.steps if s.name == "so_error")
    assert so_error.ngx_handler == res.ngx_handler == PROCESS_HEADER
    assert so_error.to_dict()["ngx_handler"] == PROCESS_HEADER
    assert "<- test_connect in ngx_http_upstream_process_header" in res.trace()
    if exact:  # $upstream_connect_time is only set by send_request: "-" for a refused try
        assert res.ngx_connect_time_ms is None and res.ngx_start_ns is not None
    with listening(hold=True) as target:
        res = nbconn.connect(target, nginx_exact=exact)
    assert res.connected and res.events == "EPOLLOUT"
    so_error = next(s for s in res.steps if s.name == "so_error")
    assert so_error.ngx_handler == res.ngx_handler == SEND_REQUEST
    if exact:
        assert res.ngx_connect_time_ms is not None and res.ngx_connect_time_ms >= 0


def test_a_connect_that_fails_at_once_reads_no_so_error(no_fd_leak):
    with unix_missing() as target:
        res = nbconn.connect(target)
    assert res.ngx_handler is None and "so_error" not in names(res)


def test_the_timer_reads_tcp_info_for_the_syns_sent_and_nginx_exact_does_not(no_fd_leak):
    """Default mode: when the timer ends a handshake, TCP_INFO says how many SYNs went out (1 + total_retrans)."""
    from nbconn import lab

    with lab.scenario("blackhole") as (target, client_side), client_side():
        res = nbconn.connect(target, timeout=1.3)
        exact = nbconn.connect(target, timeout=0.2, nginx_exact=True)
    assert res.timer_fired and res.syns_sent == 2 and res.tcp_info["state"] == "SYN_SENT"
    assert any("tcpi_total_retrans=1" in s.call for s in res.steps)
    assert exact.timer_fired and exact.syns_sent is None and not any(s.name == "tcp_info" for s in exact.steps)


def test_trace_items_are_parsed_into_steps_by_their_format_and_again_after_more_are_recorded():
    """The recorder keeps flat items (no container per step); a step's args are its format's fields."""
    from nbconn.result import Result

    res = Result(target="127.0.0.1:1", family="AF_INET")
    record = res.recorder()
    record(("epoll_ctl", "epoll_ctl({}, EPOLL_CTL_ADD, {}, {{events={}, data={{u32={}}}}})", 0, 10, 20,
            3, 5, "EPOLLIN", 5))
    record(("nonblocking", "fcntl({}, F_SETFL, {:#x}|O_NONBLOCK)", 0, 20, 30, 5, 2))
    assert all(type(item) in (str, int) for item in res._steps)  # nothing the cyclic GC has to visit
    first = list(res.steps)
    assert [s.call for s in first] == ["epoll_ctl(3, EPOLL_CTL_ADD, 5, {events=EPOLLIN, data={u32=5}}) = 0",
                                       "fcntl(5, F_SETFL, 0x2|O_NONBLOCK) = 0"]
    res.ngx_handler = SEND_REQUEST
    record(("so_error", "getsockopt({}, SOL_SOCKET, SO_ERROR, [{}], [4])", 0, 40, 50, 5, 0))
    steps = res.steps
    assert steps[:2] == first and [s.name for s in steps] == ["epoll_ctl", "nonblocking", "so_error"]
    assert steps[2].call == "getsockopt(5, SOL_SOCKET, SO_ERROR, [0], [4]) = 0"
    assert steps[2].ngx_handler == SEND_REQUEST and steps[0].ngx_handler is None
    assert res.steps is steps  # nothing new: read as it is
