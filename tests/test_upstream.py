"""nginx's upstream round robin as a pure state machine (clock stepped by hand), then with real connects."""

import json
import subprocess
import sys

import pytest

from nbconn import lab
from nbconn.nginx.upstream import Server, Upstream, run_requests


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
    up = Upstream([Server("127.0.0.1:1", weight=5), Server("127.0.0.1:2"), Server("127.0.0.1:3")], clock=Clock())
    assert [a[-1] for a in picks(up, 7)] == list("1121311")  # nginx: a a b a c a a


def test_failed_peer_is_disabled_for_fail_timeout_then_retried():
    clock = Clock()
    a, b = Server("127.0.0.1:1", fail_timeout=10), Server("127.0.0.1:2", fail_timeout=10)
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
    while first.next_peer() is not None:
        first.report("refused")
    assert first.result == "502" and len(first.attempts) == 2
    second = up.request()
    assert second.next_peer() is None and second.result == "502"
    assert second.log == ["[error] no live upstreams while connecting to upstream"]


def test_timeout_that_disables_logs_warn_before_error_refused_error_before_warn():
    """ngx_http_upstream_next (1.22.1): peer.free -- which logs the [warn] -- runs before the function logs
    "upstream timed out"; a refused connect was logged earlier, where it happened."""
    up = Upstream(["127.0.0.1:1", "127.0.0.1:2"], clock=Clock())
    req = up.request()
    req.next_peer()
    req.report("timed_out", nginx_log="upstream timed out (110: Connection timed out) while connecting to upstream")
    req.next_peer()
    req.report("refused", nginx_log="connect() failed (111: Connection refused) while connecting to upstream")
    assert req.log == [
        "[warn] upstream server temporarily disabled while connecting to upstream",
        "[error] upstream timed out (110: Connection timed out) while connecting to upstream",
        "[error] connect() failed (111: Connection refused) while connecting to upstream",
        "[warn] upstream server temporarily disabled while connecting to upstream",
    ]
    assert req.to_dict()["log"] == req.log and [a["disabled"] for a in req.to_dict()["attempts"]] == [True, True]


def test_fail_timeout_counts_whole_wall_clock_seconds():
    """ngx_time(): a failure at wall time 1000.9 is 'second 1000'; with fail_timeout=1 the peer is back once
    now - checked > 1, i.e. from second 1002 (1001.0 real seconds later would be too early by the monotonic
    reading of another clock)."""
    clock = Clock()
    clock.t = 1000.9
    a, b = Server("127.0.0.1:1", fail_timeout=1), Server("127.0.0.1:2", fail_timeout=1)
    up = Upstream([a, b], clock=clock)
    req = up.request()
    req.next_peer()
    req.report("refused")
    assert a.checked == 1000
    clock.t = 1001.99  # second 1001: 1001 - 1000 = 1 <= fail_timeout: still out
    assert not a.eligible(up.now())
    clock.t = 1002.0  # second 1002: back
    assert a.eligible(up.now())


def test_default_clock_is_wall_clock_seconds():
    import time

    up = Upstream(["127.0.0.1:1", "127.0.0.1:2"])
    assert abs(up.now() - int(time.time())) <= 1


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
        Server.parse(spec)
    assert words in str(info.value)


@pytest.mark.parametrize("text, seconds", [("10", 10), ("10s", 10), ("1m", 60), ("1m30s", 90), ("1h", 3600),
                                           ("1d", 86400), ("0", 0), ("1m5", 65)])
def test_fail_timeout_in_nginx_time_units(text, seconds):
    assert Server.parse(f"127.0.0.1:1,fail_timeout={text}").fail_timeout == seconds


@pytest.mark.parametrize("spec, address", [("127.0.0.1", "127.0.0.1:80"), ("[::1]", "[::1]:80"),
                                           ("127.0.0.1:81", "127.0.0.1:81"), ("127.0.0.1,weight=2", "127.0.0.1:80")])
