"""nginx's upstream round robin as a pure state machine (clock stepped by hand), then with real connects."""

import json
import subprocess
import sys

import pytest

from nbconn import lab
from nbconn.upstream import Peer, Upstream, run_requests


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def picks(up, n, outcome="connected"):
    order = []
    for _ in range(n):
        req = up.request()
        peer = req.next_peer()
        order.append(peer.address if peer else None)
        if peer:
            req.report(outcome, 0.1)
    return order


def test_smooth_weighted_round_robin_spreads_picks():
    up = Upstream([Peer("127.0.0.1:1", weight=5), Peer("127.0.0.1:2"), Peer("127.0.0.1:3")], clock=Clock())
    assert [a[-1] for a in picks(up, 7)] == list("1121311")  # nginx: a a b a c a a


def test_failed_peer_is_disabled_for_fail_timeout_then_retried():
    clock = Clock()
    a, b = Peer("127.0.0.1:1", fail_timeout=10), Peer("127.0.0.1:2", fail_timeout=10)
    up = Upstream([a, b], clock=clock)
    req = up.request()
    assert req.next_peer() is a
    req.report("refused")
    assert a.fails == 1 and a.effective_weight == 0 and req.attempts[-1].disabled
    assert req.next_peer() is b  # next upstream within the same request
    req.report("connected")
    assert req.result == "200" and [x.peer for x in req.attempts] == [a.address, b.address]
    assert picks(up, 3) == [b.address] * 3  # a stays out while fail_timeout runs
    clock.t += 11
    # after fail_timeout a is eligible again, but its effective weight restarts from 0 and climbs by one per
    # round (ngx_http_upstream_get_peer), so b still wins the next two picks
    assert picks(up, 4) == [b.address, b.address, a.address, b.address]
    assert a.fails == 0  # ... and a success clears its failures


def test_single_peer_is_never_marked_down_and_gets_one_try():
    up = Upstream(["127.0.0.1:1"], clock=Clock())
    for _ in range(3):
        req = up.request()
        assert req.next_peer() is not None
        req.report("refused")
        assert req.result == "502" and len(req.attempts) == 1
    assert up.primary[0].fails == 0


def test_all_down_gives_no_live_upstreams():
    up = Upstream(["127.0.0.1:1", "127.0.0.1:2"], clock=Clock())
    first = up.request()
    while (p := first.next_peer()) is not None:
        first.report("refused")
    assert first.result == "502" and len(first.attempts) == 2
    second = up.request()
    assert second.next_peer() is None and second.result == "502"
    assert second.log == ["no live upstreams while connecting to upstream"]


def test_backup_only_when_primaries_are_out_and_timeout_gives_504():
    up = Upstream(["127.0.0.1:1", "127.0.0.1:2,backup"], clock=Clock())
    req = up.request()
    assert req.next_peer().address == "127.0.0.1:1"
    req.report("timed_out")
    assert req.next_peer().address == "127.0.0.1:2"
    req.report("timed_out")
    assert req.result == "504"


def test_next_upstream_off_and_tries():
    up = Upstream(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], clock=Clock())
    req = up.request(next_upstream=("error",))
    req.next_peer()
    req.report("timed_out")
    assert req.result == "504" and len(req.attempts) == 1  # timeout not in proxy_next_upstream
    req = up.request(tries=2)
    while req.next_peer() is not None:
        req.report("refused")
    assert len(req.attempts) == 2 and req.result == "502"


@pytest.mark.parametrize("spec, words", [
    ("127.0.0.1:1,weight=0", "weight=0"),
    ("127.0.0.1:1,weight=x", "weight='x'"),
    ("127.0.0.1:1,max_fails=\u0663", "max_fails='\u0663'"),  # Arabic-Indic three: nginx's ngx_atoi refuses it
    ("127.0.0.1:1,fail_timeout=soon", "fail_timeout 'soon'"),
    ("127.0.0.1:1,fail_timeout=500ms", "milliseconds"),  # ngx_parse_time(&s, 1): ms is an error
    ("127.0.0.1:1,fail_timeout=1s1m", "'1s1m'"),  # units in falling order
    ("127.0.0.1:1,weight=2,weight=3", "weight given twice"),
    ("127.0.0.1:0", "port 0"),
    ("127.0.0.1:1,color=red", "'color=red'"),
])
def test_bad_peer_specs_named(spec, words):
    with pytest.raises((ValueError, TypeError)) as info:
        Peer.parse(spec)
    assert words in str(info.value)


@pytest.mark.parametrize("text, seconds", [("10", 10), ("10s", 10), ("1m", 60), ("1m30s", 90), ("1h", 3600),
                                           ("1d", 86400), ("0", 0), ("1m5", 65)])
def test_fail_timeout_in_nginx_time_units(text, seconds):
    assert Peer.parse(f"127.0.0.1:1,fail_timeout={text}").fail_timeout == seconds


@pytest.mark.parametrize("spec, address", [("127.0.0.1", "127.0.0.1:80"), ("[::1]", "[::1]:80"),
                                           ("127.0.0.1:81", "127.0.0.1:81"), ("127.0.0.1,weight=2", "127.0.0.1:80")])
def test_peer_without_port_means_80(spec, address):
    assert Peer.parse(spec).address == address


def test_real_connects_refused_first_then_listening():
    with lab.refused() as down, lab.listening() as upp:
        reqs = run_requests(Upstream([str(down), str(upp)]), 3, timeout=0.5)
    assert [[a.outcome for a in r.attempts] for r in reqs] == [["refused", "connected"], ["connected"], ["connected"]]
    assert reqs[0].attempts[0].nginx_log.startswith("connect() failed (111: Connection refused)")


def test_cli_json_shape():
    with lab.refused() as down, lab.listening() as upp:
        out = subprocess.run([sys.executable, "-m", "nbconn", "upstream", "--peer", str(down), "--peer",
                              f"{upp},weight=2", "--requests", "2", "--json"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    first = data["requests"][0]
    assert set(first) == {"attempts", "result"} and set(first["attempts"][0]) == {"peer", "outcome", "connect_ms"}
    bad = subprocess.run([sys.executable, "-m", "nbconn", "upstream", "--peer", "127.0.0.1:1,weight=-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "weight" in bad.stderr and "Traceback" not in bad.stderr
