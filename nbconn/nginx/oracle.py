"""The nginx oracle: random upstream configurations, run through a real nginx 1.22.1 and through the model.

:mod:`nbconn.nginx.upstream` claims to do what nginx's round robin and ``proxy_next_upstream`` do.  A list of
hand-picked cases checks what its authors thought of; this module checks what they did not.  From a seed it
draws configurations -- 1 to 4 servers of the lab's kinds, weights, ``max_fails`` 0-3, ``fail_timeout``,
``backup``, ``proxy_connect_timeout``, ``proxy_next_upstream`` (incl. ``off`` and ``http_502``), its tries and
timeout, ``keepalive`` (with it, half the 502 peers keep their connections), ``proxy_bind`` -- and a request schedule, sends the requests through a private nginx
(:class:`nbconn.nginx.runner.Nginx`) and through :func:`nbconn.nginx.upstream.run_request` against the *same* peers, and
compares them request by request:

* the status the client got;
* ``$upstream_addr`` -- the peers tried, as nginx writes the variable;
* the error-log lines of that request, level and message, in order (normalised: see :func:`normalise`);
* the connections each peer accepted during the request, as the peers count them: which tries were new
  connections and which reused a cached one (``keepalive``), something ``$upstream_addr`` does not tell.

The draws lean towards failing peers, so most requests walk two or more peers, and the gaps between requests
are whole seconds chosen to land before, on and after ``fail_timeout``'s edge.

Time.  nginx counts ``fail_timeout`` in ``ngx_time()`` seconds.  Each request is started just after a
second begins and is kept short (each configuration's worst walk stays well under a second), so all of
nginx's clock readings for it fall in one second, S.  The model then runs the same request with a clock that
reads S: the comparison does not depend on how long the model's own connects take.  A request that crossed
a second boundary all the same (a very loaded machine) ends the comparison of its configuration: the rest is
counted as not compared, never as agreement.

Nothing leaves the machine: every peer is on 127.0.0.1 or an AF_UNIX path; ``proxy_bind`` uses 198.18.0.5
(RFC 2544's benchmarking range, which this host lacks: bind() fails before any packet), 127.0.0.1 or ::1.

``python -m nbconn.nginx.oracle N [--seed S]`` (``./dev fuzz-nginx``) runs N configurations and prints every
disagreement with its seed and configuration.

``--tls`` draws ``proxy_pass https://`` configurations instead (:func:`draw_tls_config`): the lab's TLS peers
(good, silent after the TCP accept, untrusted certificate, TLS 1.2-only, hang-up after the ClientHello, a plain
HTTP server, a reset after the request) among refused, black-hole and missing-unix ones, ``proxy_ssl_verify on`` against a CA made for the
run, ``proxy_ssl_protocols`` nginx's default or TLSv1.3, session reuse on (nginx's default); the model runs
:func:`nbconn.nginx.upstream.run_request` with the matching :class:`nbconn.nginx.tls.TLSClient`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field

from .. import validate

#: The lab's kinds that nginx can reach on loopback, and how often a draw picks each.  Failing kinds
#: outweigh working ones so that most requests walk two or more peers.
KINDS = {
    "listening": 1.0,  # answers HTTP 200, then closes (lab.listening(http=True))
    "keepalive": 0.7,  # HTTP/1.1 200 and keeps the connection (nbconn.nginx.httpd.HttpPeer)
    "listening6": 0.4,  # as listening, on [::1]: proxy_bind of the other family fails (EINVAL / EAFNOSUPPORT)
    "refused": 3.5,  # nothing listens: RST -> "connect() failed (111: Connection refused)"
    "blackhole": 1.0,  # the SYN is dropped: "upstream timed out"
    "reset": 2.0,  # accepts, then RST: recv()/writev() failed (104)
    "http502": 3.0,  # answers "502 Bad Gateway" and closes: proxy_next_upstream http_502
    "unix_listening": 1.0,  # AF_UNIX, accepts and closes: "upstream prematurely closed connection"
    "unix_missing": 1.5,  # AF_UNIX path nobody made: "connect() to unix:... failed (2: ...)"
}
NEXT_UPSTREAM_DRAWS = [(("error", "timeout"), 2.5), (("error", "timeout", "http_502"), 6), (("error",), 0.7),
                       (("timeout",), 0.3), ((), 0.5), (("error", "http_502", "http_503"), 1.5)]
#: a kind drawn only with keepalive, in place of half the "http502" peers (see draw_config): HTTP/1.1 502 with
#: Content-Length: 0 and the connection kept (nbconn.nginx.httpd.HttpPeer(status=502, body=b""))
KEEPALIVE_502 = "http502_keepalive"
#: the kinds of a ``proxy_pass https://`` draw (draw_tls_config): the lab's TLS peers and three that fail the
#: connect before any TLS (refused, black hole, a missing unix path)
TLS_KINDS = {
    "tls_good": 1.2,  # handshakes, answers 200 (tlspeers.tls_server(http=True))
    "tls12": 0.8,  # TLS 1.2 at most: fails under proxy_ssl_protocols TLSv1.3 (protocol_version alert), else good
    "tls_untrusted": 1.5,  # a certificate from a CA nginx does not trust: "upstream SSL certificate verify error"
    "tls_silent": 0.8,  # accepts TCP, never answers the ClientHello: the connect's timer ends the handshake
    "tls_hangup": 1.0,  # reads the ClientHello, closes: "peer closed connection in SSL handshake"
    "tls_plaintext": 1.0,  # a plain HTTP server: "SSL_do_handshake() failed (SSL: ... wrong version number)"
    "tls_reset": 0.8,  # handshakes, reads the request, resets: "upstream prematurely closed connection" (over TLS)
    "refused": 1.2, "blackhole": 0.4, "unix_missing": 0.6,
}
UNREACHABLE_ADDRESS = "198.18.0.5"  # RFC 2544 benchmarking range: not on this host, never contacted
UPSTREAM_NAME = "backend"  # nbconn.nginx.runner's upstream block
MAX_CONFIGS = 1000


@dataclass
class Config:
    """One drawn configuration: the servers (kind + server-line parameters), the proxy settings, the schedule."""

    seed: int
    index: int
    servers: list  # [(kind, {"weight": .., "max_fails": .., "fail_timeout": .., "backup": .., "down": ..})]
    connect_timeout: float
    next_upstream: tuple
    tries: int
    next_upstream_timeout: float
    keepalive: int
    proxy_bind: str | None
    gaps: list  # whole seconds to wait before each request (0: same second if it fits)
    worker_connections: int = 64  # nbconn.nginx.runner's default; 4 or 5 with keepalive: "not enough"
    workers: int = 1  # 2 only with `zone` (one round-robin state for both) and no keepalive (a cache per worker)
    tls: str | None = None  # None: proxy_pass http://; else proxy_pass https:// with these proxy_ssl_protocols
    #                         ("" for nginx's default)

    def describe(self) -> str:
        servers = "; ".join(f"{kind} " + " ".join(f"{k}={v}" for k, v in params.items()
                                                      if v is not False and v is not None)
                            for kind, params in self.servers)
        return (f"seed={self.seed} config={self.index}: servers [{servers}] connect_timeout={self.connect_timeout} "
                f"next_upstream={' '.join(self.next_upstream) or 'off'} tries={self.tries} "
                f"next_upstream_timeout={self.next_upstream_timeout} keepalive={self.keepalive} "
                f"proxy_bind={self.proxy_bind} worker_connections={self.worker_connections} "
                f"workers={self.workers}{' zone' if self.workers > 1 else ''} gaps={self.gaps}"
                + ("" if self.tls is None else f" https proxy_ssl_protocols={self.tls or 'default'}"))


def _pick(rng: random.Random, weighted) -> object:
    items = list(weighted.items()) if isinstance(weighted, dict) else list(weighted)
    return rng.choices([k for k, _ in items], weights=[w for _, w in items])[0]


def draw_config(seed: int, index: int) -> Config:
    """Configuration ``index`` of ``seed``: the same numbers give the same configuration on every machine."""
    rng = random.Random(f"nbconn-oracle-{seed}-{index}")
    servers = []
    for i in range(_pick(rng, {1: 0.3, 2: 2, 3: 3, 4: 4})):
        kind = _pick(rng, KINDS)
        # max_fails=0 more often than not: a failing peer never disabled is walked through by every request
        servers.append((kind, {"weight": rng.choice([1, 1, 1, 2, 3]), "max_fails": rng.choice([0, 0, 0, 0, 1, 2, 3]),
                               "fail_timeout": rng.choice([1, 1, 2, 2, 10]),
                               "backup": i > 0 and rng.random() < 0.15, "down": rng.random() < 0.04}))
    if len([s for s in servers if s[0] == "blackhole"]) > 2:  # keep the worst walk well under a second
        servers = [("refused", p) if k == "blackhole" else (k, p) for k, p in servers]
    connect_timeout = rng.choice([0.1, 0.15, 0.2])
    nut = 0.0
    if rng.random() < 0.25:  # halfway between two connect timeouts: never on a timer's edge
        nut = round(connect_timeout * rng.choice([1, 2]) + connect_timeout / 2, 3)
    requests = rng.randint(4, 8)
    gaps = [0] + [_pick(rng, {0: 0.55, 1: 0.2, 2: 0.15, 3: 0.1}) for _ in range(requests - 1)]
    keepalive = rng.choice([0, 0, 0, 1, 2])
    # a tight pool: the worker's listening socket, channel and client connection take 3, the cache up to keepalive
    worker_connections = rng.choice([4, 5]) if keepalive and rng.random() < 0.3 else 64
    config = Config(seed, index, servers, connect_timeout, _pick(rng, NEXT_UPSTREAM_DRAWS),
                    _pick(rng, {0: 6, 1: 0.3, 2: 1, 3: 1}), nut, keepalive,
                    _pick(rng, {None: 0.83, UNREACHABLE_ADDRESS: 0.05, "127.0.0.1": 0.09, "::1": 0.03}), gaps,
                    worker_connections)
    # two workers sharing the peers' state through `zone`: the model's one state must still be nginx's
    # (drawn last, so that adding it left every earlier draw of a seed as it was)
    config.workers = 2 if not keepalive and rng.random() < 0.2 else 1
    # with keepalive, half the 502 peers keep their connections (HTTP/1.1 502, Content-Length: 0): a retried
    # answer's connection must not be cached (NGX_PEER_FAILED), a peer that closes after each answer cannot show
    # it.  Drawn after everything else, so every earlier draw of a seed stays as it was.
    if keepalive:
        config.servers = [(KEEPALIVE_502 if kind == "http502" and rng.random() < 0.5 else kind, params)
                          for kind, params in config.servers]
    return config


def draw_tls_config(seed: int, index: int) -> Config:
    """Configuration ``index`` of ``seed`` for ``proxy_pass https://``: servers of :data:`TLS_KINDS`, the same
    server-line, next-upstream and schedule draws as :func:`draw_config`, no keepalive or proxy_bind, and
    ``proxy_ssl_protocols`` nginx's default (TLS 1.2 at most) or TLSv1.3."""
    rng = random.Random(f"nbconn-oracle-tls-{seed}-{index}")
    servers = []
    for i in range(_pick(rng, {1: 0.3, 2: 2, 3: 3, 4: 4})):
        servers.append((_pick(rng, TLS_KINDS), {"weight": rng.choice([1, 1, 1, 2, 3]),
                                                "max_fails": rng.choice([0, 0, 0, 1, 1, 2, 3]),
                                                "fail_timeout": rng.choice([1, 1, 2, 2, 10]),
                                                "backup": i > 0 and rng.random() < 0.15,
                                                "down": rng.random() < 0.04}))
    # each try on a silent or black-hole peer costs the connect timeout: keep the worst walk well under a second
    slow = [i for i, (kind, _) in enumerate(servers) if kind in ("tls_silent", "blackhole")]
    for i in slow[2:]:
        servers[i] = ("refused", servers[i][1])
    connect_timeout = rng.choice([0.1, 0.15, 0.2])
    nut = 0.0
    if rng.random() < 0.25:
        nut = round(connect_timeout * rng.choice([1, 2]) + connect_timeout / 2, 3)
    requests = rng.randint(4, 8)
    gaps = [0] + [_pick(rng, {0: 0.55, 1: 0.2, 2: 0.15, 3: 0.1}) for _ in range(requests - 1)]
    return Config(seed, index, servers, connect_timeout, _pick(rng, NEXT_UPSTREAM_DRAWS),
                  _pick(rng, {0: 6, 1: 0.3, 2: 1, 3: 1}), nut, 0, None, gaps,
                  tls=_pick(rng, {"": 0.65, "TLSv1.3": 0.35}))