def test_peer_without_port_means_80(spec, address):
    assert Server.parse(spec).address == address


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
    assert set(first) == {"attempts", "result", "upstream_addr", "log"}
    assert first["upstream_addr"] == str(upp) and data["requests"][1]["upstream_addr"] == f"{down}, {upp}"
    assert set(first["attempts"][0]) == {"peer", "outcome", "connect_ms", "action", "disabled", "reused"}
    assert first["log"] == [] and data["requests"][1]["log"] == ["[error] connect() failed (111: Connection refused) while connecting to upstream",
                            "[warn] upstream server temporarily disabled while connecting to upstream"]
    bad = subprocess.run([sys.executable, "-m", "nbconn", "upstream", "--peer", "127.0.0.1:1,weight=-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "weight" in bad.stderr and "Traceback" not in bad.stderr


def test_reset_after_accept_is_a_failure_nginx_would_log():
    """A peer that accepts and then resets: with http=True the model sends the request and reads the response
    header, as nginx does, so it never calls this peer a success; the line is one of those nginx writes."""
    allowed = {"connect() failed (104: Connection reset by peer) while connecting to upstream",
               "writev() failed (104: Connection reset by peer) while sending request to upstream",
               "writev() failed (32: Broken pipe) while sending request to upstream",
               "recv() failed (104: Connection reset by peer) while reading response header from upstream",
               "upstream prematurely closed connection while reading response header from upstream"}
    with lab.reset() as rst:
        reqs = run_requests(Upstream([str(rst)]), 20, timeout=0.5, http=True)
    seen = {r.attempts[0].nginx_log for r in reqs}
    assert all(r.result == "502" for r in reqs)
    assert seen <= allowed, seen


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nbconn", "upstream", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_json_log_disabled_and_no_live_upstreams():
    with lab.refused() as d1, lab.blackhole() as hole:
        out = _cli("--peer", str(d1), "--peer", f"{hole},fail_timeout=1m", "--requests", "2", "--timeout", "0.2",
                   "--json")
    assert out.returncode == 0, out.stderr
    first, second = json.loads(out.stdout)["requests"]
    assert [a["disabled"] for a in first["attempts"]] == [True, True] and first["result"] == "504"
    assert first["log"] == [
        "[error] connect() failed (111: Connection refused) while connecting to upstream",
        "[warn] upstream server temporarily disabled while connecting to upstream",
        "[warn] upstream server temporarily disabled while connecting to upstream",
        "[error] upstream timed out (110: Connection timed out) while connecting to upstream"]
    assert second == {"attempts": [], "result": "502", "upstream_addr": "backend",
                      "log": ["[error] no live upstreams while connecting to upstream"]}


def test_cli_help_lists_down_and_http_mode_sees_the_reset():
    help_text = _cli("--help").stdout
    assert ",down" in help_text and "http_502" in help_text and "--proxy-bind" in help_text
    assert "500ms" not in help_text  # fail_timeout is whole seconds: ngx_parse_time(&s, 1) refuses ms
    with lab.reset() as rst, lab.listening(http=True) as up:
        out = _cli("--peer", str(rst), "--peer", str(up), "--http", "--json")
    assert out.returncode == 0, out.stderr
    (req,) = json.loads(out.stdout)["requests"]
    assert req["result"] == "200" and [a["outcome"] for a in req["attempts"]][-1] == "ok"
    assert req["attempts"][0]["outcome"] in ("reset", "closed") and req["attempts"][0]["disabled"]


# -- keepalive: ngx_http_upstream_keepalive_module ------------------------------------------------------

def test_keepalive_cache_is_lru_over_all_peers_without_io():
    from nbconn.nginx.upstream import KeptConnection

    up = Upstream(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], clock=Clock(), keepalive=2)
    assert up.keepalive_get("127.0.0.1:1") is None
    assert up.keepalive_free(KeptConnection("127.0.0.1:1")) is None
    assert up.keepalive_free(KeptConnection("127.0.0.1:2")) is None
    evicted = up.keepalive_free(KeptConnection("127.0.0.1:3"))  # full: the least recently saved goes
    assert evicted.address == "127.0.0.1:1" and [k.address for k in up.cache] == ["127.0.0.1:3", "127.0.0.1:2"]
    kept = up.keepalive_get("127.0.0.1:2")
    assert kept.requests == 2 and [k.address for k in up.cache] == ["127.0.0.1:3"]
    kept.requests = 1000  # keepalive_requests reached: not saved again
    assert up.keepalive_free(kept) is kept


def test_reused_connection_that_fails_gives_its_try_back():
    """ngx_http_upstream_next: u->peer.cached && FT_ERROR -> tries++; so a single peer gets a second try."""
    up = Upstream(["127.0.0.1:1"], clock=Clock(), keepalive=1)
    req = up.request()
    req.next_peer()
    req.report("closed", 0.0, nginx_log="upstream prematurely closed connection while reading response header "
               "from upstream", action="reading response header from upstream", reused=True)
    assert req.result is None and req.next_peer() is not None
    req.report("ok", 0.1, action="reading response header from upstream")
    assert req.result == "200" and [a.reused for a in req.attempts] == [True, False]


def test_cli_keepalive_reused_attempts_make_no_connect():
    from nbconn.nginx.httpd import HttpPeer

    from .conftest import require_tool

    strace = require_tool("strace")
    with HttpPeer() as peer:
        out = subprocess.run([strace, "-f", "-qq", "-e", "trace=connect", sys.executable, "-m", "nbconn", "upstream",
                              "--peer", str(peer), "--requests", "4", "--keepalive", "2", "--json"],
                             capture_output=True, text=True, timeout=60)
        served = list(peer.served)
    assert out.returncode == 0, out.stderr[-2000:]
    reqs = json.loads(out.stdout)["requests"]
    assert [[a["reused"] for a in r["attempts"]] for r in reqs] == [[False], [True], [True], [True]]
    assert [a["connect_ms"] for r in reqs[1:] for a in r["attempts"]] == [0.0, 0.0, 0.0]
    connects = [line for line in out.stderr.splitlines() if f"htons({peer.port})" in line]
    assert len(connects) == 1, connects  # one connect() for four requests
    assert [s.nth for s in served] == [1, 2, 3, 4]  # the peer saw them all on one connection


def test_http_peer_leaves_no_thread_or_socket():
    import threading

    from nbconn.nginx.httpd import HttpPeer

    before = threading.active_count()
    with HttpPeer() as peer:
        with Upstream([str(peer)], keepalive=1) as up:
            run_requests(up, 3)
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="loopback"):
        HttpPeer("192.0.2.1")


