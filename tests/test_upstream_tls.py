"""The TLS stage of the upstream model (``proxy_pass https://``), by hand and next to a real nginx 1.22.1.

nbconn.nginx.upstream.run_request(..., tls=TLSClient) runs the handshake after each connect that succeeds
(nbconn.nginx.tls.connect_tls, its verdict table) and does with a failure what ngx_http_upstream_ssl_handshake does.
The real-nginx test runs the lab's TLS peers (good, silent after the TCP accept, untrusted certificate, TLS
1.2-only under a TLS 1.3-only client) through a private nginx and through the model, request by request:
status, $upstream_addr, the error-log lines with their levels, and what the following requests show of the
failure counting (the [warn] and the peers skipped).  The same run's raw error-log lines go through
``nbconn why`` (nbconn.nginx.why.decode): real lines, not typed ones.
"""

from __future__ import annotations

import os

import pytest

from nbconn.nginx import oracle, tls, upstream, why
from nbconn.errors import NGX_HTTP_UPSTREAM_FT_ERROR, NGX_HTTP_UPSTREAM_FT_TIMEOUT
from nbconn.lab import tlspeers

TIMEOUT = 0.3  # proxy_connect_timeout: connect and handshake together
_TIMED_OUT = "[error] upstream timed out (110: Connection timed out) while SSL handshaking to upstream"
_WARN = "[warn] upstream server temporarily disabled while SSL handshaking to upstream"
_UNTRUSTED = ("[error] upstream SSL certificate verify error: (21:unable to verify the first certificate) "
              "while SSL handshaking to upstream")
_VERSION = ("[error] SSL_do_handshake() failed (SSL: error:0A00042E:SSL routines::tlsv1 alert protocol version:"
            "SSL alert number 70) while SSL handshaking to upstream")
_PREMATURE = "[error] upstream prematurely closed connection while reading response header from upstream"
_WARN_READING = "[warn] upstream server temporarily disabled while reading response header from upstream"
_HANGUP = "[error] peer closed connection in SSL handshake while SSL handshaking to upstream"
_PLAIN = ("[error] SSL_do_handshake() failed (SSL: error:0A00010B:SSL routines::wrong version number) "
          "while SSL handshaking to upstream")


@pytest.fixture(scope="module")
def pki():
    with tlspeers.test_pki() as made:
        yield made


def _nginx_like(client: tls.TLSClient) -> None:
    if client.verify_like != "nginx":
        pytest.skip("the SSL object of CPython's ssl module cannot be reached here (nginx's verify order)")


# -- by hand: the model alone -------------------------------------------------------------------------------

def test_the_action_text_is_the_handshakes_log_action():
    """One text: the model's stage and the action nbconn.nginx.tls writes into its lines (ngx_http_upstream.c line 1727)."""
    assert upstream.SSL_HANDSHAKING == tls.ACTION


def test_handshake_failures_walk_on_and_count_as_failures(pki, no_fd_leak):
    """silent (the connect timer fires in the handshake: FT_TIMEOUT), untrusted (FT_ERROR), good: 200.  Both
    failures free the peer NGX_PEER_FAILED: with max_fails=1 each is disabled ([warn] while SSL handshaking), the
    timeout's [warn] before its line (ngx_http_upstream_next logs "upstream timed out" after peer.free), the
    verify error's after (logged in ngx_http_upstream_ssl_handshake before next).  The next request skips both."""
    client = tls.TLSClient(cafile=pki.cafile, server_name="localhost", reuse=True)
    _nginx_like(client)
    with tlspeers.tls_silent(pki=pki) as silent, tlspeers.tls_untrusted(pki=pki, http=True) as rogue, \
            tlspeers.tls_server(pki=pki, http=True) as good:
        with upstream.Upstream([str(silent), str(rogue), str(good)]) as up:
            first = upstream.run_request(up, timeout=TIMEOUT, http=True, tls=client)
            second = upstream.run_request(up, timeout=TIMEOUT, http=True, tls=client)
            fails = [p.fails for p in up.primary]
    assert first.result == "200" and first.upstream_addr == f"{silent}, {rogue}, {good}"
    assert first.log == [_WARN, _TIMED_OUT, _UNTRUSTED, _WARN]
    assert [a.failure for a in first.attempts] == ["timeout", "error", None]
    assert [a.action for a in first.attempts[:2]] == [upstream.SSL_HANDSHAKING] * 2
    # the connect timer covered connect and handshake: the silent try took at least proxy_connect_timeout
    assert first.attempts[0].connect_ms >= TIMEOUT * 1000
    assert fails == [1, 1, 0]
    assert second.result == "200" and second.upstream_addr == str(good) and second.log == []
    assert good.handshakes == 2 and good.resumed == 1  # proxy_ssl_session_reuse: the second one abbreviated