def https_nginx(specs: list, *, cafile: str, protocols: str = "", session_reuse: bool = True, **settings):
    """:class:`nbconn.nginx.runner.Nginx` with ``proxy_pass https://backend``, ``proxy_ssl_verify on`` against ``cafile``,
    ``proxy_ssl_name localhost`` (the lab certificates' name), ``proxy_ssl_protocols`` when given,
    ``proxy_ssl_session_reuse off`` when ``session_reuse`` is False, and nginx 1.22.1's defaults for the rest
    (``proxy_ssl_session_reuse on``, no SNI).  The one place nbconn writes an https upstream's configuration
    (the oracle, notebook 15, the tests)."""
    from .runner import Nginx, config_value

    if protocols not in ("", "TLSv1.2", "TLSv1.3"):
        raise ValueError(f"protocols {validate.shown(protocols)} must be '', 'TLSv1.2' or 'TLSv1.3'")
    cafile = config_value("cafile", cafile)
    session_reuse = validate.flag("session_reuse", session_reuse)

    class HTTPSNginx(Nginx):
        def config(self) -> str:
            text = super().config()
            plain = "proxy_pass http://backend;"
            if text.count(plain) != 1:
                raise RuntimeError("nbconn.nginx.runner's configuration no longer has one 'proxy_pass http://backend;'")
            https = ("proxy_pass https://backend;\n"
                     "            proxy_ssl_verify on;\n"
                     f"            proxy_ssl_trusted_certificate {cafile};\n"
                     "            proxy_ssl_name localhost;"
                     + (f"\n            proxy_ssl_protocols {protocols};" if protocols else "")
                     + ("" if session_reuse else "\n            proxy_ssl_session_reuse off;"))
            return text.replace(plain, https)

    return HTTPSNginx(specs, **settings)


