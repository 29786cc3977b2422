"""``nbconn why`` on the upstream TLS handshake's lines (proxy_pass https://).

Pure: every line here is built by nbconn.nginx.tls.handshake_verdict -- the one table of what nginx 1.22.1 makes of
a handshake's end -- and read back by nbconn.nginx.why, so the two cannot drift apart.  The lines a real nginx 1.22.1
wrote are decoded in tests/test_upstream_tls.py::test_tls_stage_matches_a_real_nginx (captured there, not typed).
"""

from __future__ import annotations

import errno

import pytest

from nbconn.nginx import tls, why
from nbconn.errors import NGX_HTTP_UPSTREAM_FT_ERROR, NGX_HTTP_UPSTREAM_FT_TIMEOUT

_CONTEXT = (', client: 127.0.0.1, server: , request: "GET / HTTP/1.0", upstream: "https://127.0.0.1:4433/", '
            'host: "nbconn"')

VERDICTS = [
    (("timeout",), {}, "tls_timeout"),
    (("verify",), {"verify_code": 21, "verify_message": "unable to verify the first certificate"}, "tls_verify"),
    (("hostname",), {"server_name": "wrong.example"}, "tls_name"),
    (("closed",), {"err": 0}, "tls_closed"),
    (("closed",), {"err": errno.ECONNRESET}, "tls_closed:ECONNRESET"),
    (("ssl",), {"reason": "TLSV1_ALERT_PROTOCOL_VERSION", "reason_text": "tlsv1 alert protocol version"},
     "tls_ssl:TLSV1_ALERT_PROTOCOL_VERSION"),
    (("ssl",), {"reason": "WRONG_VERSION_NUMBER", "reason_text": "wrong version number"},
     "tls_ssl:WRONG_VERSION_NUMBER"),
    (("ssl",), {"reason": "CERTIFICATE_VERIFY_FAILED", "reason_text": "certificate verify failed"},
     "tls_ssl:CERTIFICATE_VERIFY_FAILED"),  # a reason nginx logs at CRIT
]


@pytest.mark.parametrize("args, kwargs, cause", VERDICTS, ids=[c for _, _, c in VERDICTS])
def test_every_handshake_verdict_decodes_back(args, kwargs, cause):
    v = tls.handshake_verdict(*args, **kwargs)
    line = f"2026/12/03 12:00:00 [{v.level}] 811#811: *5 {v.log}{_CONTEXT}"
    answer = why.decode(line)
    assert answer["cause"] == cause
    assert answer["step"] == why.STEP_TLS
    assert (answer["expected_level"], answer["level_note"]) == (v.level, None)
    assert (answer["ngx_code"], answer["ngx_next"], answer["outcome"]) == (v.ngx_code, v.ngx_next, v.outcome)
    # what nginx does next, asked of the upstream model: the next peer, and the failure counted
    assert answer["tries_another"] is True and answer["counts_against_max_fails"] is True
    assert ("504" if v.ngx_next == NGX_HTTP_UPSTREAM_FT_TIMEOUT else "502") in answer["detail"]
    assert answer["upstream"] == "127.0.0.1:4433" and answer["module"] == "http"
    assert answer["kernel"] and answer["notebook"].startswith("15") and "nginx 1.22.1" in answer["source"]
    assert "SSL handshaking" in why.render(answer)


def test_the_timer_is_the_connects():
    answer = why.decode("upstream timed out (110: Connection timed out) while SSL handshaking to upstream")
    assert answer["ngx_next"] == NGX_HTTP_UPSTREAM_FT_TIMEOUT and answer["errno"] == errno.ETIMEDOUT
    assert "proxy_connect_timeout" in answer["directives"] and "proxy_read_timeout" not in answer["directives"]
    assert "proxy_connect_timeout bounds connect and handshake together" in answer["kernel"]


def test_a_crit_reason_logged_at_error_is_flagged():
    v = tls.handshake_verdict("ssl", reason="CERTIFICATE_VERIFY_FAILED", reason_text="certificate verify failed")
    assert v.level == "crit"
    answer = why.decode(f"2026/12/03 12:00:00 [error] 1#1: *1 {v.log}")
    assert answer["level_note"] and "[crit]" in answer["level_note"]


def test_an_unknown_openssl_reason_still_decodes_as_a_handshake_failure():
    answer = why.decode("SSL_do_handshake() failed (SSL: error:0A0000FF:SSL routines::something new) "
                        "while SSL handshaking to upstream")
    assert answer["cause"] == "tls_ssl" and answer["expected_level"] == "crit"
    assert answer["ngx_next"] == NGX_HTTP_UPSTREAM_FT_ERROR


def test_the_disabled_warn_of_a_handshake_failure_is_the_round_robins():
    answer = why.decode("upstream server temporarily disabled while SSL handshaking to upstream")
    assert answer["step"] == why.STEP_ACCOUNTING


