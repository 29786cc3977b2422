"""The notebooks' small helpers (nbconn/experiments): notebook 06's tcpi_backoff watch, notebook 10's strace times."""

import platform

import pytest

from nbconn.experiments import nb06, nb10

from .conftest import require_tool


def test_call_times_follow_the_picked_calls_in_order():
    lines = [
        "100 10:00:00.000100 socket(AF_INET, SOCK_STREAM, IPPROTO_IP) = 10",
        "100 10:00:00.000200 epoll_wait(8, [], 512, 200) = 0",
        "101 10:00:00.000250 close(4)          = 0",
        "100 10:00:00.200300 epoll_wait(8, [], 512, 200) = 0",
        "100 10:00:00.200400 close(10)         = 0",
    ]
    picked = ["socket(AF_INET, SOCK_STREAM, IPPROTO_IP) = 10", "epoll_wait(8, [], 512, 200) = 0",
              "epoll_wait(8, [], 512, 200) = 0", "close(10) = 0"]
    times = nb10.call_times(lines, picked)
    assert [round((t - times[0]) * 1e3, 1) for t in times] == [0.0, 0.1, 200.2, 200.3]
    with pytest.raises(ValueError, match="not found"):
        nb10.call_times(lines, ["getsockopt(10, SOL_SOCKET, SO_ERROR, [0], [4]) = 0"])


def test_backoff_watch_rejects_long_runs_before_any_socket():
    with pytest.raises(ValueError, match="syncnt=4"):
        nb06.backoff_after_each_retransmission(4)
    with pytest.raises(ValueError, match="max_wait_s"):
        nb06.backoff_after_each_retransmission(1, max_wait_s=0)


def _kernel() -> tuple:
    return tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])


@pytest.mark.skipif(_kernel() < (6, 8), reason="the linear phase is counted on total_rto since Linux 6.8")
def test_tcpi_backoff_stays_zero_in_the_linear_phase():
    from nbconn.experiments import synretry

    if (synretry.read_sysctls()["tcp_syn_linear_timeouts"] or 0) < 2:
        pytest.skip("needs tcp_syn_linear_timeouts >= 2")
    watched = nb06.backoff_after_each_retransmission(1, max_wait_s=10)  # SYNs at 0, 1, 2 s, ETIMEDOUT at ~3 s
    assert watched["errno"] == "ETIMEDOUT"
    assert [(n, backoff) for _, n, backoff in watched["rows"]] == [(1, 0), (2, 0)]


# -- notebook 07: the accept-queue burst through a real nginx inside the lab namespace ------------------------

def test_nginx_burst_rejects_bad_input_before_any_socket(no_fd_leak):
    from nbconn.experiments import nb07

    for kwargs, word in (({"count": 0}, "count"), ({"count": 10_000}, "count"), ({"backlog": -1}, "backlog"),
                         ({"interval_s": 0}, "interval_s"), ({"read_timeout_s": float("nan")}, "read_timeout_s")):
        with pytest.raises(ValueError, match=word):
            nb07.nginx_burst(object(), **kwargs)
    with pytest.raises(TypeError, match="lab namespace"):
        nb07.nginx_burst(object())


def test_nginx_inside_the_burst_namespace_logs_connect_then_a_stalled_header(no_fd_leak):
    """A burst through a real nginx inside the namespace: every upstream connect succeeds (cookies on), and the
    stall shows after it, in $upstream_header_time: some requests wait at least one data resend (TCP_RTO_MIN)."""
    from nbconn.experiments import nb07
    from nbconn.lab import namespace, namespace_unavailable_reason

    require_tool("nginx")
    reason = namespace_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with namespace(sysctls={"net.ipv4.tcp_syncookies": 1, "net.ipv4.tcp_abort_on_overflow": 0}) as ns:
        seen = nb07.nginx_burst(ns, count=30, backlog=2, interval_s=0.005, connect_timeout_s=5.0,
                                read_timeout_s=3.0)
    t = seen["timings"]
    assert len(t) == 30, t
    assert all(r["connect_s"] is not None for r in t), t  # no connect failed: the SYN-ACKs came (cookies)
    waits = [r["header_s"] - r["connect_s"] for r in t if r["header_s"] is not None]
    assert waits and min(waits) >= 0, t
    assert max(waits) >= 0.15, waits  # at least one request was resent after the connect completed
    assert seen["tcpext"]["ListenOverflows"] > 0 and seen["tcpext"]["SyncookiesSent"] > 0, seen["tcpext"]
    assert all("while connecting to upstream" not in line for line in seen["errors"]), seen["errors"]