def tls_client(cafile: str, protocols: str = ""):
    """The :class:`nbconn.nginx.tls.TLSClient` that :func:`https_nginx`'s settings make: verify against ``cafile``,
    the name localhost, session reuse on, TLS 1.3 only under ``protocols="TLSv1.3"``."""
    from .tls import TLSClient

    version = {"": None, "TLSv1.2": "1.2", "TLSv1.3": "1.3"}[protocols]
    return TLSClient(cafile=cafile, server_name="localhost", reuse=True, tls_version=version)


# -- peers -------------------------------------------------------------------------------------------------

def _answer_status(status: int, conn: socket.socket) -> None:
    """Read one request, answer it with ``status`` and an empty body, close."""
    try:
        conn.settimeout(2.0)
        data = b""
        while True:
            if b"\r\n\r\n" in data or len(data) >= 65536:
                break
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"HTTP/1.1 %d Oracle\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)
    except OSError:
        pass
    finally:
        conn.close()


@contextlib.contextmanager
def status_peer(status: int = 502):
    """A loopback HTTP peer that answers every request with ``status`` (for proxy_next_upstream http_502)."""
    from ..lab import peers

    status = validate.integer("status", status, 100, 599)
    with peers._listener("127.0.0.1", 4096) as sock:
        target, port = peers._target_for(sock)
        peer = peers.Peer(target, f"http{status}", port=port)
        with peers._Acceptor(sock, peer, functools.partial(_answer_status, status)):
            yield peer


