"""Make a decoded error-log line happen again: the lab's peers, nbconn's upstream model and a real nginx.

``why --reproduce`` hands each line decoded by :mod:`nbconn.why` to :func:`reproduce`,
which builds the situation behind its cause with :mod:`nbconn.lab.peers` (loopback
and AF_UNIX only), sends the same requests through :mod:`nbconn.upstream` (real
connects, nginx's rules) and through a private nginx 1.22.1 (:class:`nbconn.nginx.Nginx`,
the HTTP proxy module), and returns the line each wrote next to the given one.
"Same" means the produced line decodes to the same cause (addresses differ).

Causes that need what loopback cannot give -- an ICMP error from a router, a
narrowed port range, the kernel's SYN give-up, no route -- need a lab namespace or
the impaired link, where nbconn's nginx does not run yet: they say so instead.
Everything started (peers, nginx, its prefix) is closed on every path.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

from . import why

#: the connect timer both run with where the situation waits for it (proxy_connect_timeout)
CONNECT_TIMEOUT_S = 0.3


def _share(path: str, mode: int = 0o777) -> None:
    """As root nginx's worker runs as 'nobody': let it through the peer's private directory to the socket."""
    os.chmod(os.path.dirname(path), 0o711)
    if os.path.exists(path):
        os.chmod(path, mode)


@contextlib.contextmanager
def _refused():
    from .lab import peers

    with peers.refused() as p:
        yield [str(p)], 1


@contextlib.contextmanager
def _two_refused():
    from .lab import peers

    with peers.refused() as a, peers.refused() as b:
        yield [str(a), str(b)], 2  # the first request disables both (max_fails=1); the second finds none


@contextlib.contextmanager
def _blackhole():
    from .lab import peers

    with peers.blackhole() as p:
        yield [str(p)], 1


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
            yield [f"127.0.0.1:{listener.getsockname()[1]}"], 1
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
    from .lab import peers

    with peers.unix_full() as p:
        _share(p.path)
        yield [str(p)], 1


@contextlib.contextmanager
def _unix_missing():
    from .lab import peers

    with peers.unix_missing() as p:
        _share(p.path)
        yield [str(p)], 1


@contextlib.contextmanager
def _unix_stale():
    """A socket file nobody listens on: bound, never listen()ed (what a backend that died leaves behind)."""
    where = tempfile.mkdtemp(prefix="nbconn-")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            path = os.path.join(where, "stale.sock")
            sock.bind(path)
            _share(path)
            yield [f"unix:{path}"], 1
    finally:
        import shutil

        shutil.rmtree(where, ignore_errors=True)


@contextlib.contextmanager
def _unix_forbidden():
    """A listening unix socket whose file mode refuses writers: the worker meets EACCES."""
    from .lab import peers

    with peers.unix_listening() as p:
        _share(p.path, 0o000 if os.geteuid() != 0 else 0o700)
        yield [str(p)], 1


_NEEDS_LINK = "needs a lab namespace or the impaired link (%s), where nbconn's nginx does not run yet"

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
}

_NOT_HERE = {
    "so_error:ETIMEDOUT": _NEEDS_LINK % "tcp_syn_retries lowered inside the namespace, SYNs lost",
    "so_error:EHOSTUNREACH": _NEEDS_LINK % "an ICMP host unreachable from a router",
    "so_error:ENETUNREACH": _NEEDS_LINK % "an ICMP net unreachable from a router",
    "connect:ENETUNREACH": _NEEDS_LINK % "a namespace without a route",
    "connect:EHOSTUNREACH": _NEEDS_LINK % "an 'unreachable' route",
    "connect:EADDRNOTAVAIL": _NEEDS_LINK % "a narrowed ip_local_port_range",
}


def _produced(lines: list, cause: str) -> dict | None:
    """The first line of ``lines`` ("[level] message") that decodes to ``cause``, else the first line."""
    if not lines:
        return None
    for text in lines:
        if why.decode(text.split("] ", 1)[-1])["cause"] == cause:
            return {"line": text, "same": True}
    return {"line": lines[0], "same": False}


def _run_model(targets: list, requests: int, http: bool) -> list:
    from .upstream import Peer, Upstream, run_requests

    with Upstream([Peer(t) for t in targets]) as up:
        done = run_requests(up, requests, timeout=CONNECT_TIMEOUT_S, http=http, read_timeout=2.0)
    return [line for r in done for line in r.log]


def _run_nginx(targets: list, requests: int) -> list:
    from .nginx import Nginx

    with Nginx(targets, connect_timeout=CONNECT_TIMEOUT_S) as nginx:
        for _ in range(requests):
            nginx.request("/", timeout_s=10.0)
        return [f"[{e.level}] {e.message}" for e in nginx.error_log() if e.level not in ("info", "notice")]


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
    if cause not in SITUATIONS:
        return {"made": False, "reason": f"nbconn's lab has no situation for {cause} yet"}
    if answer.get("module") == why.STREAM and cause.startswith("recv:"):
        return {"made": False, "reason": "a stream session's reset while proxying: nbconn's nginx runs the HTTP "
                                         "proxy only"}
    situation, build, http = SITUATIONS[cause]
    from . import nginx as nginx_module

    with build() as (targets, requests):
        model = _produced(_run_model(targets, requests, http), cause)
        reason = nginx_module.unavailable_reason()
        nginx = reason if reason else _produced(_run_nginx(targets, requests), cause)
    if cause == "connect:EACCES" and os.geteuid() == 0 and (model is None or not model["same"]):
        model = dict(model or {"line": None, "same": False},
                     note="the model runs as root, which no file mode stops; nginx's worker runs as 'nobody'")
    module_note = " (nginx: the HTTP proxy module)" if answer.get("module") == why.STREAM else ""
    return {"made": True, "situation": situation + module_note, "given": given, "model": model, "nginx": nginx}
