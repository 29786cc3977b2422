"""A loopback HTTP/1.1 upstream that keeps connections alive, and says which requests came on which connection.

nginx's ``keepalive N`` (``ngx_http_upstream_keepalive_module``) only reuses a
connection the upstream keeps open: an HTTP/1.1 response with a length and no
``Connection: close``.  The lab's HTTP peer closes after every answer, so the
keepalive experiments (notebook 13, ``nbconn upstream --keepalive``) use this one.

:class:`HttpPeer` answers every request with ``200 ok`` (or ``status``/``body``) and keeps the
connection until the client closes it (or ``idle_timeout_s``).  It records, for
every request, which connection it came on and whether it was that
connection's first: the upstream's own view of "reused or new", independent of
what the client claims.  Several peers may share one ``journal`` list, which
then holds the order across peers.

``rtt_ms`` -- an honest stand-in for a slow link on loopback: each answer is
held back ``rtt_ms``, and the first answer on a new connection ``2 * rtt_ms``
(the handshake's round trip that loopback does not have, plus the request's).
It is a delay added by this server, not a network: the kernel still completes
the handshake at once, and strace still shows loopback's microseconds.

``source`` -- a lab namespace (``nbconn.lab.namespace()``, an impaired link's
``server_ns``): the listener is made in there (the accept loop runs here, on the
passed descriptor), so the peer sits behind the lab's link and a client in the
link's client namespace -- a real nginx with ``netns=link.client_ns`` -- pays real
handshakes over it; no ``rtt_ms`` stand-in needed.

Only 127.0.0.0/8 and ::1, or any address inside a lab namespace (where only the
lab's addresses exist).  One thread accepts; one thread per connection (at most
``max_connections``); :meth:`stop` (or leaving the ``with``) closes every
socket and joins every thread, each wait bounded.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from .. import validate

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
RESPONSE_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
MAX_HEADER = 65536


@dataclass(frozen=True)
class Served:
    """One request as the upstream saw it."""

    peer: str  # this server, as nginx names it: 127.0.0.1:PORT
    connection: int  # 1, 2, ... in the order this server accepted them
    nth: int  # the request's number on that connection (1 = it came on a new connection)
    client_port: int

    @property
    def reused(self) -> bool:
        return self.nth > 1


class HttpPeer:
    def __init__(self, host: str = "127.0.0.1", *, rtt_ms: float = 0.0, journal: list | None = None,
                 idle_timeout_s: float = 60.0, max_connections: int = 256, source=None, status: int = 200,
                 body: bytes = b"ok\n") -> None:
        if source is not None and not callable(getattr(source, "socket", None)):
            raise TypeError(f"source must be a lab namespace (nbconn.lab.namespace(), a link's server_ns), "
                            f"got {validate.shown(source)}")
        if not isinstance(host, str):
            raise TypeError(f"host must be an IP address as a str, got {validate.shown(host)}")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host={validate.shown(host)} is not an IP address") from None
        if source is None and not address.is_loopback:
            raise ValueError(f"host={validate.shown(host)} must be a loopback address (or give source=, a lab "
                             f"namespace, to listen on one of its addresses)")
        self.host = host
        self.source = source
        self.rtt_s = validate.number("rtt_ms", rtt_ms, 0, 10_000) / 1000
        self.idle_timeout_s = validate.number("idle_timeout_s", idle_timeout_s, 0, 3600, low_open=True)
        self.max_connections = validate.integer("max_connections", max_connections, 1, 10_000)
        # status, body: the answer to every request (a keep-alive "502" peer for proxy_next_upstream http_502,
        # a "404" with or without a body), always with its Content-Length, so the connection can be kept
        self.status = validate.integer("status", status, 100, 599)
        if not isinstance(body, bytes) or len(body) > 65536:
            raise TypeError(f"body must be bytes of at most 64 KiB, got {validate.shown(body)}")
        self.body = body
        head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % (
            self.status, b"OK" if self.status == 200 else b"nbconn", len(body))
        self._response = head + b"\r\n" + body
        self._response_close = head + b"Connection: close\r\n\r\n" + body
        self.journal = journal if journal is not None else []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open: set = set()
        self._threads: list = []
        self._listener: socket.socket | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.address

    @property
    def served(self) -> list:
        """This server's entries of the journal."""
        return [s for s in self.journal if s.peer == self.address]

    # -- lifetime -------------------------------------------------------------------------
    def start(self) -> "HttpPeer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.source is not None:
            sock = self.source.socket(family, socket.SOCK_STREAM)  # made inside the lab namespace
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, 0))
            sock.listen(128)
            sock.settimeout(0.1)  # the accept loop looks at the stop flag this often
        except BaseException:
            sock.close()
            raise
        self._listener, self.port = sock, sock.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv()
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> "HttpPeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- serving ------------------------------------------------------------------------------
    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"nbconn-httpd-{self.port}")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                if len(self._open) >= self.max_connections:
                    conn.close()
                    continue
                self.connections += 1
                number = self.connections
                self._open.add(conn)
            self._spawn(self._serve, conn, number, addr[1])

    def _serve(self, conn: socket.socket, number: int, client_port: int) -> None:
        try:
            conn.settimeout(self.idle_timeout_s)
            data, nth = b"", 0
            while True:  # (not `while <condition>:`, tests/test_interrupt_coverage.py says why)
                if self._stop.is_set():
                    return
                request = _read_head(conn, data)
                if request is None:
                    return  # the client closed (the end of this connection), or sent too much
                head, data = request
                nth += 1
                with self._lock:
                    self.journal.append(Served(self.address, number, nth, client_port))
                if self.rtt_s:  # the stand-in for the link: see the module docstring
                    time.sleep(self.rtt_s * (2 if nth == 1 else 1))
                close = _wants_close(head)
                conn.sendall(self._response_close if close else self._response)
                if close:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()


def _read_head(conn: socket.socket, data: bytes):
    """(a request head, what came after it) from ``data`` and then ``conn``; None when the client closed
    the connection or the head grew past MAX_HEADER."""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEADER:
            return None
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _wants_close(head: bytes) -> bool:
    """HTTP/1.0 without keep-alive, or an explicit ``Connection: close`` (RFC 9112 section 9.3)."""
    lines = head.split(b"\r\n")
    version = lines[0].rsplit(b" ", 1)[-1].upper() if lines else b""
    connection = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            connection = value.strip().lower()
    if version == b"HTTP/1.0":
        return connection != b"keep-alive"
    return connection == b"close"