def test_a_single_tls_peer_is_never_disabled(pki):
    with tlspeers.tls_untrusted(pki=pki) as rogue, upstream.Upstream([str(rogue)]) as up:
        client = tls.TLSClient(cafile=pki.cafile, server_name="localhost")
        _nginx_like(client)
        req = upstream.run_request(up, timeout=TIMEOUT, tls=client)
    assert req.result == "502" and req.log == [_UNTRUSTED] and up.primary[0].fails == 0


def test_without_http_a_handshake_is_the_success(pki):
    with tlspeers.tls_server(pki=pki) as good, upstream.Upstream([str(good)]) as up:
        req = upstream.run_request(up, timeout=TIMEOUT, tls=tls.TLSClient())
    assert req.result == "200" and req.attempts[0].outcome == "connected" and req.log == []


def test_tls_must_be_a_client():
    with upstream.Upstream(["127.0.0.1:1"]) as up, pytest.raises(TypeError, match="TLSClient"):
        upstream.run_request(up, tls="on")


# -- next to a real nginx 1.22.1 ----------------------------------------------------------------------------

#: name -> (peers as (maker, server parameters), proxy_ssl_protocols or "", proxy_next_upstream, requests)
CASES = {
    # silent (timeout), untrusted with max_fails=2 (counted, disabled at its second failure), good
    "walk": ([("silent", {"max_fails": 1}), ("untrusted", {"max_fails": 2}), ("good", {"max_fails": 1})],
             "", ("error", "timeout"), 4),
    # proxy_ssl_protocols TLSv1.3 against a TLS 1.2-only peer: SSL_do_handshake() failed, then the good one
    "version": ([("tls12", {"max_fails": 1}), ("good", {"max_fails": 1})], "TLSv1.3", ("error", "timeout"), 2),
    # proxy_next_upstream off: the first failure ends the request (502 / 504)
    "off": ([("untrusted", {"max_fails": 1}), ("silent", {"max_fails": 1}), ("good", {"max_fails": 0})], "", (), 3),
    # one server: never disabled, one try each
    "single": ([("silent", {"max_fails": 1})], "", ("error", "timeout"), 2),
    # a peer that hangs up after the ClientHello, a plain HTTP server where TLS was expected
    "closed": ([("hangup", {"max_fails": 1}), ("plaintext", {"max_fails": 1}), ("good", {"max_fails": 1})], "",
               ("error", "timeout"), 2),
    # after the handshake: a peer that reads the request and resets (RST).  nginx 1.22.1's ngx_ssl_handle_recv
    # takes SSL_ERROR_SYSCALL with no OpenSSL error queued for a clean shutdown: "prematurely closed", not
    # "SSL_read() failed"
    "after": ([("reset", {"max_fails": 1}), ("good", {"max_fails": 1})], "", ("error", "timeout"), 2),
    # nbconn.nginx.upstream's stale-event corner, https: a failure read in the read handler (a plain HTTP answer 50 ms
    # after the ClientHello: surely after a wait, on EPOLLIN|EPOLLOUT), a connect() that fails at once (a missing
    # unix path), then a pending one (SYNs dropped): the old event's EPOLLOUT runs the new connection's
    # send_request_handler -> ssl_init_connection, and the connect's timer ends it as a handshake timeout
    "stale": ([("plaintext_late", {"max_fails": 0}), ("unix_missing", {"max_fails": 0}),
               ("blackhole", {"max_fails": 0})], "", ("error", "timeout"), 2),
}