@contextlib.contextmanager
def _reachable_by_worker(peer):
    """As root nginx's worker runs as nobody: let it pass through an AF_UNIX peer's private directory and
    connect to the socket, as the model (running as root) can.  Without this nginx would log EACCES where the
    model sees the peer's real state -- a difference of the harness, not of the model."""
    path = getattr(peer, "path", None)
    if os.geteuid() == 0 and path:
        os.chmod(os.path.dirname(path), 0o711)
        if os.path.exists(path):
            os.chmod(path, 0o666)
    yield peer


@contextlib.contextmanager
def _peer(kind: str, pki=None):
    from .. import lab
    from .httpd import HttpPeer
    from ..lab import tlspeers

    makers = {"tls_good": lambda: tlspeers.tls_server(pki=pki, http=True),
              "tls12": lambda: tlspeers.tls12_only(pki=pki, http=True),
              "tls_untrusted": lambda: tlspeers.tls_untrusted(pki=pki, http=True),
              "tls_silent": lambda: tlspeers.tls_silent(pki=pki),
              "tls_hangup": tlspeers.tls_hangup, "tls_plaintext": tlspeers.tls_plaintext,
              "tls_reset": lambda: tlspeers.tls_server(pki=pki, reset=True),"listening": lambda: lab.listening(http=True), "listening6": lambda: lab.listening("::1", http=True),
              "keepalive": HttpPeer, "refused": lab.refused,
              "blackhole": lab.blackhole, "reset": lab.reset, "http502": lambda: status_peer(502),
              "http502_keepalive": lambda: HttpPeer(status=502, body=b""),
              "unix_listening": lab.unix_listening, "unix_missing": lab.unix_missing}
    with makers[kind]() as peer, _reachable_by_worker(peer):
        yield peer