# -- issue 19: what nginx 1.22.1 does that the model got wrong or could not say ----------------------------------

def test_failure_before_connect_is_500_at_once_and_counts_no_failure():
    """ngx_event_connect_peer's NGX_ERROR (here bind() for proxy_bind): ngx_http_upstream_connect finalizes with 500,
    no next peer; finalize_request frees the peer with state 0, so the next request does not see it disabled."""
    a, b = Server("127.0.0.1:1"), Server("127.0.0.1:2")
    up = Upstream([a, b], clock=Clock())
    req = up.request()
    assert req.next_peer() is a
    req.report_ngx_error("bind(198.18.0.5) failed (99: Cannot assign requested address) while connecting to upstream",
                         "crit")
    assert req.result == "500" and req.next_peer() is None and len(req.attempts) == 1
    assert a.fails == 0 and not req.attempts[0].disabled
    assert req.log == ["[crit] bind(198.18.0.5) failed (99: Cannot assign requested address) while connecting to "
                       "upstream"]
    assert req.upstream_addr == ""  # u->state->peer is set only after the NGX_ERROR check
    again = up.request()
    assert again.next_peer() is b and again.log == []  # round robin goes on; no "no live upstreams"


def test_upstream_addr_writes_a_peerless_try_as_the_group_separator():
    up = Upstream(["127.0.0.1:1", "127.0.0.1:2"], clock=Clock())
    req = up.request()
    req.next_peer()
    req.report("refused", nginx_log="connect() failed (111: Connection refused) while connecting to upstream")
    req.next_peer()
    req.report_ngx_error("bind(127.0.0.1) failed (22: Invalid argument) while connecting to upstream", "crit")
    assert req.result == "500" and req.upstream_addr == "127.0.0.1:1 : "  # as nginx 1.22.1 logged it


def test_no_live_upstreams_after_a_timeout_ends_502_not_504():
    """NGX_HTTP_UPSTREAM_FT_NOLIVE is in no proxy_next_upstream mask: ngx_http_upstream_next finalizes with 502."""
    up = Upstream(["127.0.0.1:1", "127.0.0.1:2"], clock=Clock())
    first = up.request()
    first.next_peer()
    first.report("refused")  # 127.0.0.1:1 out for fail_timeout
    first.next_peer()
    first.report("connected")
    req = up.request()
    assert req.next_peer().address == "127.0.0.1:2"
    req.report("timed_out", nginx_log="upstream timed out (110: Connection timed out) while connecting to upstream")
    assert req.result is None and req.next_peer() is None
    assert req.result == "502" and req.nolive and req.upstream_addr == "127.0.0.1:2, backend"
    assert req.log[-1] == "[error] no live upstreams while connecting to upstream"


