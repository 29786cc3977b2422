"""HttpPeer inside a lab namespace: notebook 13 measures keepalive over the lab's link with it (issue 19 A7)."""

import time

import pytest

from nbconn.nginx.httpd import HttpPeer
from nbconn.nginx.upstream import Upstream, run_request


def test_a_non_loopback_host_needs_a_lab_namespace():
    with pytest.raises(ValueError, match="loopback"):
        HttpPeer("198.18.0.2")  # no source: this would listen facing whatever network the host has
    with pytest.raises(ValueError, match="is not an IP address"):
        HttpPeer("upstream.nbconn.test")
    with pytest.raises(TypeError, match="source must be a lab namespace"):
        HttpPeer("198.18.0.2", source="server")


def test_keepalive_over_the_link_saves_the_handshake_round_trip():
    from nbconn import lab

    reason = lab.wire_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the impairment wire cannot run here: {reason}")
    with lab.impaired(delay_ms=10) as link:
        took = {}
        for keepalive in (0, 1):
            with HttpPeer(link.server_addr, source=link.server_ns) as peer:
                with Upstream([str(peer)], keepalive=keepalive) as up, link.client():
                    took[keepalive] = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        assert run_request(up, http=True, timeout=5.0).result == "200"
                        took[keepalive].append((time.perf_counter() - t0) * 1e3)
                accepted = peer.connections
            assert accepted == (3 if keepalive == 0 else 1)
    # the wire's delay is a floor, whatever the load: a new connection waits two round trips (SYN/SYN-ACK, then
    # request/answer), a reused one at least one -- no upper bound is asserted on a shared machine
    assert min(took[0]) >= 2 * 20 - 1
    assert min(took[1][1:]) >= 20 - 1