def test_session_reuse_line_ends_the_request_with_500():
    """proxy_ssl_session_reuse: nginx 1.22.1's one session line for an upstream (ngx_ssl_set_session), written
    before the action becomes the handshake's."""
    answer = why.decode("2026/12/03 12:00:00 [alert] 1#1: *1 SSL_set_session() failed (SSL: error:0A0000C2:SSL "
                        "routines::bad ssl version) while connecting to upstream" + _CONTEXT)
    assert answer["cause"] == "tls_set_session" and answer["expected_level"] == "alert"
    assert answer["tries_another"] is False and answer["counts_against_max_fails"] is False
    assert "500" in answer["detail"] and "proxy_ssl_session_reuse" in answer["directives"]


def test_handshake_texts_under_another_action_are_outside():
    answer = why.decode("SSL_do_handshake() failed (SSL: error:0A00010B:SSL routines::wrong version number) "
                        "while connecting to upstream")
    assert answer["cause"] == "outside"


def test_summary_counts_tls_causes():
    summary = why.Summary()
    v = tls.handshake_verdict("timeout")
    for second in ("01", "01", "02"):
        summary.add(f"2026/12/03 12:00:{second} [error] 1#1: *1 {v.log}{_CONTEXT}")
    done = summary.finish()
    assert done["causes"]["tls_timeout"]["count"] == 3
    assert done["upstreams"] == {"127.0.0.1:4433": {"tls_timeout": 3}}


def test_reason_of_code_inverts_openssl_error_string():
    for name in ("TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING"):
        code = tls.openssl_error_string(name, "x").split(":")[1]
        assert tls.reason_of_code(code) == name
    assert tls.reason_of_code("02000000") is None and tls.reason_of_code("zz") is None


# -- why --reproduce: the situation built, the model and a real nginx -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind, kwargs", [
    ("timeout", {}),
    ("verify", {"verify_code": 21, "verify_message": "unable to verify the first certificate"}),
    ("ssl", {"reason": "TLSV1_ALERT_PROTOCOL_VERSION", "reason_text": "tlsv1 alert protocol version"}),
    ("ssl", {"reason": "WRONG_VERSION_NUMBER", "reason_text": "wrong version number"}),
    ("closed", {"err": 0}),
], ids=["timeout", "verify", "protocol_version", "wrong_version_number", "closed"])
def test_reproduce_tls_lines_with_the_model_and_a_real_nginx(kind, kwargs, no_fd_leak):
    from nbconn.nginx import runner, reproduce

    if runner.unavailable_reason():
        pytest.skip(runner.unavailable_reason())
    if tls._openssl() is None:
        pytest.skip("the SSL object of CPython's ssl module cannot be reached here (nginx's verify order)")
    answer = why.decode(tls.handshake_verdict(kind, **kwargs).log)
    rep = reproduce.reproduce(answer)
    assert rep["made"], rep
    assert rep["nginx"]["same"] and rep["model"]["same"], rep
    assert rep["nginx"]["line"] == rep["model"]["line"] == f"[{answer['expected_level']}] {answer['line']}"


def test_the_models_lines_after_the_handshake_are_decoded():
    """The model writes nginx's texts for a failed write or read on the SSL connection (upstream._send_failed,
    _recv_failed); nbconn why reads them back as such, not as 'outside the connect flow' (nginx review, pass 2)."""
    import errno as E

    from nbconn.nginx import upstream

    outcome, action, level, text = upstream._send_failed(OSError(E.EPIPE, "Broken pipe"), True)
    answer = why.decode(f"{text}, client: 127.0.0.1, server: , request: \"GET / HTTP/1.1\", "
                        "upstream: \"https://127.0.0.1:9/\", host: \"x\"")
    assert answer["cause"] == "ssl_write:EPIPE" and answer["expected_level"] == level == "error"
    assert answer["ngx_next"] == "NGX_HTTP_UPSTREAM_FT_ERROR" and answer["tries_another"]
    assert "already closed" in answer["kernel"]
    read = why.decode("SSL_read() failed (SSL: error:0A000126:SSL routines::unexpected eof while reading) while "
                      "reading response header from upstream")
    assert read["cause"] == "ssl_read" and read["expected_level"] in ("error", "crit")
    assert read["ngx_next"] == "NGX_HTTP_UPSTREAM_FT_ERROR"
    # the plain twin of the reset under TLS: the read handler's recv() before any handshake is possible too
    closed = why.decode("upstream prematurely closed connection while reading response header from upstream")
    assert "before the TLS handshake" in closed["detail"]


def test_set_session_failure_is_a_500_in_upstream_addr_and_cites_init_connection():
    answer = why.decode("SSL_set_session() failed while connecting to upstream")
    assert answer["step"] == why.STEP_TLS_SETUP  # before the handshake, under the connect's action
    assert answer["tries_another"] is False and answer["counts_against_max_fails"] is False
    assert "1709-1713" in answer["detail"] and "$upstream_addr" in answer["detail"]
    assert "another version is accepted" in answer["kernel"]