def test_http_502_is_retried_only_when_listed_and_not_on_the_last_try():
    """ngx_http_upstream_test_next: the 502 goes on to the next peer (a failure for the round robin, [warn] when it
    disables) while u->peer.tries > 1; on the last try the 502 goes to the client and counts as a success."""
    a, b = Server("127.0.0.1:1"), Server("127.0.0.1:2")
    up = Upstream([a, b], clock=Clock())
    req = up.request(next_upstream=("error", "timeout", "http_502"))
    req.next_peer()
    req.report("ok", action="reading response header from upstream", status=502)
    assert req.result is None and a.fails == 1 and req.attempts[0].failure == "http_502"
    assert req.log == ["[warn] upstream server temporarily disabled while reading response header from upstream"]
    req.next_peer()
    req.report("ok", action="reading response header from upstream", status=502)  # the last try: passed on
    assert req.result == "502" and b.fails == 0 and req.upstream_addr == "127.0.0.1:1, 127.0.0.1:2"
    plain = Upstream(["127.0.0.1:1", "127.0.0.1:2"], clock=Clock()).request()  # http_502 not listed
    plain.next_peer()
    plain.report("ok", status=502)
    assert plain.result == "502" and len(plain.attempts) == 1
    ok = Upstream(["127.0.0.1:1", "127.0.0.1:2"], clock=Clock()).request(next_upstream=("http_503",))
    ok.next_peer()
    ok.report("ok", status=503)
    ok.next_peer()
    ok.report("ok", status=200)
    assert ok.result == "200"


def test_http_403_and_404_go_on_without_counting_a_failure():
    a = Server("127.0.0.1:1")
    up = Upstream([a, Server("127.0.0.1:2"), Server("127.0.0.1:3")], clock=Clock())
    req = up.request(next_upstream=("http_404",))
    req.next_peer()
    req.report("ok", status=404)
    assert req.result is None and a.fails == 0 and req.log == []  # NGX_PEER_NEXT
    req.next_peer()
    req.report("refused")
    assert req.result == "502"  # error is not listed


def test_each_next_peer_is_a_smooth_weighted_pick_not_the_listed_order():
    """Weights 2, 1; max_fails=0 (never disabled); every try fails.  nginx's get_peer, restated by hand:
    request 1 picks a (cw a=2 b=1), then b; request 2 picks b (a=1 b=2) then a; request 3 a then b."""
    up = Upstream(["127.0.0.1:1,weight=2,max_fails=0", "127.0.0.1:2,max_fails=0"], clock=Clock())
    walks = []
    for _ in range(3):
        req = up.request()
        while req.next_peer() is not None:
            req.report("refused")
        walks.append([a.peer[-1] for a in req.attempts])
    assert walks == [["1", "2"], ["2", "1"], ["1", "2"]]


def test_proxy_bind_to_an_address_the_host_lacks_answers_500_with_nginx_line():
    """Measured with nginx 1.22.1: `proxy_bind 198.18.0.5` -> 500, empty $upstream_addr, one
    `[crit] bind(198.18.0.5) failed (99: ...)` per request, no failure counted (every request fails the same way)."""
    with lab.refused() as down, lab.listening(http=True) as upp:
        reqs = run_requests(Upstream([str(down), str(upp)]), 3, timeout=0.5, http=True, proxy_bind="198.18.0.5")
    line = "[crit] bind(198.18.0.5) failed (99: Cannot assign requested address) while connecting to upstream"
    assert [(r.result, r.upstream_addr, r.log) for r in reqs] == [("500", "", [line])] * 3


def test_proxy_bind_towards_an_af_unix_peer_is_einval():
    with lab.unix_missing() as missing, lab.listening(http=True) as upp:
        reqs = run_requests(Upstream([str(missing), str(upp)]), 3, timeout=0.5, http=True, proxy_bind="127.0.0.1")
    assert [r.result for r in reqs] == ["500", "200", "500"]  # as nginx 1.22.1 answered
    assert reqs[0].log == ["[crit] bind(127.0.0.1) failed (22: Invalid argument) while connecting to upstream"]
    with pytest.raises(ValueError, match="proxy_bind='198.18.0.x'"):
        run_requests(Upstream(["127.0.0.1:1"]), 1, proxy_bind="198.18.0.x")


