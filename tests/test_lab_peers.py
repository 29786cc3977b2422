"""Each lab peer yields the outcome it promises, and cleans up after itself."""

import os
import re
import socket
import threading

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
    with lab.SCENARIO_PEERS[scenario]() as peer:
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
    for name, factory in lab.SCENARIO_PEERS.items():
        if name == "impaired":
            continue  # tests/test_wire.py
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


def test_one_scenarios_mapping_keyed_by_validate():
    from nbconn import validate

    assert tuple(lab.SCENARIO_PEERS) == validate.SCENARIOS


@pytest.mark.parametrize(("name", "wire", "error", "fragment"), [
    ("nonesuch", {}, ValueError, "nonesuch"),
    ("listening", {"delay_ms": 5}, ValueError, "only apply to the 'impaired'"),
    ("impaired", {"delay": 5}, TypeError, "delay"),
    ("impaired", {"delay_ms": -1}, ValueError, "delay_ms=-1"),
])
def test_scenario_checks_everything_before_starting(name, wire, error, fragment):
    before = open_fds()
    with pytest.raises(error, match=fragment):
        with lab.scenario(name, **wire):
            pytest.fail("body must not run")
    assert open_fds() == before


def test_scenario_yields_target_and_client_side():
    with lab.scenario("listening") as (target, client_side):
        assert target.scenario == "listening"
        with client_side():
            [result] = nbconn.connect_many([target], timeout=1)
    assert result.outcome == "connected"


def test_impaired_scenario_connects_from_the_client_namespace():
    from nbconn import socketsource
    from nbconn.lab.wire import wire_unavailable_reason

    reason = wire_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the impairment wire cannot run here: {reason}")
    with lab.scenario("impaired", delay_ms=1) as (target, client_side):
        assert target.startswith("198.18.0.2:")
        with client_side():
            with socketsource.current().socket() as s:
                s.settimeout(2)
                s.connect(("198.18.0.2", target.port))
        assert target.link.stats()["listener_accepted"] in (0, 1)


class _ReprRaises:
    def __repr__(self):
        raise RuntimeError("a caller's broken __repr__")


def _shown_survives_a_raising_repr() -> bool:
    from nbconn import validate

    try:
        validate.shown(_ReprRaises())
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(("call", "error", "fragment"), [
    (lambda: lab.listening(backlog=-5), ValueError, "backlog=-5"),
    (lambda: lab.listening(backlog=10 ** 30), ValueError, "backlog="),
    (lambda: lab.listening(http="yes"), TypeError, "http"),
    (lambda: lab.listening(hold=1), TypeError, "hold"),
    (lambda: lab.listening(host=5), TypeError, "host"),
    (lambda: lab.slow_accept(backlog="8"), TypeError, "backlog"),
    (lambda: lab.slow_accept(interval_s=0), ValueError, "interval_s=0"),
    (lambda: lab.unix_listening(backlog=-1), ValueError, "backlog=-1"),
    (lambda: lab.unix_full(max_fillers=-1), ValueError, "max_fillers=-1"),
    (lambda: lab.unix_full(backlog=10, max_fillers=5), ValueError, "max_fillers=5"),
    pytest.param(lambda: lab.listening(backlog=_ReprRaises()), TypeError, "backlog",
                 marks=pytest.mark.skipif(not _shown_survives_a_raising_repr(),
                                          reason="needs validate.shown() that survives a raising repr (faults-cli)")),
])
def test_peer_arguments_refused_before_anything_is_opened(call, error, fragment):
    """Issue 24.11: each bad argument is a TypeError/ValueError naming it, before a socket, directory or thread."""
    fds, threads = open_fds(), {t.name for t in threading.enumerate()}
    with pytest.raises(error, match=re.escape(fragment)):
        with call():
            pass
    assert open_fds() == fds
    assert {t.name for t in threading.enumerate()} == threads