def _peer(kind: str, pki):
    return {"good": lambda: tlspeers.tls_server(pki=pki, http=True),
            "untrusted": lambda: tlspeers.tls_untrusted(pki=pki, http=True),
            "silent": lambda: tlspeers.tls_silent(pki=pki),
            "tls12": lambda: tlspeers.tls12_only(pki=pki, http=True),
            "hangup": tlspeers.tls_hangup, "plaintext": tlspeers.tls_plaintext,
            "plaintext_late": lambda: tlspeers.tls_plaintext(delay_s=0.05),
            "reset": lambda: tlspeers.tls_server(pki=pki, reset=True),
            "unix_missing": lambda: oracle._peer("unix_missing"),
            "blackhole": lambda: oracle._peer("blackhole")}[kind]()


def _spec(address: str, params: dict) -> str:
    return f"{address},max_fails={params['max_fails']},fail_timeout=30"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tls_stage_matches_a_real_nginx(pki, case):
    """Status, $upstream_addr, the error-log lines (level and text, in order) of every request, nginx's and
    the model's, on the same peers; fail_timeout 30 s so that no second boundary matters.  Then ``nbconn why``
    decodes each of nginx's raw TLS lines: the handshake step, FT_ERROR / FT_TIMEOUT, the level, the peer counted."""
    from nbconn.nginx import runner as nginx_mod

    if nginx_mod.unavailable_reason():
        pytest.skip(nginx_mod.unavailable_reason())
    kinds, protocols, next_upstream, count = CASES[case]
    client = oracle.tls_client(pki.cafile, protocols)
    _nginx_like(client)
    import contextlib

    with contextlib.ExitStack() as stack:
        peers = [stack.enter_context(_peer(kind, pki)) for kind, _ in kinds]
        specs = [_spec(str(p), params) for p, (_, params) in zip(peers, kinds)]
        theirs, raw = [], []
        with oracle.https_nginx(specs, cafile=pki.cafile, protocols=protocols, connect_timeout=TIMEOUT,
                                read_timeout=2.0, next_upstream=next_upstream) as real:
            errors = os.path.join(real.prefix, "error.log")
            access = os.path.join(real.prefix, "access.log")
            offset = os.path.getsize(errors)
            for i in range(1, count + 1):
                status = real.request("/", timeout_s=30.0)
                assert oracle._wait_until(lambda: len(oracle._access_lines(access)) >= i, 5.0)
                lines, offset = oracle._new_error_lines(errors, offset)
                addr = oracle._access_lines(access)[i - 1].split("|")[1]
                theirs.append((status, addr, lines))
            with open(errors) as f:
                raw = [line.rstrip("\n") for line in f if "SSL handshaking to upstream" in line]
        ours = []
        with upstream.Upstream(specs, name=oracle.UPSTREAM_NAME) as up:
            for _ in range(count):
                req = upstream.run_request(up, timeout=TIMEOUT, http=True, read_timeout=2.0,
                                           next_upstream=next_upstream, tls=client)
                ours.append((req.result, req.upstream_addr, req.log))
    assert ours == theirs, f"\nnginx: {theirs}\nmodel: {ours}"
    expected_first = {"walk": [_WARN, _TIMED_OUT, _UNTRUSTED], "version": [_VERSION, _WARN],
                      "off": [_UNTRUSTED, _WARN], "single": [_TIMED_OUT],
                      "closed": [_HANGUP, _WARN, _PLAIN, _WARN], "stale": [_PLAIN, "(unix)", _TIMED_OUT],
                      "after": [_PREMATURE, _WARN_READING]}[case]
    # what the case is about did happen (the missing unix path's line names a path made for this run)
    assert [line if "connect() to unix:" not in line else "(unix)" for line in theirs[0][2]] == expected_first
    # nbconn why, on nginx's own lines
    assert raw or case == "after"
    for text in raw:
        answer = why.decode(text)
        assert answer["level_note"] is None, answer  # the level nginx wrote is the one the table expects
        if "temporarily disabled" in text:  # the round robin's [warn], written while the handshake's action holds
            assert answer["step"] == why.STEP_ACCOUNTING and answer["counts_against_max_fails"] is True
            continue
        assert answer["step"] == why.STEP_TLS, answer
        timed_out = "timed out" in text
        assert answer["ngx_next"] == (NGX_HTTP_UPSTREAM_FT_TIMEOUT if timed_out else NGX_HTTP_UPSTREAM_FT_ERROR)
        assert answer["counts_against_max_fails"] is True and answer["tries_another"] is True
        assert answer["upstream"] in [str(p) for p in peers]
        causes = {"upstream timed out": "tls_timeout", "upstream SSL certificate verify": "tls_verify",
                  "tlsv1 alert protocol version": "tls_ssl:TLSV1_ALERT_PROTOCOL_VERSION",
                  "wrong version number": "tls_ssl:WRONG_VERSION_NUMBER",
                  "peer closed connection in SSL handshake": "tls_closed"}
        [cause] = [cause for words, cause in causes.items() if words in text]
        assert answer["cause"] == cause, answer