def _accepted(peers: list) -> tuple:
    """How many connections each peer has accepted so far (a peer that accepts nothing: 0).  Every peer counts
    a connection before it answers, resets or closes it, so a request's count is settled when its answer is."""
    return tuple(p.connections if hasattr(p, "connections") else getattr(p, "accepted", 0) for p in peers)


def _spec(address: str, params: dict) -> str:
    spec = f"{address},weight={params['weight']},max_fails={params['max_fails']},fail_timeout={params['fail_timeout']}"
    return spec + (",backup" if params["backup"] else "") + (",down" if params["down"] else "")


# -- what each side did ---------------------------------------------------------------------------------

@dataclass
class Seen:
    """One request as one side saw it."""

    status: str
    upstream_addr: str
    log: list  # "[level] message", normalised
    # connections each peer accepted during this request (in the configuration's order): a cached connection
    # reused makes none, so this tells what $upstream_addr cannot -- which tries were new connections
    opened: tuple = ()

    def key(self) -> tuple:
        return self.status, self.upstream_addr, tuple(self.log), self.opened

    def peers_tried(self) -> int:
        """Peers this request connected to (or tried to): $upstream_addr's entries, "backend" and the peerless
        " : " of a failure before connect() not counted."""
        return sum(1 for name in re.split(r", | : ", self.upstream_addr) if name and name != UPSTREAM_NAME)


