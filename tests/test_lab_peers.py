"""Each lab peer yields the outcome it promises, and cleans up after itself."""

import os
import socket

import pytest

import nbconn
from nbconn import lab

from .conftest import open_fds


@pytest.mark.parametrize("scenario, outcomes", [
    ("listening", {"connected"}),
    ("refused", {"refused"}),
    ("blackhole", {"timed_out"}),
    ("reset", {"connected", "reset"}),
    ("unix-listening", {"connected"}),
    ("unix-full", {"refused"}),
    ("unix-missing", {"error"}),
])
def test_each_scenario_yields_its_outcome(scenario, outcomes):
    before = open_fds()
    with lab.SCENARIOS[scenario]() as peer:
        assert isinstance(peer, str) and peer.scenario
        results = nbconn.connect_many([peer] * 5, concurrency=5, timeout=0.2)
    assert {r.outcome for r in results} <= outcomes, [r.summary() for r in results]
    assert open_fds() == before


def test_slow_accept_burst_overflows_the_queue_and_leaves_a_syn_retransmission_tail():
    """A burst bigger than the accept queue: the kernel drops SYNs, clients resend them ~1 s later."""
    with lab.slow_accept(backlog=4, interval_s=0.02) as peer:
        results = nbconn.connect_many([peer] * 24, concurrency=24, timeout=3)
    times_ms = sorted(r.handshake_ms for r in results if r.connected)
    assert len(times_ms) == 24
    assert times_ms[0] < 50  # the first few fit in the queue at once
    assert times_ms[-1] > 900  # someone's SYN was dropped and resent after the initial RTO (1 s)


def test_peers_clean_up_on_exceptions():
    before = open_fds()
    for name, factory in lab.SCENARIOS.items():
        with pytest.raises(RuntimeError):
            with factory() as peer:
                path = peer.path
                raise RuntimeError(name)
        if path:
            assert not os.path.exists(os.path.dirname(path))
    assert open_fds() == before


def test_peers_refuse_non_loopback_hosts():
    for factory in (lab.listening, lab.refused, lab.blackhole, lab.reset, lab.slow_accept):
        with pytest.raises(ValueError, match="loopback"):
            with factory("198.18.0.1"):
                pass


def test_blackhole_connect_stays_in_syn_sent():
    with lab.blackhole() as peer:
        with socket.socket() as s:
            s.setblocking(False)
            assert s.connect_ex(("127.0.0.1", peer.port)) == 115  # EINPROGRESS
            from nbconn.tcpinfo import read_tcp_info

            assert read_tcp_info(s)["state"] == "SYN_SENT"


def test_listening_http_answers_one_request():
    with lab.listening(http=True) as peer, socket.create_connection(("127.0.0.1", peer.port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
