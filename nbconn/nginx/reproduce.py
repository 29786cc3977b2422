"""Make a decoded error-log line happen again: the lab's peers, nbconn's upstream model and a real nginx.

``why --reproduce`` hands each line decoded by :mod:`nbconn.nginx.why` to :func:`reproduce`,
which builds the situation behind its cause with :mod:`nbconn.lab.peers` (loopback
and AF_UNIX only), sends the same requests through :mod:`nbconn.nginx.upstream` (real
connects, nginx's rules) and through a private nginx 1.22.1 (:class:`nbconn.nginx.runner.Nginx`,
the HTTP proxy module), and returns the line each wrote next to the given one.
"Same" means the produced line decodes to the same cause (addresses differ).

Causes that need what loopback cannot give -- no route, an ``unreachable`` route, a
narrowed port range, the kernel's SYN give-up -- are built in a lab namespace
(:mod:`nbconn.lab.namespace`), and both run in there: the model's sockets are made
inside (``ns.using()``) and nginx runs inside (``Nginx(..., netns=ns)``), so its
connects meet the namespace's routes and sysctls.  An ICMP error from a router needs
a router the lab does not have: those lines are not made, and the answer says why.
The TLS handshake's lines (``proxy_pass https://``) are made with :mod:`nbconn.lab.tlspeers` and a CA made for
the run: nginx with :func:`nbconn.nginx.oracle.https_nginx`, the model with the matching ``TLSClient``.
Everything started (peers, namespaces, nginx and its prefix) is closed on every path.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

from . import why

#: the connect timer both run with where the situation waits for it (proxy_connect_timeout)
CONNECT_TIMEOUT_S = 0.3

class _Setup:
    """What a situation hands over: the upstream's server addresses, how many requests to send, and for a
    situation inside a lab namespace, the namespace (the model's sockets and nginx are made there);
    ``timeout``: proxy_connect_timeout for both; ``ready``: a context manager entered after nginx has started
    and before either runs (what would stop nginx from starting, e.g. a port range with no port left for its
    listener, is done there)."""

    def __init__(self, targets: list, requests: int, *, namespace=None, timeout: float = CONNECT_TIMEOUT_S,
                 ready=None, pki=None, protocols: str = "") -> None:
        self.targets, self.requests, self.namespace = targets, requests, namespace
        self.timeout, self.ready = timeout, ready
        # proxy_pass https:// when ``pki`` is given (nbconn.lab.tlspeers.test_pki): verify against its CA,
        # proxy_ssl_protocols ``protocols`` ("" nginx's default, or "TLSv1.3")
        self.pki, self.protocols = pki, protocols


def open_to_worker(path: str, mode: int = 0o777) -> None:
    """As root nginx's worker runs as 'nobody': let it through the peer's private directory to the socket."""
    os.chmod(os.path.dirname(path), 0o711)
    if os.path.exists(path):
        os.chmod(path, mode)


@contextlib.contextmanager
def _refused():
    from ..lab import peers

    with peers.refused() as p:
        yield _Setup([str(p)], 1)


@contextlib.contextmanager
def _two_refused():
    from ..lab import peers

    with peers.refused() as a, peers.refused() as b:
        yield _Setup([str(a), str(b)], 2)  # the first request disables both (max_fails=1); the second finds none


@contextlib.contextmanager
def _blackhole():
    from ..lab import peers

    with peers.blackhole() as p:
        yield _Setup([str(p)], 1)


@contextlib.contextmanager
def _acceptor(handle):
    """A loopback listener whose thread accepts and calls ``handle(conn)``; the connections it keeps are closed
    at the end.  Bounded: at most 64 connections, a stop flag looked at every 50 ms."""
    import select
    import threading

    held: list = []
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)

        def serve() -> None:
            while not stop.is_set() and len(held) < 64:
                if not select.select([listener], [], [], 0.05)[0]:
                    continue
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                held.append(conn)
                try:
                    handle(conn)
                except OSError:
                    pass

        thread = threading.Thread(target=serve, name="nbconn-why-peer", daemon=True)
        thread.start()
        try:
            yield _Setup([f"127.0.0.1:{listener.getsockname()[1]}"], 1)
        finally:
            stop.set()
            thread.join(timeout=5)
            for conn in held:
                conn.close()


def _half_close(conn: socket.socket) -> None:
    # FIN at once, the socket kept: not lab.peers.listening's close(), which sends RST instead of FIN when the
    # request is already in its receive queue (net/ipv4/tcp.c __tcp_close: unread data -> reset), racing with
    # the request's arrival; half-closing makes end of file the only answer
    conn.shutdown(socket.SHUT_WR)


def _reset_after_request(conn: socket.socket) -> None:
    # wait for the request, then close with SO_LINGER {1, 0}: RST.  lab.peers.reset resets right after accept,
    # which races with the client's SO_ERROR read (the line is then "connect() failed (104: ...)")
    import struct

    conn.settimeout(2.0)
    try:
        conn.recv(65536)
    except OSError:
        pass
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _closes():
    return _acceptor(_half_close)


def _reset():
    return _acceptor(_reset_after_request)


@contextlib.contextmanager
def _unix_full():
    from ..lab import peers

    with peers.unix_full() as p:
        open_to_worker(p.path)
        yield _Setup([str(p)], 1)


@contextlib.contextmanager
def _unix_missing():
    from ..lab import peers

    with peers.unix_missing() as p:
        open_to_worker(p.path)
        yield _Setup([str(p)], 1)


@contextlib.contextmanager
def _unix_stale():
    """A socket file nobody listens on: bound, never listen()ed (what a backend that died leaves behind)."""
    where = tempfile.mkdtemp(prefix="nbconn-")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            path = os.path.join(where, "stale.sock")
            sock.bind(path)
            open_to_worker(path)
            yield _Setup([f"unix:{path}"], 1)
    finally:
        import shutil

        shutil.rmtree(where, ignore_errors=True)


@contextlib.contextmanager
def _unix_forbidden():
    """A listening unix socket whose file mode refuses writers: the worker meets EACCES."""
    from ..lab import peers

    with peers.unix_listening() as p:
        open_to_worker(p.path, 0o000 if os.geteuid() != 0 else 0o700)
        yield _Setup([str(p)], 1)


# -- situations inside a lab namespace: the model and nginx both in there (rootless too) -----------------------

@contextlib.contextmanager
def _lab(**kwargs):
    from ..lab import namespace, namespace_unavailable_reason

    reason = namespace_unavailable_reason()
    if reason:
        raise _CannotHere(f"needs a lab namespace: {reason}")
    with namespace(**kwargs) as ns:
        yield ns


class _CannotHere(Exception):
    pass


@contextlib.contextmanager
def _no_route():
    with _lab() as ns:  # a fresh namespace has only lo: no route to 198.18.0.0/15 (the lab's own range)
        yield _Setup(["198.18.0.1:80"], 1, namespace=ns)


@contextlib.contextmanager
def _unreachable_route():
    with _lab(routes=["unreachable 198.18.0.0/15"]) as ns:
        yield _Setup(["198.18.0.1:80"], 1, namespace=ns)


@contextlib.contextmanager
def _no_local_port():
    """ip_local_port_range narrowed to two ports, both held by kept connections to the listener: the next
    connect to it finds no free local port (notebook 04).  The range is narrowed only once nginx listens
    (``ready``): its listener's bind() to port 0 would find none left either.  A connect to another address
    (the client's to nginx) may still share a held port: the kernel's check is on the four-tuple
    (net/ipv4/inet_hashtables.c __inet_hash_connect)."""
    from ..api import connect

    with _lab() as ns, ns.listening() as target:
        @contextlib.contextmanager
        def ready():
            ns.set_sysctl("net.ipv4.ip_local_port_range", "40000 40001")
            held = []
            try:
                with ns.using():
                    for _ in range(2):
                        held.append(connect(target, keep=True, timeout=2.0))
                yield
            finally:
                for r in held:
                    r.close()

        yield _Setup([str(target)], 1, namespace=ns, ready=ready)


@contextlib.contextmanager
def _syn_give_up():
    """tcp_syn_retries=1 inside the namespace and a listener that drops SYNs: the kernel gives up after the
    first resend (~3 s, notebook 06) while the connect timer is longer."""
    with _lab(sysctls={"net.ipv4.tcp_syn_retries": "1"}) as ns, ns.blackhole() as target:
        yield _Setup([str(target)], 1, namespace=ns, timeout=10.0)


# -- the TLS handshake (proxy_pass https://) ------------------------------------------------------------------

@contextlib.contextmanager
def _tls(peer: str, protocols: str = ""):
    """A CA made for the run and one of nbconn.lab.tlspeers' peers; nginx and the model verify against the CA."""
    from ..lab import tlspeers

    makers = {"silent": lambda pki: tlspeers.tls_silent(pki=pki),
              "untrusted": lambda pki: tlspeers.tls_untrusted(pki=pki, http=True),
              "tls12": lambda pki: tlspeers.tls12_only(pki=pki, http=True),
              "hangup": lambda pki: tlspeers.tls_hangup(), "plaintext": lambda pki: tlspeers.tls_plaintext()}
    with tlspeers.test_pki() as pki, makers[peer](pki) as p:
        yield _Setup([str(p)], 1, pki=pki, protocols=protocols)


_NEEDS_LINK = "needs the impaired link with a router answering ICMP (%s); nbconn's lab has no such router yet"

#: cause -> (what is built, how, http exchange needed)
SITUATIONS = {
    "so_error:ECONNREFUSED": ("a loopback port bound but not listening: RST", _refused, False),
    "connect:ECONNREFUSED": ("a unix socket file nobody listens on", _unix_stale, False),
    "connect:EAGAIN": ("a unix socket whose backlog is full", _unix_full, False),
    "connect:ENOENT": ("a unix socket path nobody created", _unix_missing, False),
    "connect:EACCES": ("a unix socket the worker may not write to", _unix_forbidden, False),
    "timeout": ("a loopback listener whose accept queue is full: SYNs dropped, the timer ends it", _blackhole,
                False),
    "no_live": ("two refused peers (max_fails=1), two requests: the second finds none", _two_refused, False),
    "disabled": ("two refused peers (max_fails=1): each failure disables one", _two_refused, False),
    "recv:ECONNRESET": ("a peer that accepts, reads the request, then resets (SO_LINGER {1, 0})", _reset, True),
    "closed": ("a peer that accepts and at once half-closes (FIN, no response)", _closes, True),
    "connect:ENETUNREACH": ("a lab namespace with no route to 198.18.0.1", _no_route, False),
    "connect:EHOSTUNREACH": ("a lab namespace with `ip route add unreachable 198.18.0.0/15`", _unreachable_route,
                             False),
    "connect:EADDRNOTAVAIL": ("a lab namespace with ip_local_port_range \"40000 40001\", both ports held",
                              _no_local_port, False),
    "so_error:ETIMEDOUT": ("a lab namespace with tcp_syn_retries=1 and a listener that drops SYNs; connect "
                           "timer 10 s", _syn_give_up, False),
    "tls_timeout": ("proxy_pass https:// to a peer that accepts TCP and never answers the ClientHello",
                    lambda: _tls("silent"), False),
    "tls_verify": ("proxy_pass https://, proxy_ssl_verify on, a peer whose certificate a CA nobody trusts signed",
                   lambda: _tls("untrusted"), False),
    "tls_ssl:TLSV1_ALERT_PROTOCOL_VERSION": ("proxy_ssl_protocols TLSv1.3 against a TLS 1.2-only peer",
                                             lambda: _tls("tls12", "TLSv1.3"), False),
    "tls_ssl:WRONG_VERSION_NUMBER": ("proxy_pass https:// to a plain HTTP server", lambda: _tls("plaintext"), False),
    "tls_closed": ("proxy_pass https:// to a peer that reads the ClientHello and closes", lambda: _tls("hangup"),
                   False),
}

_NOT_HERE = {
    "socket:EMFILE": "needs nginx's worker with a lowered open-file limit (worker_rlimit_nofile, which nbconn.nginx.runner "
                     "does not write; prlimit() on a worker running as another user needs CAP_SYS_RESOURCE)",
    "so_error:EHOSTUNREACH": _NEEDS_LINK % "an ICMP host unreachable",
    "so_error:ENETUNREACH": _NEEDS_LINK % "an ICMP net unreachable",
}


def _request_until_logged(nginx, held: list) -> list:
    """Send requests, each on a connection of its own kept in ``held``, until nginx logs that its
    worker_connections are not enough.  (A loop called inside the try, not written in it: see
    tests/test_interrupt_coverage.py.)"""
    # quickly: the waiting requests end at proxy_read_timeout (5 s) and give their connections back
    for _ in range(40):
        client = socket.create_connection(("127.0.0.1", nginx.port), timeout=2)
        held.append(client)
        client.sendall(b"GET / HTTP/1.0\r\nHost: nbconn\r\n\r\n")
        lines = _wait_for_lines(nginx, "worker_connections are not enough while", 0.05)
        if lines:
            return lines
    return _wait_for_lines(nginx, "worker_connections are not enough while", 1.0)


def _worker_connections() -> list:
    """Fill nbconn.nginx.runner's ``worker_connections 64`` until a request's upstream connect finds no free connection.

    Idle clients would not do: nginx reuses (closes) idle connections when it runs short (ngx_drain_connections,
    "worker_connections are not enough, reusing connections").  A client with an unfinished header and requests
    waiting on a peer that never answers are not reusable: one of the first, then requests (a client and an
    upstream connection each) until a client takes the last free connection and its upstream connect fails in
    ngx_get_connection (ngx_connection.c line 1119).  At most 40 requests."""
    from ..lab import peers
    from .runner import Nginx

    held: list = []
    with peers.listening(hold=True) as up, Nginx([str(up)], connect_timeout=CONNECT_TIMEOUT_S) as nginx:
        try:
            partial = socket.create_connection(("127.0.0.1", nginx.port), timeout=2)
            held.append(partial)
            partial.sendall(b"GET / HTTP/1.0\r\n")  # an unfinished header: not reusable
            return _request_until_logged(nginx, held)
        finally:
            for sock in held:
                sock.close()


def _worker_connections_model() -> list:
    """The model at the moment nginx's worker meets its limit: ``Upstream(worker_connections=64)`` with all 64
    held by others (``other_connections=64``: the clients and upstream connections the waiting requests hold).
    The model runs one request at a time, so it does not fill the pool itself; it counts the pool as nginx's
    ngx_get_connection does and fails the upstream connect the same way (NGX_ERROR, 500, "[alert]").  No
    connect() is made: the count fails first, as in nginx, where socket() is the only call before it."""
    from ..lab import peers
    from .upstream import Server, Upstream, run_requests

    with peers.listening() as up, Upstream([Server(str(up))], worker_connections=_NGINX_WORKER_CONNECTIONS,
                                           other_connections=_NGINX_WORKER_CONNECTIONS) as model:
        done = run_requests(model, 1, timeout=CONNECT_TIMEOUT_S)
    return [line for r in done for line in r.log]


#: nbconn.nginx.runner's default worker_connections, which _worker_connections fills
_NGINX_WORKER_CONNECTIONS = 64


def _wait_for_lines(nginx, text: str, wait_s: float) -> list:
    """The error-log lines holding ``text``, looked for every 10 ms for at most ``wait_s`` (nginx writes the
    line when its worker handles the request, a moment after the client sent it)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        found = [f"[{e.level}] {e.message}" for e in nginx.error_log() if text in e.message]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.01)


def _produced(lines: list, cause: str) -> dict | None:
    """The first line of ``lines`` ("[level] message") that decodes to ``cause``, else the first line."""
    if not lines:
        return None
    for text in lines:
        if why.decode(text.split("] ", 1)[-1])["cause"] == cause:
            return {"line": text, "same": True}
    return {"line": lines[0], "same": False}


def _run_model(setup: _Setup, http: bool) -> list:
    from .upstream import Server, Upstream, run_requests

    client = None
    if setup.pki is not None:
        from .oracle import tls_client

        client = tls_client(setup.pki.cafile, setup.protocols)
    with Upstream([Server(t) for t in setup.targets]) as up:
        using = setup.namespace.using() if setup.namespace is not None else contextlib.nullcontext()
        with using:
            done = run_requests(up, setup.requests, timeout=setup.timeout, http=http, read_timeout=2.0, tls=client)
    return [line for r in done for line in r.log]


def _run_nginx(nginx, setup: _Setup) -> list:
    for _ in range(setup.requests):
        nginx.request("/", timeout_s=setup.timeout + 10.0)
    return [f"[{e.level}] {e.message}" for e in nginx.error_log() if e.level not in ("info", "notice")]


def _started_nginx(stack: contextlib.ExitStack, setup: _Setup):
    """A real nginx in front of the situation's targets (inside its namespace, if any), or why not."""
    from . import runner as nginx_module

    reason = nginx_module.unavailable_reason()
    if reason:
        return reason
    try:
        if setup.pki is not None:
            from .oracle import https_nginx

            return stack.enter_context(https_nginx(setup.targets, cafile=setup.pki.cafile,
                                                   protocols=setup.protocols, connect_timeout=setup.timeout))
        return stack.enter_context(nginx_module.Nginx(setup.targets, connect_timeout=setup.timeout,
                                                      netns=setup.namespace))
    except RuntimeError as exc:  # nginx would not start here: say so, keep the model's answer
        return f"nginx did not run: {exc}"


def reproduce(answer: dict) -> dict:
    """Build the situation behind a decoded line and run the model and a real nginx on it.

    Returns ``{"made": False, "reason": ...}`` where it cannot be made here, else ``{"made": True,
    "situation", "given", "model": {"line", "same"} | None, "nginx": {"line", "same"} | str}`` (a str: why
    nginx did not run)."""
    cause = answer["cause"]
    given = answer["line"]
    if cause == "outside":
        return {"made": False, "reason": "outside the connect flow: nothing to build"}
    if cause in _NOT_HERE:
        return {"made": False, "reason": _NOT_HERE[cause]}
    if cause == "worker_connections":
        from . import runner as nginx_module

        reason = nginx_module.unavailable_reason()
        return {"made": True, "situation": "nbconn.nginx.runner's worker_connections 64 filled by an unfinished request "
                                           "and requests waiting on a peer that never answers",
                "given": given, "model": _produced(_worker_connections_model(), cause),
                "nginx": reason or _produced(_worker_connections(), cause)}
    if cause not in SITUATIONS:
        return {"made": False, "reason": f"nbconn's lab has no situation for {cause} yet"}
    if answer.get("module") == why.STREAM and cause.startswith("recv:"):
        return {"made": False, "reason": "a stream session's reset while proxying: nbconn's nginx runs the HTTP "
                                         "proxy only"}
    situation, build, http = SITUATIONS[cause]
    if cause == "connect:EACCES" and not (answer.get("upstream") or "").startswith("unix:"):
        return {"made": False, "reason": "EACCES on a TCP connect (a prohibit route, a security module): nbconn "
                                         "builds the unix socket case only"}
    try:
        # nginx's block inside the situation's: a process inside keeps a lab namespace alive
        with build() as setup, contextlib.ExitStack() as stack:
            nginx = _started_nginx(stack, setup)
            if setup.ready is not None:
                stack.enter_context(setup.ready())
            model = _produced(_run_model(setup, http), cause)
            if not isinstance(nginx, str):
                try:
                    nginx = _produced(_run_nginx(nginx, setup), cause)
                except OSError as exc:  # its client could not reach it: say so, keep the model's answer
                    nginx = f"nginx's client failed: {exc}"
    except (_CannotHere, RuntimeError) as exc:  # no lab namespace here, or a peer could not be built
        return {"made": False, "reason": str(exc)}
    if cause == "connect:EACCES" and os.geteuid() == 0 and (model is None or not model["same"]):
        model = dict(model or {"line": None, "same": False},
                     note="the model runs as root, which no file mode stops; nginx's worker runs as 'nobody'")
    module_note = " (nginx: the HTTP proxy module)" if answer.get("module") == why.STREAM else ""
    return {"made": True, "situation": situation + module_note, "given": given, "model": model, "nginx": nginx}
