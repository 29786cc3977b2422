"""nbconn.lab.namespace: a network namespace of the lab's own, as a normal user, sockets passed over SCM_RIGHTS.

One test per use case the notebooks have: A (accept-queue overflow with per-namespace
sysctls and counters), B (immediate connect() errors: no route, no local port), C
(an AF_PACKET socket made inside, for the capture helper).  Skipped with the probe's
one-line reason where the machine cannot make a namespace.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest

from nbconn import socketsource
from nbconn.lab import namespace_unavailable_reason
from nbconn.lab.control import ip_binary
from nbconn.lab.namespace import namespace

from .conftest import open_fds

REASON = namespace_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no lab namespace here: {REASON}")


def burst(ns, port: int, count: int) -> list[socket.socket]:
    """``count`` non-blocking connects made inside ``ns`` to 127.0.0.1:port (its own loopback)."""
    socks = []
    for _ in range(count):
        s = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        assert s.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        socks.append(s)
    return socks


def settle(socks, seconds: float) -> dict:
    """Wait (bounded) for the connects to resolve; count SO_ERROR values."""
    deadline = time.monotonic() + seconds
    with select.epoll() as ep:
        for s in socks:
            ep.register(s.fileno(), select.EPOLLOUT)
        pending = {s.fileno() for s in socks}
        while pending and time.monotonic() < deadline:
            for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
                pending.discard(fd)
                ep.unregister(fd)
    errors: dict = {}
    for s in socks:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        errors[err] = errors.get(err, 0) + 1
    return errors


def delta(before: dict, after: dict, name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def counters_around_burst(ns, port: int, count: int, settle_s: float) -> tuple[dict, dict]:
    """The namespace's counters before a burst of ``count`` connects and after it has settled; sockets closed."""
    before = ns.read_netstat()
    socks = burst(ns, port, count)
    try:
        settle(socks, settle_s)
        after = ns.read_netstat()
    finally:
        for s in socks:
            s.close()
    return before, after


@pytest.mark.parametrize("syncookies", ["0", "1"])
def test_a_accept_queue_overflow_counted_in_the_namespace(syncookies):
    fds = open_fds()
    with namespace(sysctls={"net.ipv4.tcp_syncookies": syncookies, "net.ipv4.tcp_abort_on_overflow": "0"}) as ns:
        assert ns.sysctl("net.ipv4.tcp_syncookies") == syncookies
        with ns.slow_accept(backlog=8, interval_s=0.005) as peer:
            before, after = counters_around_burst(ns, peer.port, 100, 0.3)
        assert delta(before, after, "ListenOverflows") > 0, after
        assert after["Tcp"]["ActiveOpens"] - before["Tcp"]["ActiveOpens"] == 100  # this namespace's own count
        if syncookies == "0":  # (with 1, cookies start only once the SYN queue fills: on the ~1 s resends)
            assert delta(before, after, "SyncookiesSent") == 0
    assert open_fds() == fds


def test_a_sysctls_toggle_live_between_bursts():
    """abort_on_overflow and syncookies change inside between two bursts; the host's values do not move."""
    host = {name: open("/proc/sys/net/ipv4/" + name).read().strip() for name in ("tcp_abort_on_overflow", "tcp_syncookies")}
    with namespace(sysctls={"net.ipv4.tcp_syncookies": "1"}) as ns:
        with ns.slow_accept(backlog=8, interval_s=0.005) as peer:
            for abort in ("0", "1"):
                assert ns.set_sysctl("net.ipv4.tcp_abort_on_overflow", abort) == abort
                assert ns.sysctl("net.ipv4.tcp_abort_on_overflow") == abort
                before, after = counters_around_burst(ns, peer.port, 40, 0.2)
                assert delta(before, after, "ListenOverflows") > 0
    assert {name: open("/proc/sys/net/ipv4/" + name).read().strip() for name in host} == host


def test_b_no_route_and_no_local_port_fail_at_once():
    with namespace(sysctls={"net.ipv4.ip_local_port_range": "40000 40001"}) as ns:
        assert ns.sysctl("net.ipv4.ip_local_port_range").split() == ["40000", "40001"]
        with ns.socket() as s:
            s.setblocking(False)
            assert s.connect_ex(("198.18.0.1", 80)) == errno.ENETUNREACH  # only lo: no route
        with ns.listening() as peer:
            with ns.socket() as first, ns.socket() as second:
                first.setblocking(False)
                second.setblocking(False)
                assert first.connect_ex(("127.0.0.1", peer.port)) == errno.EINPROGRESS
                assert second.connect_ex(("127.0.0.1", peer.port)) == errno.EADDRNOTAVAIL