def test_worker_connections_not_enough_is_500_and_a_cached_connection_needs_none():
    """What nginx 1.22.1 answered with worker_connections 4, keepalive 2 and peers [closes, keeps]: 200 200 500 200."""
    from nbconn.nginx.httpd import HttpPeer

    with lab.listening(http=True) as closes, HttpPeer() as keeps:
        with Upstream([str(closes), str(keeps)], keepalive=2, worker_connections=4) as up:
            reqs = run_requests(up, 4, timeout=0.5)
    assert [r.result for r in reqs] == ["200", "200", "500", "200"]
    assert reqs[2].log == ["[alert] 4 worker_connections are not enough while connecting to upstream"]
    assert reqs[2].upstream_addr == "" and reqs[3].attempts[0].reused


@pytest.mark.parametrize("pair", sorted(__import__("nbconn.nginx.upstream").nginx.upstream.BIND_FAMILY_ERRNO))
def test_bind_family_errnos_are_the_kernels(pair):
    """The table the model answers proxy_bind-towards-another-family with, checked against this kernel: bind() of
    the other family's sockaddr (nginx's length for it) on the peer's kind of socket."""
    import ctypes
    import socket
    import struct

    from nbconn.nginx.upstream import BIND_FAMILY_ERRNO

    sin = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + socket.inet_aton("127.0.0.1") + bytes(8)
    sin6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 0) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, "::1") + bytes(4))
    family = {"unix": socket.AF_UNIX, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}[pair[0]]
    raw = sin if pair[1] == "ipv4" else sin6
    libc = ctypes.CDLL(None, use_errno=True)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        assert libc.bind(sock.fileno(), raw, len(raw)) == -1
        assert ctypes.get_errno() == BIND_FAMILY_ERRNO[pair]


def test_proxy_bind_v6_towards_a_v4_peer_is_eafnosupport():
    with lab.listening(http=True) as upp:
        (req,) = run_requests(Upstream([str(upp)]), 1, timeout=0.5, http=True, proxy_bind="::1")
    assert req.result == "500"
    assert req.log == ["[crit] bind(::1) failed (97: Address family not supported by protocol) while connecting to "
                       "upstream"]


@pytest.mark.parametrize("first", ["refused", "http502"])
def test_stale_epollout_after_two_handouts_of_a_slot_waits_send_timeout(first):
    """nginx 1.22.1's one-bit stale-event check (run_request's docstring), found by the oracle: a failure judged in
    a read handler, then a connect() failing at once (a missing AF_UNIX path), then a pending connect (a black
    hole): the old event's EPOLLOUT runs the new connection's write handler, and nginx waits proxy_send_timeout."""
    from nbconn.nginx.oracle import status_peer

    maker = lab.refused if first == "refused" else (lambda: status_peer(502))
    with maker() as bad, lab.unix_missing() as missing, lab.blackhole() as hole:
        up = Upstream([f"{bad},weight=2,max_fails=0", f"{missing},max_fails=0", f"{hole},max_fails=0"], clock=Clock())
        req = run_requests(up, 1, timeout=0.1, http=True, next_upstream=("error", "timeout", "http_502"))[0]
        assert [a.peer for a in req.attempts] == [str(bad), str(missing), str(hole)]
        assert req.log[-1] == "[error] upstream timed out (110: Connection timed out) while sending request to upstream"
        assert req.attempts[-1].action == "sending request to upstream" and up.unwaited_s == pytest.approx(59.9)
        assert up.now() == 1000 + 59  # the model's ngx_time() reads the 60 s nginx waited
        # one handout (no missing path in between): the bit differs, the stale event is dropped, the timer decides
        up = Upstream([f"{bad},weight=2,max_fails=0", f"{hole},max_fails=0"], clock=Clock())
        req = run_requests(up, 1, timeout=0.1, http=True, next_upstream=("error", "timeout", "http_502"))[0]
        assert req.log[-1] == "[error] upstream timed out (110: Connection timed out) while connecting to upstream"
