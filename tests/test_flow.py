"""The five steps against real peers on loopback and AF_UNIX: what this kernel answers, and nginx's verdict."""

import json
import socket

import pytest

import nbconn
from nbconn.flow import CONNECTING, DONE, Attempt, make_plan
from nbconn.lab import blackhole, listening, refused, reset, unix_full, unix_listening, unix_missing
from nbconn.loop import Loop
from nbconn.targets import parse_target

SEED_ORDER = ["socket", "nonblocking", "epoll_ctl", "connect"]


def names(res):
    return [s.name for s in res.steps]


def test_listening_peer_connects_via_einprogress(no_fd_leak):
    with listening(hold=True) as target:  # hold: the peer's FIN must not race the TCP_INFO read
        with nbconn.connect(target) as res:
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
    assert (res.outcome, res.errno, res.ngx_decision) == ("refused", "ECONNREFUSED", "NGX_ERROR")
    assert res.ngx_log == "connect() failed (111: Connection refused) while connecting to upstream"
    assert "EPOLLERR" in res.events and "EPOLLHUP" in res.events
    assert names(res)[-2:] == ["unregister", "close"]


def test_blackhole_times_out_within_50ms_of_deadline(no_fd_leak):
    with blackhole() as target:
        res = nbconn.connect(target, timeout=0.3)
    assert (res.outcome, res.errno, res.timer_fired, res.ngx_decision) == ("timed_out", "ETIMEDOUT", True, "TIMEDOUT")
    assert 300e6 <= res.handshake_ns <= 350e6, res.handshake_ns
    assert "so_error" not in names(res)  # nginx closes on a timer without reading SO_ERROR
    assert res.ngx_log.startswith("upstream timed out (110: Connection timed out)")
    assert names(res)[-3:] == ["timeout", "unregister", "close"]


def test_ipv6_loopback(no_fd_leak):
    with listening("::1") as target:
        res = nbconn.connect(target, keep=False)
    assert res.family == "AF_INET6" and res.outcome == "connected"
    with refused("::1") as target:
        assert nbconn.connect(target).outcome == "refused"


def test_unix_listening_connects_at_once(no_fd_leak):
    with unix_listening() as target:
        with nbconn.connect(target) as res:
            assert (res.connect_returned, res.ngx_connect, res.ngx_decision) == (0, "NGX_OK", "NGX_OK")
            assert res.tcp_info is None and res.outcome == "connected"
    assert "epoll_wait" not in names(res)


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
        with nbconn.connect(target) as res:
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
    assert d["steps"][0]["step"] == "socket" and d["steps"][0]["seed_step"] == 1
    assert d["effective"]["rcvbuf"] == 8192


def test_trace_off_records_nothing_but_still_decides():
    with listening() as target:
        res = nbconn.connect(target, trace=False, keep=False)
    assert res.connected and res.steps == [] and res.handshake_ns > 0


def test_attempt_state_machine_driven_by_hand(no_fd_leak):
    """The loop only says 'ready' or 'deadline passed': drive those transitions directly."""
    with blackhole() as target, Loop() as loop:
        tgt = parse_target(target)
        attempt = Attempt(tgt, make_plan(tgt.family, timeout=60), loop)
        attempt.start()
        assert attempt.state == CONNECTING and loop.pending == 2  # one fd, one timer
        attempt.on_timer()  # as if 60 s had passed
        assert attempt.state == DONE and attempt.result.outcome == "timed_out"
        assert loop.pending == 1  # only the (now dead) timer is left in the heap
        attempt.on_ready(0)  # a late event after the decision is ignored
        assert attempt.result.outcome == "timed_out"


def test_bad_timeout_named_before_any_socket(no_fd_leak):
    for bad in (-1, 0, float("nan"), float("inf"), "1", None, True):
        with pytest.raises((ValueError, TypeError), match="timeout"):
            nbconn.connect("127.0.0.1:9", timeout=bad)
    with pytest.raises(ValueError, match="nonblocking='o_ndelay'"):
        nbconn.connect("127.0.0.1:9", nonblocking="o_ndelay")
    with pytest.raises(ValueError, match="trigger='oneshot'"):
        nbconn.connect("127.0.0.1:9", trigger="oneshot")
