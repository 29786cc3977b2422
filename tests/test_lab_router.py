"""lab.impaired(router=...): the server namespace as a router whose route for 198.19.0.0/24 answers (or not).

One SYN and an ICMP error back for ``unreachable``/``prohibit`` (SO_ERROR EHOSTUNREACH, nginx's
"connect() failed (113: No route to host)"); SYNs and nothing back for ``blackhole`` (the connect timer
decides).  The packet counts come from the forwarder (every packet crosses it) and from a packet socket
on the client's TUN device (nbconn.experiments.nb04).  Skipped where the wire cannot run.
"""

from __future__ import annotations

import errno

import pytest

from nbconn import errors
from nbconn.experiments import nb04
from nbconn.lab.wire import impaired, wire_unavailable_reason
from nbconn.lab.wire.params import check

from .conftest import open_fds

REASON = wire_unavailable_reason()
needs_wire = pytest.mark.skipif(REASON is not None, reason=f"the impairment wire cannot run here: {REASON}")


@pytest.mark.parametrize("bad", ["Unreachable", "throw", "", 1, True])
def test_router_refuses_a_bad_route_type_before_anything_exists(bad):
    before = open_fds()
    with pytest.raises(ValueError, match="router="):
        with impaired(router=bad):
            pass  # pragma: no cover - never reached
    assert open_fds() == before


def test_router_none_is_the_plain_link():
    assert check().router is None
    assert check(router="blackhole").router == "blackhole"


@needs_wire
@pytest.mark.parametrize("router, icmp", [("unreachable", (3, 1)), ("prohibit", (3, 13))])
def test_icmp_error_ends_the_handshake_with_ehostunreach(router, icmp):
    shot, stats = nb04.through_router(router, delay_ms=5.0, timeout=5.0)
    res = shot.result
    # one SYN out, one ICMP back, nothing else on the wire
    assert (stats["out_forwarded"], stats["back_forwarded"]) == (1, 1)
    assert [p.flags for p in shot.packets] == ["S", "ICMP %d/%d" % icmp]
    assert shot.packets[1].dir == "in" and shot.packets[1].icmp == icmp
    assert "quoting TCP" in shot.packets[1].text  # it answers our SYN
    assert [p["flags"] for p in shot.to_dict()["packets"]] == ["S", "ICMP %d/%d" % icmp]
    # the kernel made it SO_ERROR, read after the event; nginx's verdict
    assert res.connect_returned == "EINPROGRESS"
    assert (res.outcome, res.errno) == ("unreachable", "EHOSTUNREACH")
    assert "EPOLLERR" in res.events and "EPOLLOUT" in res.events
    assert not res.timer_fired
    assert (res.ngx_decision, res.ngx_next, res.ngx_level) == ("NGX_ERROR", "NGX_HTTP_UPSTREAM_FT_ERROR", "error")
    assert res.ngx_log == "connect() failed (113: No route to host) while connecting to upstream"
    assert errors.verdict("so_error", errno.EHOSTUNREACH).log == res.ngx_log
    # a round trip (2 x 5 ms, less the forwarder's early release) at least, and before the first SYN resend (1 s)
    assert nb04.round_trip_floor_ms(5.0) <= res.handshake_ms < 1000.0


@needs_wire
def test_blackhole_route_sends_nothing_back_and_the_timer_decides():
    shot, stats = nb04.through_router("blackhole", delay_ms=5.0, timeout=1.3)
    res = shot.result
    assert stats["back_forwarded"] == 0
    assert all(p.flags == "S" and p.dir == "out" for p in shot.packets)
    # the first SYN and its retransmission about 1 s later (both before the 1.3 s timer)
    assert stats["out_forwarded"] == len(shot.packets) == 2
    assert [p.retransmission for p in shot.packets] == [False, True]
    assert res.timer_fired and (res.outcome, res.ngx_decision) == ("timed_out", "NGX_HTTP_UPSTREAM_FT_TIMEOUT")
    assert res.ngx_log == "upstream timed out (110: Connection timed out) while connecting to upstream"


@needs_wire
def test_router_routes_are_in_place_and_nothing_is_left_behind():
    from .test_wire import helper_processes

    before = open_fds()
    with impaired(delay_ms=1.0, router="unreachable") as link:
        assert link.far_addr == "198.19.0.1" and link.far_prefix == "198.19.0.0/24"
        assert link.server_ns.sysctl("net.ipv4.ip_forward") == "1"
        assert link.client_ns.sysctl("net.ipv4.ip_forward") == "0"  # the client only routes via the wire
    with impaired(delay_ms=1.0) as plain:
        assert plain.far_addr is None and plain.router is None
        assert plain.server_ns.sysctl("net.ipv4.ip_forward") == "0"
    assert open_fds() == before and helper_processes() == []


@needs_wire
@pytest.mark.parametrize("router, upstream_status, line", [
    ("unreachable", "502", ("error", "connect() failed (113: No route to host) while connecting to upstream")),
    ("blackhole", "504", ("error", "upstream timed out (110: Connection timed out) while connecting to upstream")),
])
def test_real_nginx_behind_the_router_logs_what_the_verdict_table_says(router, upstream_status, line):
    from nbconn.nginx import runner

    reason = runner.unavailable_reason()
    if reason:
        pytest.skip(reason)
    seen = nb04.nginx_through_router(router, delay_ms=5.0, connect_timeout=1.0)
    assert seen["status"] == "200"  # the second server answered
    assert seen["tried"][0] == "198.19.0.1:80" and len(seen["tried"]) == 2
    assert seen["upstream_status"] == [upstream_status, "200"]
    assert line in [(e.level, e.message) for e in seen["error_log"]]
    err = errno.EHOSTUNREACH if router == "unreachable" else None
    expected = errors.verdict("so_error", err) if err else errors.verdict("timeout", None)
    assert (expected.level, expected.log) == line


def _ipv4(proto: int, src: str, dst: str, body: bytes) -> bytes:
    import socket
    import struct

    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + body


def test_parse_reads_a_syn_and_the_icmp_error_quoting_it():
    import struct

    syn = _ipv4(6, "198.18.0.1", "198.19.0.1", struct.pack("!HHIIBBHHH", 40000, 80, 7, 0, 0x50, 0x02, 0, 0, 0))
    icmp = _ipv4(1, "198.18.0.2", "198.18.0.1", bytes([3, 1, 0, 0, 0, 0, 0, 0]) + syn[:28])
    seen: set = set()
    first = nb04.parse(syn, 1, "out", seen)
    again = nb04.parse(syn, 2, "out", seen)
    back = nb04.parse(icmp, 3, "in", seen)
    assert (first.flags, first.retransmission, again.retransmission) == ("S", False, True)
    assert back.icmp == (3, 1) and back.flags == "ICMP 3/1"
    assert back.text == "ICMP 3/1 host unreachable, quoting TCP 198.18.0.1:40000 > 198.19.0.1:80"
    assert nb04.parse(b"\x60" + bytes(39), 4, "in", seen) is None  # IPv6: not on this wire