def test_b_routes_are_added_inside():
    if ip_binary() is None:
        pytest.skip("routes need iproute2's ip (apt-get install iproute2)")
    with namespace(routes=["unreachable 198.18.0.0/15"]) as ns, ns.socket() as s:
        s.setblocking(False)
        assert s.connect_ex(("198.18.0.1", 80)) == errno.EHOSTUNREACH  # an unreachable route answers so


def test_c_packet_socket_made_inside_sees_the_namespace_traffic():
    with namespace() as ns:
        with ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as cap:  # ETH_P_ALL
            cap.settimeout(2.0)
            with ns.listening() as peer, ns.socket() as c:
                c.settimeout(2.0)
                c.connect(("127.0.0.1", peer.port))
                frame = cap.recv(65536)
    assert len(frame) >= 14 + 20 + 20  # an Ethernet header (lo has one), IPv4, TCP


def test_socket_source_and_where():
    with namespace() as ns:
        assert "SCM_RIGHTS" in ns.where and str(ns.pid) in ns.where
        with ns.using():
            assert socketsource.current() is ns
        assert socketsource.current() is None
        # the socket lives in the helper's namespace, not ours
        with ns.socket() as s:
            assert os.readlink(f"/proc/self/fd/{s.fileno()}").startswith("socket:")
        assert ns.created == 1


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"sysctls": {"kernel.panic": "1"}}, "kernel.panic"),
    ({"sysctls": {"net.ipv4.no_such_thing": "1"}}, "no sysctl net.ipv4.no_such_thing"),
    ({"sysctls": {"net.ipv4.tcp_syncookies": "1\n2"}}, "tcp_syncookies"),
    ({"sysctls": ["net.ipv4.tcp_syncookies"]}, "dict"),
    ({"routes": "unreachable 198.18.0.0/15"}, "list"),
    ({"routes": ["default via 1.2.3.4; rm -rf"]}, "rm -rf"),
    ({"routes": ["blah blah"]}, "'blah blah'"),  # issue 24.11: was an OSError from `ip` after the helper started
    ({"routes": ["198.18.0.1/15"]}, "host bits"),
    ({"routes": ["unreachable 198.18.0.0/15 metric x"]}, "metric 'x'"),
    ({"routes": [5]}, "each route must be a str"),
])
def test_bad_input_is_refused_before_any_helper_starts(kwargs, fragment):
    children = set(os.listdir("/proc"))
    with pytest.raises((ValueError, TypeError), match=fragment.replace(".", r"\.")):
        with namespace(**kwargs):
            pytest.fail("body must not run")
    started = [p for p in set(os.listdir("/proc")) - children if p.isdigit()]
    for pid in started:  # no helper of ours was started
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"child.py" not in f.read()


def test_helper_exits_and_nothing_stays():
    fds = open_fds()
    with namespace() as ns:
        pid = ns.pid
        assert os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(f"/proc/{pid}")  # reaped: not even a zombie
    assert open_fds() == fds
    with pytest.raises(RuntimeError, match="closed"):
        ns.socket()


SIOCGSKNS = 0x894C  # <linux/sockios.h>: a descriptor for the network namespace a socket belongs to


def test_a_kept_socket_keeps_its_namespace_after_the_helper_is_gone():
    """Issue 19 B6: the namespace does not live "exactly as long as the helper".  A socket holds a reference to
    its namespace (sock_net), so with the helper reaped, no process left in the namespace, two sockets kept from
    it still connect over its lo -- and the namespace they report is the helper's."""
    import fcntl

    with namespace() as ns:
        helper, inode = ns.pid, ns.process.info["ns_inodes"]["client"]
        listener, client = ns.socket(), ns.socket()
    try:
        assert not os.path.exists(f"/proc/{helper}")  # reaped
        holders = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                    holders.append(pid)
            except OSError:
                continue
        assert holders == []  # no process is in it any more
        netns = fcntl.ioctl(client.fileno(), SIOCGSKNS)  # returns a new descriptor
        try:
            assert os.fstat(netns).st_ino == inode != os.stat("/proc/self/ns/net").st_ino
        finally:
            os.close(netns)
        listener.bind(("127.0.0.1", 0))  # the namespace's own lo: still up, still routing
        listener.listen(1)
        client.settimeout(5)
        client.connect(listener.getsockname())
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"still here")
            assert client.recv(64) == b"still here"
    finally:
        listener.close()
        client.close()
