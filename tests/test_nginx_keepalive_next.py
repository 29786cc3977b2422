"""A retried answer and the keepalive cache: a real nginx 1.22.1 next to nbconn.nginx.upstream's model.

nginx 1.22.1 frees the peer of an answer retried as http_500/502/503/504/429 with NGX_PEER_FAILED, and the keepalive
module saves no connection freed so (ngx_http_upstream_next, ngx_http_upstream.c lines 4292-4301;
ngx_http_upstream_free_keepalive_peer, ngx_http_upstream_keepalive_module.c lines 323-331).  A retried 403/404 is
freed with NGX_PEER_NEXT, but saved only when the proxy module set u->keepalive at its header -- a response without
a body (ngx_http_proxy_module.c lines 1991-2005); a retried answer's body is never read.  Both sides run against the
same keep-alive peers, and each peer's own record (which connection each request came on) is compared.
Skips with one line where nginx is missing."""

import contextlib
import time

import pytest

from nbconn.nginx import runner
from nbconn.nginx.httpd import HttpPeer
from nbconn.nginx.upstream import Upstream, run_requests

from .conftest import require_tool


@pytest.fixture(autouse=True)
def _need_nginx():
    if runner.unavailable_reason():
        require_tool("nginx")


def _journals(status, body, kind, requests=4):
    journal = []
    with contextlib.ExitStack() as stack:
        answering = stack.enter_context(HttpPeer(status=status, body=body, journal=journal))
        good = stack.enter_context(HttpPeer(journal=journal))
        specs = [f"{answering},max_fails=0", str(good)]
        names = {str(answering): "a", str(good): "b"}
        kinds = ("error", "timeout", kind)
        with runner.Nginx(specs, keepalive=4, next_upstream=kinds) as ng:
            statuses = [ng.request() for _ in range(requests)]
            time.sleep(0.05)
            connect_times = [e.connect_time for e in ng.access_log()]
        theirs = [names[s.peer] + ("R" if s.reused else "N") for s in journal]
        journal.clear()
        with Upstream(specs, keepalive=4) as up:
            reqs = run_requests(up, requests, next_upstream=kinds, timeout=1.0)
        ours = [names[s.peer] + ("R" if s.reused else "N") for s in journal]
        said = [names[a.peer] + ("R" if a.reused else "N") for r in reqs for a in r.attempts]
    return statuses, [r.result for r in reqs], theirs, ours, said, connect_times


@pytest.mark.parametrize("status, body, kind, answering_reused", [
    (502, b"", "http_502", False),  # NGX_PEER_FAILED: never cached
    (503, b"busy\n", "http_503", False),
    (404, b"nope\n", "http_404", False),  # NGX_PEER_NEXT, but the body is never read: u->keepalive 0
    (404, b"", "http_404", True),  # NGX_PEER_NEXT and no body: u->keepalive set at the header, cached
])
def test_a_retried_answer_is_cached_as_nginx_caches_it(status, body, kind, answering_reused):
    statuses, results, theirs, ours, said, connect_times = _journals(status, body, kind)
    assert statuses == ["200"] * 4 and results == ["200"] * 4, (statuses, results)
    # the peers' own record: the same connections, new or reused, request after request
    assert ours == theirs, f"nginx (as the peers saw it): {theirs}\nmodel: {ours}"
    assert said == ours, (said, ours)  # and the model's own account agrees with its peers'
    assert any(x.startswith("a") for x in theirs[2:]), theirs  # the answering peer was met again
    assert any(x == "aR" for x in theirs) is answering_reused, theirs
