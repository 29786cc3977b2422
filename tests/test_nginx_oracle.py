"""The nginx oracle (nbconn.nginx.oracle): the model against a real nginx 1.22.1, request by request.

A few hand-made configurations pin the findings of issue 19 (proxy_bind's 500, http_502, "no live upstreams"
after a timeout); a few seeded random ones widen the search.  `./dev fuzz-nginx N --seed S` runs many more.
Skips with one line where nginx is missing (CI installs it and fails instead)."""

import os
import subprocess
import sys

import pytest

from nbconn.nginx import runner, oracle
from nbconn.nginx.oracle import Config, draw_config, normalise, run_config

from .conftest import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def need_nginx():
    if runner.unavailable_reason():
        require_tool("nginx")


def server(kind, weight=1, max_fails=1, fail_timeout=10, backup=False, down=False):
    return kind, {"weight": weight, "max_fails": max_fails, "fail_timeout": fail_timeout, "backup": backup,
                  "down": down}


def handmade(index, servers, gaps, *, next_upstream=("error", "timeout"), tries=0, connect_timeout=0.2,
             proxy_bind=None, keepalive=0, next_upstream_timeout=0.0, worker_connections=64):
    return Config(0, index, servers, connect_timeout, next_upstream, tries, next_upstream_timeout, keepalive,
                  proxy_bind, gaps, worker_connections)


def agreeing(config):
    """Run ``config`` and check every request agrees.  A request that crossed a second boundary (a very loaded
    machine: nginx's clock and the model's would differ) makes the comparison unsure: run it once more."""
    outcome = run_config(config)
    if outcome.compared < len(config.gaps):
        outcome = run_config(config)
    assert outcome.compared == len(config.gaps), outcome.skipped_reason
    assert not outcome.disagreements, oracle.format_disagreement(outcome)
    return outcome


def test_proxy_bind_to_an_address_the_host_lacks(need_nginx):
    outcome = agreeing(handmade(1, [server("refused"), server("listening")], [0, 0, 0],
                                proxy_bind=oracle.UNREACHABLE_ADDRESS))
    line = "[crit] bind(198.18.0.5) failed (99: Cannot assign requested address) while connecting to upstream"
    assert [(s.status, s.upstream_addr, s.log) for s in outcome.nginx] == [("500", "", [line])] * 3


def test_proxy_bind_towards_af_unix_peers(need_nginx):
    outcome = agreeing(handmade(2, [server("refused"), server("unix_listening")], [0, 0], proxy_bind="127.0.0.1"))
    first = outcome.nginx[0]
    assert first.status == "500" and first.upstream_addr.endswith(" : ")  # the peerless try: nginx's " : "
    outcome = agreeing(handmade(3, [server("unix_missing"), server("listening")], [0, 0, 0], proxy_bind="127.0.0.1"))
    assert [s.status for s in outcome.nginx] == ["500", "200", "500"]  # no failure counted: the round robin goes on


def test_proxy_bind_of_the_other_ip_family(need_nginx):
    outcome = agreeing(handmade(8, [server("listening6"), server("listening")], [0, 0, 0], proxy_bind="::1"))
    assert [s.status for s in outcome.nginx] == ["200", "500", "200"]
    assert outcome.nginx[1].log == ["[crit] bind(::1) failed (97: Address family not supported by protocol) while "
                                    "connecting to upstream"]


def test_http_502_next_upstream_and_the_last_try(need_nginx):
    kinds = ("error", "timeout", "http_502")
    outcome = agreeing(handmade(4, [server("http502"), server("listening")], [0, 0], next_upstream=kinds))
    assert outcome.nginx[0].status == "200" and ", " in outcome.nginx[0].upstream_addr
    outcome = agreeing(handmade(5, [server("http502"), server("http502", max_fails=0)], [0, 0], next_upstream=kinds))
    assert outcome.nginx[0].status == "502"


def test_a_retried_502_on_a_kept_connection_is_not_cached(need_nginx):
    """Review finding 1: a 502 peer that keeps its connections (HTTP/1.1, Content-Length: 0), max_fails=0, next
    to a 200 peer, keepalive 4, http_502 retried.  nginx frees the retried answer's peer as failed and does not
    cache its connection, so each request that meets the 502 peer makes a new connection to it; the oracle
    compares the connections each peer accepted per request."""
    kinds = ("error", "timeout", "http_502")
    outcome = agreeing(handmade(9, [server(oracle.KEEPALIVE_502, max_fails=0), server("keepalive")], [0, 0, 0, 0],
                                next_upstream=kinds, keepalive=4))
    assert [s.status for s in outcome.nginx] == ["200"] * 4
    # every visit to the 502 peer is a new connection; the 200 peer's one connection is reused
    visits = sum(", " in s.upstream_addr for s in outcome.nginx)
    assert sum(s.opened[0] for s in outcome.nginx) == visits >= 2, outcome.nginx
    assert sum(s.opened[1] for s in outcome.nginx) == 1, outcome.nginx


