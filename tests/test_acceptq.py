"""netstat: the kernel's counters and a listener's queues read without tools; acceptq: both views of a burst."""

import socket

import pytest

from nbconn.experiments import acceptq
from nbconn.lab import netstat

SAMPLE = """TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops
TcpExt: 3 2 171 171
IpExt: InNoRoutes InOctets
IpExt: 0 12345
"""


def test_parse_pairs_and_delta():
    tables = netstat.parse(SAMPLE)
    assert tables["TcpExt"] == {"SyncookiesSent": 3, "SyncookiesRecv": 2, "ListenOverflows": 171, "ListenDrops": 171}
    assert tables["IpExt"]["InOctets"] == 12345
    later = dict(tables["TcpExt"], ListenOverflows=180)
    d = netstat.delta(tables["TcpExt"], later)
    assert d["ListenOverflows"] == 9 and d["SyncookiesSent"] == 0 and d["EmbryonicRsts"] == 0  # absent: 0


def test_parse_refuses_a_truncated_file():
    with pytest.raises(ValueError, match="3 names but 2 values"):
        netstat.parse("TcpExt: A B C\nTcpExt: 1 2\n")
    with pytest.raises(ValueError, match="header/value line pairs"):
        netstat.parse("TcpExt: A B C\n")


def test_this_kernel_has_the_counters_the_lesson_prints():
    counters = netstat.read()
    for name in ("ListenOverflows", "ListenDrops", "SyncookiesSent", "SyncookiesRecv", "TCPReqQFullDoCookies"):
        assert name in counters


def test_listener_queue_is_ss_recv_q_and_send_q():
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(3)
        assert netstat.listener_queue(lst) == {"queued": 0, "limit": 3}
        clients = [socket.create_connection(lst.getsockname(), timeout=2) for _ in range(2)]
        try:
            assert netstat.listener_queue(lst) == {"queued": 2, "limit": 3}  # completed, not yet accepted
        finally:
            for c in clients:
                c.close()
    with socket.socket() as idle:
        with pytest.raises(ValueError, match="is not listening"):
            netstat.listener_queue(idle)


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 0}, "count=0"), ({"backlog": -1}, "backlog=-1"), ({"interval_s": 5}, "interval_s=5"),
    ({"count": True}, "count must be a whole number"),
])
def test_bad_input_is_named_before_any_socket(kwargs, message):
    class NoSockets(acceptq.OwnNamespace):
        def socket(self, *a, **k):
            raise AssertionError("a socket was made before the input was checked")

    with pytest.raises((ValueError, TypeError), match=message):
        acceptq.burst(NoSockets(), **kwargs)


def test_a_burst_in_a_lab_namespace_accounts_for_every_connect():
    from nbconn.lab.namespace import namespace, unavailable_reason

    import nbconn.flow

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with open(nbconn.flow.__file__) as f:
        if "socketsource" not in f.read():  # until step 1 asks nbconn.socketsource for its socket
            pytest.skip("nbconn.flow does not take its sockets from a socket source yet")
    with namespace(sysctls={"net.ipv4.tcp_syncookies": 1}) as ns:
        b = acceptq.burst(ns, count=30, backlog=2, interval_s=0.01, connect_timeout_s=1.3, read_timeout_s=0.2)
    connected = b["client"]["outcomes"].count("connected")
    s, k = b["server"], b["counters"]["during_connects"]
    # every connected client is either one the server accepted or one it never heard of
    assert s["accepted_during_connects"] + s["connected_but_not_accepted"] >= connected
    assert s["accepted_during_connects"] <= connected
    assert b["limit"] == 2 and k["ListenOverflows"] > 0  # 30 at once cannot fit a queue of 3
    assert len(b["client"]["first_byte_ms"]) == 30 and "\n".join(acceptq.summary(b)).count(" of 30") >= 4
