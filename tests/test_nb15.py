"""nbconn.experiments.nb15: notebook 15's plumbing (strace cut per connect, record I/O, the fallback bench)."""

import pytest

from nbconn.nginx import tls
from nbconn.experiments import nb15
from nbconn.lab import tlspeers, tlsrecords
from nbconn.lab.capture import Capture
from tests.conftest import wait_for

# an nginx worker's strace -f (pid first), two connects to port 8443 and one to another port
STRACE = [
    '101 socket(AF_INET, SOCK_STREAM, IPPROTO_IP) = 10',
    '101 epoll_ctl(8, EPOLL_CTL_ADD, 10, {events=EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, data={u32=1, u64=2}}) = 0',
    '101 connect(10, {sa_family=AF_INET, sin_port=htons(8443), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 '
    'EINPROGRESS (Operation now in progress)',
    '101 epoll_wait(8, [{events=EPOLLOUT, data={u32=1, u64=2}}], 512, 1000) = 1',
    '101 getsockopt(10, SOL_SOCKET, SO_ERROR, [0], [4]) = 0',
    '101 setsockopt(10, SOL_TCP, TCP_NODELAY, [1], 4) = 0',
    '101 write(10, "\\26\\3\\1\\0\\267\\1"..., 188) = 188',
    '101 read(10, 0x55f8e6af6d23, 16709) = -1 EAGAIN (Resource temporarily unavailable)',
    '101 epoll_wait(8, [{events=EPOLLOUT, data={u32=3, u64=4}}], 512, 1000) = 1',  # the client connection's only
    '101 epoll_wait(8, [{events=EPOLLOUT, data={u32=3, u64=4}}, {events=EPOLLIN|EPOLLOUT, data={u32=1, u64=2}}], '
    '512, 1000) = 2',
    '102 write(10, "\\27\\3\\3", 3) = 3',  # another process's fd 10: not this connect's
    '101 read(10, "\\26\\3\\3\\0A\\2"..., 16709) = 141',
    '101 write(10, "\\24\\3\\3\\0\\1\\1"..., 51) = 51',
    '101 write(10, "\\27\\3\\3\\0L"..., 81) = 81',
    '101 close(10) = 0',
    '101 connect(11, {sa_family=AF_INET, sin_port=htons(9999), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
    '101 connect(10, {sa_family=AF_INET, sin_port=htons(8443), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 '
    'EINPROGRESS (Operation now in progress)',
    '101 close(10) = 0',
]


def test_connects_of_cuts_per_connect_and_process():
    first, second = nb15.connects_of(STRACE, 8443)
    assert first[0].startswith("connect(10") and first[-1] == "close(10) = 0"
    assert not any(c.startswith("write(10, \"\\27\\3\\3\", 3)") for c in first)  # pid 102's line left out
    assert len(second) == 2


def test_connects_of_keeps_only_the_upstream_connections_events():
    """One epoll_wait reports the client connection's EPOLLOUT (after its EPOLL_CTL_MOD) and the upstream's
    EPOLLIN|EPOLLOUT: only the upstream's, known by the epoll data of its EPOLL_CTL_ADD, is this connect's."""
    first, _ = nb15.connects_of(STRACE, 8443)
    waits = [nb15.condensed(c) for c in first if c.startswith("epoll_wait(")]
    assert waits == ["epoll_wait() -> EPOLLOUT", "epoll_wait() -> EPOLLIN|EPOLLOUT"], waits
    assert not any("u64=4" in c for c in first)


def test_record_io_names_records_and_stops_at_the_request():
    first, _ = nb15.connects_of(STRACE, 8443)
    assert nb15.record_io(first) == ["write: handshake", "read: handshake", "write: change_cipher_spec"]


def test_condensed_leaves_out_what_changes_every_run():
    first, _ = nb15.connects_of(STRACE, 8443)
    shown = [nb15.condensed(c) for c in first]
    assert shown[:4] == ["connect() = -1 EINPROGRESS", "epoll_wait() -> EPOLLOUT", "getsockopt(SO_ERROR) = 0",
                         "setsockopt(TCP_NODELAY)"]
    assert "write() = 188 bytes, first record: handshake" in shown and "read() = EAGAIN" in shown
    assert not any("0x" in line or "\\" in line for line in shown)


def test_capture_payload_flag_is_checked_before_any_socket():
    with pytest.raises(TypeError, match="payload"):
        Capture(8443, payload=1)
    assert Capture(8443).keep_payload is False


@pytest.mark.slow
def test_bench_fallback_counts_round_trips_on_a_namespace_loopback(monkeypatch):
    """Where the link cannot run (a normal user without /dev/net/tun), the bench is a lab namespace's loopback:
    no delay, and the round trips are still counted from the packets (TLS 1.3 full: one; 1.2 full: two)."""
    from nbconn import lab
    from nbconn.lab import wire

    if lab.namespace_unavailable_reason() is not None:
        pytest.skip(lab.namespace_unavailable_reason())
    monkeypatch.setattr(wire, "wire_unavailable_reason", lambda: "test: pretend the link cannot run")
    with tlspeers.test_pki() as pki, nb15.bench(pki, 20.0) as bench:
        assert bench.rtt_ms == 0.0 and "pretend" in bench.where
        counts = {}
        for version in ("1.3", "1.2"):
            with bench.capture() as cap:
                with bench.client():
                    result = tls.connect_tls(bench.peer, tls.TLSClient(cafile=pki.cafile, server_name="localhost",
                                                                       tls_version=version), timeout=5.0)
                assert wait_for(lambda: cap.read() is not None and any(
                    ("F" in p.flags or "R" in p.flags) and p.dir == "out" for p in cap.packets))
                [conn] = nb15.connections(cap.packets)
            assert result.outcome == "handshaked", result.ngx_log
            counts[version] = tlsrecords.handshake_round_trips(conn)
    assert counts == {"1.3": 1, "1.2": 2}