def test_timeout_then_no_live_upstreams_is_502(need_nginx):
    """19.A1: NGX_HTTP_UPSTREAM_FT_NOLIVE is in no proxy_next_upstream mask: the request ends 502, not 504."""
    outcome = agreeing(handmade(6, [server("refused"), server("blackhole")], [0, 0], next_upstream=("timeout",)))
    second = outcome.nginx[1]
    assert second.status == "502" and second.upstream_addr.endswith(", backend")
    assert second.log[-1] == "[error] no live upstreams while connecting to upstream"


def test_worker_connections_are_not_enough(need_nginx):
    """19.A8: ngx_get_connection finds no free connection -> NGX_ERROR -> 500.  With worker_connections 4 the
    worker's listening socket, channel and client connection leave one; a cached keepalive connection takes it."""
    outcome = agreeing(handmade(7, [server("listening"), server("keepalive")], [0, 0, 0, 0], keepalive=2,
                                  worker_connections=4))
    assert [s.status for s in outcome.nginx] == ["200", "200", "500", "200"]
    assert outcome.nginx[2].log == ["[alert] 4 worker_connections are not enough while connecting to upstream"]


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_seeded_random_configurations_agree(need_nginx, index):
    outcome = agreeing(draw_config(19, index))


def test_draws_cover_every_dimension():
    configs = [draw_config(1, i) for i in range(300)]
    kinds = {kind for c in configs for kind, _ in c.servers}
    assert kinds == set(oracle.KINDS) | {oracle.KEEPALIVE_502}  # the keep-alive 502 peer: only with keepalive
    assert all(c.keepalive for c in configs if any(k == oracle.KEEPALIVE_502 for k, _ in c.servers))
    assert {len(c.servers) for c in configs} == {1, 2, 3, 4}
    assert {p["max_fails"] for c in configs for _, p in c.servers} == {0, 1, 2, 3}
    assert any(p["backup"] for c in configs for _, p in c.servers)
    assert {c.next_upstream for c in configs} >= {(), ("error", "timeout"), ("error", "timeout", "http_502")}
    assert {c.proxy_bind for c in configs} == {None, "127.0.0.1", "::1", oracle.UNREACHABLE_ADDRESS}
    assert {c.tries for c in configs} == {0, 1, 2, 3} and any(c.keepalive for c in configs)
    assert any(c.next_upstream_timeout for c in configs)
    assert {c.workers for c in configs} == {1, 2} and {c.worker_connections for c in configs} == {4, 5, 64}
    # gaps that land on fail_timeout's edge (still out) and one second past it (back)
    edges = {(gap, p["fail_timeout"]) for c in configs for gap in c.gaps[1:] for _, p in c.servers}
    assert {(1, 1), (2, 1), (2, 2), (3, 2)} <= edges
    # the worst walk of a request stays well under a second (see the module docstring)
    assert max(sum(k == "blackhole" for k, _ in c.servers) * c.connect_timeout for c in configs) <= 0.4
    assert draw_config(1, 5) == draw_config(1, 5)  # a seed names its configurations


def test_normalise_merges_only_the_reset_race():
    lines = ["[error] recv() failed (104: Connection reset by peer) while reading response header from upstream",
             "[warn] upstream server temporarily disabled while reading response header from upstream",
             "[error] connect() failed (111: Connection refused) while connecting to upstream",
             "[warn] upstream server temporarily disabled while connecting to upstream"]
    assert normalise(lines) == ["[error] (reset or close)", "[warn] upstream server temporarily disabled while *",
                                lines[2], lines[3]]
    writev = ["[error] writev() failed (32: Broken pipe) while sending request to upstream"]
    assert normalise(writev) == ["[error] (reset or close)"]


@pytest.mark.parametrize("args, words", [(["x"], "N 'x'"), (["0"], "N '0'"), (["2", "--seed", "-1"], "--seed '-1'"),
                                         (["1001"], "N '1001'"), ([], "required: N"), (["1", "--bogus"], "--bogus")])
def test_cli_bad_input_is_one_line_exit_2(args, words):
    out = subprocess.run([sys.executable, "-m", "nbconn.nginx.oracle", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""


def test_dev_names_fuzz_nginx():
    with open(os.path.join(ROOT, "dev")) as f:
        text = f.read()
    assert "fuzz-nginx)" in text and "-m nbconn.nginx.oracle" in text


def test_the_oracle_catches_the_old_model(need_nginx, monkeypatch):
    """The model before issue 19 treated a failing bind() as an ordinary error try (next peer, failure counted,
    502, then "no live upstreams").  Put that back: the oracle must disagree on every request."""
    from nbconn.nginx import upstream

    def as_before(self, nginx_log, level):
        self.report("error", nginx_log=nginx_log, level=level)

    monkeypatch.setattr(upstream.Request, "report_ngx_error", as_before)
    config = handmade(9, [server("refused"), server("listening")], [0, 0, 0], proxy_bind=oracle.UNREACHABLE_ADDRESS)
    outcome = run_config(config)
    if outcome.compared < 3:  # crossed a second boundary on a loaded machine: once more
        outcome = run_config(config)
    assert outcome.compared == 3, outcome.skipped_reason
    assert [i for i, _, _ in outcome.disagreements] == [1, 2, 3]