_RESET_FAMILY = re.compile(r"^\[error\] (?:connect\(\) failed \(104: [^)]*\)|recv\(\) failed \((?:104|32): [^)]*\)|"
                           r"writev\(\) failed \((?:104|32): [^)]*\)|upstream prematurely closed connection) "
                           r"while .*$")
_WARN = "[warn] upstream server temporarily disabled while "


def normalise(lines: list) -> list:
    """Error-log lines with the one race both sides share made equal: a peer that accepts and then resets (or
    closes) is seen by connect(), writev() or recv() -- whichever runs when the RST lands, on nginx's side and
    on the model's alike.  Each of those lines becomes "[error] (reset or close)", and the [warn] that follows
    it loses its action (" while <log->action>").  Everything else is compared as written."""
    out, after_reset = [], False
    for line in lines:
        if _RESET_FAMILY.match(line):
            out.append("[error] (reset or close)")
            after_reset = True
            continue
        if after_reset and line.startswith(_WARN):
            line = _WARN + "*"
        after_reset = False
        out.append(line)
    return out


_ERROR_LINE = re.compile(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*)?$")


def _new_error_lines(path: str, offset: int) -> tuple:
    """Lines at warn level and above written since ``offset``, as "[level] message"; and the new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = []
    for raw in data[:end].decode(errors="replace").splitlines():
        m = _ERROR_LINE.match(raw)
        if m and m.group(1) in ("warn", "error", "crit", "alert", "emerg"):
            lines.append(f"[{m.group(1)}] {m.group(2)}")
    return lines, offset + end


def _wait_until(predicate, seconds: float) -> bool:
    """The one polling helper: True once ``predicate()`` holds, False after ``seconds`` (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _access_lines(path: str) -> list:
    with open(path) as f:
        return f.read().splitlines()


def _start_in_second(gap: int, last_second: int | None, worst_s: float) -> None:
    """Sleep so that the request starts ``gap`` whole seconds after ``last_second`` (0: the same second when the
    walk still fits), just after the second begins."""
    now = time.time()
    target = (last_second + gap) if last_second is not None else int(now)
    if gap == 0 and now - int(now) + worst_s < 0.9 and int(now) >= target:
        return
    if int(now) >= target:
        target = int(now) + 1
    time.sleep(max(0.0, target + 0.02 - now))


@dataclass
class Outcome:
    """A configuration's comparison."""

    config: Config
    nginx: list = field(default_factory=list)  # Seen per request
    model: list = field(default_factory=list)
    compared: int = 0  # requests compared (a request that crossed a second boundary ends the comparison)
    skipped_reason: str | None = None

    @property
    def disagreements(self) -> list:
        return [(i, n, m) for i, (n, m) in enumerate(zip(self.nginx[:self.compared], self.model[:self.compared]), 1)
                if n.key() != m.key()]


def run_config(config: Config) -> Outcome:
    """Run one configuration through nginx, then through the model, on the same peers."""
    from .runner import Nginx
    from .upstream import Upstream, run_request

    outcome = Outcome(config)
    holes = sum(kind in ("blackhole", "tls_silent") for kind, _ in config.servers)
    worst_s = holes * config.connect_timeout + 0.15
    with contextlib.ExitStack() as stack:
        pki = None
        if config.tls is not None:
            from ..lab import tlspeers

            pki = stack.enter_context(tlspeers.test_pki())
        peers = [stack.enter_context(_peer(kind, pki)) for kind, _ in config.servers]
        addresses = [str(p) for p in peers]
        specs = [_spec(a, p) for a, (_, p) in zip(addresses, config.servers)]
        settings = dict(connect_timeout=config.connect_timeout, next_upstream=config.next_upstream,
                        tries=config.tries, next_upstream_timeout=config.next_upstream_timeout,
                        keepalive=config.keepalive, proxy_bind=config.proxy_bind, read_timeout=2.0,
                        worker_connections=config.worker_connections, workers=config.workers,
                        zone=config.workers > 1)
        seconds = []
        client = None
        if config.tls is not None:
            client = tls_client(pki.cafile, config.tls)
            proxy = https_nginx(specs, cafile=pki.cafile, protocols=config.tls, **settings)
        else:
            proxy = Nginx(specs, **settings)
        with proxy as ng:
            access = os.path.join(ng.prefix, "access.log")
            errors = os.path.join(ng.prefix, "error.log")
            offset = os.path.getsize(errors)
            last = None
            for i, gap in enumerate(config.gaps, 1):
                _start_in_second(gap, last, worst_s)
                start = int(time.time())
                before = _accepted(peers)
                try:
                    # nginx's worst walk: 4 peers x (connect + proxy_read_timeout 2 s), or once proxy_send_timeout's
                    # 60 s (the stale-event corner in nbconn.nginx.upstream.run_request); far more is a hang
                    status = ng.request(timeout_s=75.0)
                except OSError as exc:
                    if outcome.skipped_reason is None:
                        lines, offset = _new_error_lines(errors, offset)
                        outcome.skipped_reason = (f"request {i}: no answer from nginx ({exc.__class__.__name__}: "
                                                  f"{exc}); its error log: {lines}")
                        outcome.compared = i - 1
                    break
                end = int(time.time())
                if not _wait_until(lambda: len(_access_lines(access)) >= i, 5.0):
                    raise RuntimeError(f"nginx wrote no access-log line for request {i} within 5 s")
                lines, offset = _new_error_lines(errors, offset)
                fields = _access_lines(access)[i - 1].split("|")
                opened = tuple(a - b for a, b in zip(_accepted(peers), before))
                outcome.nginx.append(Seen(status, fields[1], normalise(lines), opened))
                # a request may take proxy_send_timeout's 60 s (the stale-event corner of nbconn.nginx.upstream): the
                # model counts those seconds inside the request as nginx waited them, so only other crossings
                # make the comparison unsure
                stale_wait = any("while sending request to upstream" in line and "timed out" in line
                                 for line in lines)
                if end != start and not stale_wait and outcome.skipped_reason is None:
                    outcome.skipped_reason = f"request {i} crossed a second boundary ({start} -> {end})"
                    outcome.compared = i - 1
                # (last in the body, after the if: tests/test_interrupt_coverage.py says why)
                seconds.append(start)
                last = start
        if outcome.skipped_reason is None:
            outcome.compared = len(config.gaps)
        if not seconds:
            return outcome
        now = [0]
        with Upstream(specs, clock=lambda: now[0], msec_clock=time.monotonic, keepalive=config.keepalive,
                      name=UPSTREAM_NAME, worker_connections=config.worker_connections) as up:
            for second in seconds:
                now[0] = second
                # the recorded second already holds whatever nginx waited: the model's counted-not-waited
                # seconds (the stale-event corner) start again from zero for each request
                up.unwaited_s = 0.0
                before = _accepted(peers)
                req = run_request(up, timeout=config.connect_timeout, next_upstream=config.next_upstream,
                                  tries=config.tries, next_upstream_timeout=config.next_upstream_timeout,
                                  http=True, read_timeout=2.0, proxy_bind=config.proxy_bind, tls=client)
                opened = tuple(a - b for a, b in zip(_accepted(peers), before))
                outcome.model.append(Seen(req.result or "?", req.upstream_addr, normalise(req.log), opened))
    return outcome


@dataclass
class Summary:
    seed: int
    configs: int = 0
    requests: int = 0
    compared: int = 0
    disagreeing: int = 0
    walked: int = 0  # requests in which nginx tried two or more peers
    cut_short: int = 0  # configurations whose comparison ended early (see Outcome.skipped_reason)
    outcomes: list = field(default_factory=list)

    def line(self) -> str:
        return (f"seed {self.seed}: {self.configs} configurations, {self.requests} requests ({self.walked} walked "
                f"2+ peers), {self.compared} compared, {self.compared - self.disagreeing} agree, "
                f"{self.disagreeing} disagree; {self.cut_short} configurations cut short")


def run(count: int, seed: int = 1, *, first: int = 0, report=None, tls: bool = False) -> Summary:
    """Configurations ``first`` .. ``first + count - 1`` of ``seed``; ``report(outcome)`` after each.
    ``tls``: draw ``proxy_pass https://`` configurations (:func:`draw_tls_config`)."""
    count = validate.integer("count", count, 1, MAX_CONFIGS)
    seed = validate.integer("seed", seed, 0, 2**31)
    first = validate.integer("first", first, 0, 2**31)
    draw = draw_tls_config if validate.flag("tls", tls) else draw_config
    summary = Summary(seed)
    for index in range(first, first + count):
        outcome = run_config(draw(seed, index))
        summary.configs += 1
        summary.requests += len(outcome.nginx)
        summary.compared += outcome.compared
        summary.cut_short += outcome.skipped_reason is not None
        summary.disagreeing += len(outcome.disagreements)
        summary.walked += sum(1 for seen in outcome.nginx if seen.peers_tried() >= 2)
        summary.outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return summary


def format_disagreement(outcome: Outcome) -> str:
    lines = [outcome.config.describe()]
    for i, n, m in outcome.disagreements:
        lines.append(f"  request {i}:")
        lines.append(f"    nginx: {n.status} [{n.upstream_addr}] {n.log} new connections {n.opened}")
        lines.append(f"    model: {m.status} [{m.upstream_addr}] {m.log} new connections {m.opened}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    """``python -m nbconn.nginx.oracle N [--seed S] [--first I]``: exit 0 when every compared request agrees, 1 if not,
    2 for bad input (one line, before any peer or nginx exists)."""
    import argparse
    import sys

    from .runner import unavailable_reason

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2 (argparse would print the usage too)
            raise ValueError(message)

    parser = Parser(prog="fuzz-nginx", description="Compare nbconn.nginx.upstream with a real nginx over N random "
                    "upstream configurations.")
    parser.add_argument("count", metavar="N")
    parser.add_argument("--seed", default="1", metavar="S")
    parser.add_argument("--first", default="0", metavar="I", help="start at configuration I of the seed")
    parser.add_argument("--verbose", action="store_true", help="print every configuration, not only disagreements")
    parser.add_argument("--tls", action="store_true", help="proxy_pass https:// configurations (the lab's TLS peers)")

    def whole(name: str, text: str, low: int, high: int) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 12 and low <= int(text) <= high):
            raise ValueError(f"{name} {validate.shown(text)} must be a whole number in {low}..{high}")
        return int(text)

    try:
        args = parser.parse_args(argv)
        count = whole("N", args.count, 1, MAX_CONFIGS)
        seed = whole("--seed", args.seed, 0, 2**31)
        first = whole("--first", args.first, 0, 2**31)
    except ValueError as exc:
        print(f"fuzz-nginx: error: {exc}", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason:
        print(f"fuzz-nginx: error: {reason}", file=sys.stderr)
        return 2
    import signal

    def stop(signum, frame):  # SIGTERM: unwind, so every peer, nginx and temporary directory is cleaned up
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)

    def report(outcome: Outcome) -> None:
        if outcome.disagreements:
            print(format_disagreement(outcome), flush=True)
        elif args.verbose:
            print(f"agree ({outcome.compared} requests): {outcome.config.describe()}", flush=True)
            for i, seen in enumerate(outcome.nginx, 1):
                print(f"    {i}: {seen.status} [{seen.upstream_addr}] {seen.log}", flush=True)
        if outcome.skipped_reason:
            print(f"  not compared after: {outcome.skipped_reason}", flush=True)

    summary = run(count, seed, first=first, report=report, tls=args.tls)
    print(summary.line())
    return 1 if summary.disagreeing else 0


if __name__ == "__main__":
    raise SystemExit(main())