@pytest.mark.slow
def test_random_https_configurations_agree_with_a_real_nginx(pki):
    """nbconn.nginx.oracle --tls: seeded random proxy_pass https:// configurations (the TLS peers among refused,
    black-hole and missing-unix ones; weights, max_fails, backup, next_upstream kinds, tries, fail_timeout's edge),
    nginx and the model request by request.  `./dev fuzz-nginx N --tls --seed S` runs more."""
    from nbconn.nginx import runner as nginx_mod

    if nginx_mod.unavailable_reason():
        pytest.skip(nginx_mod.unavailable_reason())
    _nginx_like(oracle.tls_client(pki.cafile))
    for index in range(3):
        config = oracle.draw_tls_config(7, index)
        assert config.tls is not None and "https" in config.describe()
        outcome = oracle.run_config(config)
        if outcome.compared < len(config.gaps):  # a request crossed a second boundary: run it once more
            outcome = oracle.run_config(config)
        assert outcome.compared == len(config.gaps), outcome.skipped_reason
        assert not outcome.disagreements, oracle.format_disagreement(outcome)


# -- the command line: nbconn upstream --tls ----------------------------------------------------------------

def _cli(*args):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "nbconn", "upstream", *args], cwd=root, capture_output=True,
                          text=True, timeout=120)


def test_cli_upstream_tls_walks_past_handshake_failures(pki):
    import json

    _nginx_like(tls.TLSClient(cafile=pki.cafile))
    with tlspeers.tls_silent(pki=pki) as silent, tlspeers.tls_untrusted(pki=pki, http=True) as rogue, \
            tlspeers.tls_server(pki=pki, http=True) as good:
        done = _cli("--peer", str(silent), "--peer", str(rogue), "--peer", str(good), "--tls", "--cafile",
                    pki.cafile, "--server-name", "localhost", "--http", "--requests", "2", "--timeout", str(TIMEOUT),
                    "--json")
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout)["requests"]
    assert first["result"] == "200" and first["log"] == [_WARN, _TIMED_OUT, _UNTRUSTED, _WARN]
    assert [a["action"] for a in first["attempts"][:2]] == [upstream.SSL_HANDSHAKING] * 2
    assert second["upstream_addr"] == str(good) and second["log"] == []


@pytest.mark.parametrize("args,match", [
    (["--cafile", "/x"], "add --tls"),
    (["--server-name", "localhost"], "add --tls"),
    (["--tls", "--cafile", "/nonexistent/ca.pem"], "cafile"),
    (["--tls", "--tls-version", "1.0"], "tls-version"),
])
def test_cli_upstream_tls_bad_input_exits_2_in_one_line(args, match):
    done = _cli("--peer", "127.0.0.1:1", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and match in done.stderr and "Traceback" not in done.stderr


def test_an_openssl_error_after_the_handshake_is_named_as_nginx_names_it():
    """ngx_ssl_connection_error's rule, after the handshake too: "SSL_read() failed (SSL: ...)", ERR for the
    reasons it lists (a bad record MAC is one), CRIT otherwise -- one table with the handshake's verdicts."""
    import ssl

    exc = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac "
                          "(_ssl.c:2580)")
    exc.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    assert tls.ssl_failure("SSL_read()", exc) == (
        "error", "SSL_read() failed (SSL: error:0A000119:SSL routines::decryption failed or bad record mac)")
    exc.reason = "SOMETHING_NEW"
    assert tls.ssl_failure("SSL_write()", exc)[0] == "crit"
