"""Local peers that behave, or misbehave on purpose, for connects to land on.

On loopback a TCP handshake completes inside the ``connect()`` call (~20 µs
here): nothing ever waits, so nothing about timeouts can be seen.  These peers
make each interesting answer happen on demand, with nothing but the kernel's
own behaviour:

==============  ======================================================  =====================
peer            how it is made                                          a connect sees
==============  ======================================================  =====================
listening       listen() plus a thread that accepts and closes          connected
refused         a port that is bound but not listening                  ECONNREFUSED (RST)
blackhole       listen(0), its accept queue filled once, never drained  SYNs dropped: timer
reset           accepts, then closes with SO_LINGER {1, 0}              connected, then RST
slow_accept     small backlog, accepts one connection every few ms      a burst overflows
unix_listening  AF_UNIX listen() plus an accepting thread               connected (0 at once)
unix_full       AF_UNIX listen(0), backlog filled, never accepted       EAGAIN at once
unix_missing    a path in a fresh directory that nobody created         ENOENT at once
==============  ======================================================  =====================

Each is a context manager yielding a :class:`Peer`: a ``str`` -- the target to
connect to -- with a few counters attached.  Everything it opened (listeners,
filler sockets, threads, temporary directories) is closed on exit, also on
exceptions and KeyboardInterrupt.  Addresses are loopback (127.0.0.1, ::1) or
AF_UNIX paths in a private temporary directory; nothing else is contacted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import socket
import struct
import tempfile
import threading

from .. import validate

LINGER_RESET = struct.pack("ii", 1, 0)
_POLL_S = 0.05  # how often accept threads look at their stop flag
MAX_BACKLOG = 65535  # listen()'s backlog: the kernel caps it at net.core.somaxconn (a u16 until 4.1)
MAX_FILLERS = 4096


class Peer(str):
    """A target string ("127.0.0.1:40123", "unix:/tmp/..") with counters.

    ``scenario``: the peer's kind; ``accepted``: connections accepted so far;
    ``accept_errors``: accept() calls that failed for want of descriptors or memory (retried);
    ``port``: the TCP port (None for AF_UNIX); ``path``: the AF_UNIX path.
    """

    scenario: str
    accepted: int
    accept_errors: int
    port: int | None
    path: str | None

    def __new__(cls, target: str, scenario: str, *, port: int | None = None, path: str | None = None) -> "Peer":
        peer = super().__new__(cls, target)
        peer.scenario = scenario
        peer.accepted = 0
        peer.accept_errors = 0
        peer.port = port
        peer.path = path
        return peer

    @property
    def target(self) -> str:
        return str(self)


def _target_for(sock: socket.socket) -> tuple[str, int | None]:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}", None
    host, port = sock.getsockname()[:2]
    return (f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"), port


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_loopback(host: str) -> None:
    import ipaddress

    if not isinstance(host, str):
        raise TypeError(f"peer host must be an IP literal string, got {validate.shown(host)}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"peer host {validate.shown(host)} must be a loopback IP literal (127.x.x.x or ::1)") from None
    if not ip.is_loopback:
        raise ValueError(f"peer host {validate.shown(host)} is not loopback: lab peers listen on 127.0.0.0/8 or ::1 only")


class _Acceptor:
    """A daemon thread that accepts from a listener until stopped.

    ``handle(conn)`` decides what happens to each accepted connection;
    ``interval_s`` spaces accepts out (the slow acceptor).  Running out of
    descriptors (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM) is not the
    end: the connection stays in the accept queue, so the thread counts the error
    (``peer.accept_errors``), backs off (1 ms doubling to 100 ms, stop-aware) and
    tries again -- a "listening" peer must not silently turn into a black hole.
    ECONNABORTED (the client gave up while queued) is skipped.  Any other error
    means the listener itself is gone: the thread ends.
    """

    _RETRY = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
    _BACKOFF_MAX_S = 0.1

    def __init__(self, listener: socket.socket, peer: Peer, handle, interval_s: float = 0.0) -> None:
        self.listener = listener
        self.peer = peer
        self.handle = handle
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"nbconn-{peer.scenario}", daemon=True)

    def _run(self) -> None:
        listener, stop = self.listener, self._stop
        backoff = 0.0
        with self._ep as ep:
            while True:  # (not `while not stop.is_set():`, tests/test_interrupt_coverage.py says why)
                if stop.is_set():
                    return
                if not ep.poll(_POLL_S):
                    if listener.fileno() == -1:
                        return  # closed under us (its owner was interrupted before it could stop us)
                    continue
                while True:
                    if stop.is_set():
                        return
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno == errno.ECONNABORTED:
                            continue
                        if exc.errno not in self._RETRY:
                            return  # the listener was closed under us
                        self.peer.accept_errors += 1
                        backoff = min(self._BACKOFF_MAX_S, backoff * 2 or 0.001)
                        stop.wait(backoff)
                        continue
                    backoff = 0.0
                    self.peer.accepted += 1
                    self.handle(conn)
                    if self.interval_s:
                        stop.wait(self.interval_s)

    def __enter__(self) -> "_Acceptor":
        self.listener.setblocking(False)
        # The epoll instance is made here, not in the thread: running out of descriptors then fails the
        # peer's start for its caller to see, instead of killing a thread that has not run yet.
        self._ep = select.epoll()
        try:
            self._ep.register(self.listener.fileno(), select.EPOLLIN)
            self._thread.start()
        except BaseException:
            self._ep.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # if a Ctrl-C cuts this short, the thread still ends within _POLL_S


def _close(conn: socket.socket) -> None:
    conn.close()


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    conn.close()


_HTTP_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")


def _http(conn: socket.socket) -> None:
    """Answer one HTTP request minimally (enough for nginx as a reverse proxy), then close."""
    try:
        conn.settimeout(2.0)
        data = b""
        while True:
            if b"\r\n\r\n" in data or len(data) >= 65536:
                break
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        if data:
            conn.sendall(_HTTP_OK)
    except OSError:
        pass
    finally:
        conn.close()


def _check_host(host: str, source) -> None:
    """Loopback only -- unless the socket is made inside a lab namespace (``source``): every address
    there belongs to a namespace this package created, and nothing in it reaches a real network."""
    if source is None:
        _check_loopback(host)
        return
    import ipaddress

    if not isinstance(host, str):
        raise TypeError(f"peer host must be an IP literal string, got {validate.shown(host)}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"peer host {validate.shown(host)} must be an IP literal") from None


def _new_socket(host: str, source) -> socket.socket:
    """Step 1 for a peer: here, or inside the lab namespace ``source`` (its descriptor passed over SCM_RIGHTS)."""
    family = _family_of(host)
    return socket.socket(family, socket.SOCK_STREAM) if source is None else source.socket(family, socket.SOCK_STREAM)


def _listener(host: str, backlog: int, source=None) -> socket.socket:
    _check_host(host, source)
    sock = _new_socket(host, source)
    try:
        sock.bind((host, 0))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def listening(host: str = "127.0.0.1", *, backlog: int = 4096, http: bool = False, hold: bool = False,
              source=None):
    """A peer that accepts every connection: closes it at once, answers HTTP (``http=True``),
    or keeps it open until exit (``hold=True``).  ``source``: a lab namespace to listen in
    (:mod:`nbconn.lab.namespace`); the acceptor thread runs here on the passed listener."""
    backlog = validate.integer("backlog", backlog, 0, MAX_BACKLOG)
    http = validate.flag("http", http)
    hold = validate.flag("hold", hold)
    held: list[socket.socket] = []
    handle = _http if http else (held.append if hold else _close)
    with _listener(host, backlog, source) as sock:
        target, port = _target_for(sock)
        peer = Peer(target, "listening", port=port)
        try:
            with _Acceptor(sock, peer, handle):
                yield peer
        finally:
            for conn in held:
                conn.close()


@contextlib.contextmanager
def refused(host: str = "127.0.0.1", *, source=None):
    """A port nobody listens on.  It stays bound (without listen()) so no other program takes it
    while the peer lives; a SYN to it is answered with RST."""
    _check_host(host, source)
    with _new_socket(host, source) as sock:
        sock.bind((host, 0))
        target, port = _target_for(sock)
        yield Peer(target, "refused", port=port)


def _connect_filler(address, family: int, timeout_s: float = 2.0, source=None) -> socket.socket:
    """A plain client connection used to fill an accept queue; waits until it is established."""
    filler = socket.socket(family, socket.SOCK_STREAM) if source is None else source.socket(family, socket.SOCK_STREAM)
    try:
        filler.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        filler.settimeout(timeout_s)
        filler.connect(address)
    except BaseException:
        filler.close()
        raise
    return filler


@contextlib.contextmanager
def blackhole(host: str = "127.0.0.1", *, source=None):
    """A listener whose accept queue is full and never drained.

    ``listen(0)`` still queues one connection (the kernel's test is "queue length >
    backlog"); one filler connection fills it.  From then on the kernel drops every
    SYN for this port without an answer, exactly like a host that has gone away:
    connects stay in SYN-SENT, the kernel retransmits the SYN on its schedule, and only
    a timer (or TCP_SYNCNT/TCP_USER_TIMEOUT) ends them.
    """
    with _listener(host, 0, source) as sock:
        target, port = _target_for(sock)
        filler = _connect_filler(sock.getsockname(), sock.family, source=source)
        try:
            yield Peer(target, "blackhole", port=port)
        finally:
            filler.close()


@contextlib.contextmanager
def reset(host: str = "127.0.0.1", *, source=None):
    """A peer that accepts and at once closes with SO_LINGER {1, 0}: the kernel sends RST.

    The handshake itself completes (the kernel finishes it before accept()), so a
    connect usually ends "connected" and the reset shows up on the first read or
    write (ECONNRESET); when the RST is faster than the client's SO_ERROR check the
    connect itself ends "reset".
    """
    with _listener(host, 4096, source) as sock:
        target, port = _target_for(sock)
        peer = Peer(target, "reset", port=port)
        with _Acceptor(sock, peer, _reset):
            yield peer


@contextlib.contextmanager
def slow_accept(host: str = "127.0.0.1", *, backlog: int = 8, interval_s: float = 0.005, source=None):
    """A listener with a small accept queue and an acceptor that takes one connection
    every ``interval_s``.  A burst larger than the queue overflows it: the kernel drops the
    extra SYNs and the clients retransmit after ~1 s -- the latency tail of an overloaded upstream."""
    backlog = validate.integer("backlog", backlog, 0, 4096)
    interval_s = validate.number("interval_s", interval_s, 0, 1, low_open=True)
    with _listener(host, backlog, source) as sock:
        target, port = _target_for(sock)
        peer = Peer(target, "slow_accept", port=port)
        with _Acceptor(sock, peer, _close, interval_s=interval_s):
            yield peer


@contextlib.contextmanager
def _unix_dir():
    path = tempfile.mkdtemp(prefix="nbconn-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def unix_listening(*, backlog: int = 4096):
    """An AF_UNIX listener in a private temporary directory, with an accepting thread."""
    backlog = validate.integer("backlog", backlog, 0, MAX_BACKLOG)
    with _unix_dir() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        path = os.path.join(tmp, "peer.sock")
        sock.bind(path)
        sock.listen(backlog)
        peer = Peer(f"unix:{path}", "unix_listening", path=path)
        with _Acceptor(sock, peer, _close):
            yield peer


def _fill_backlog(stack: contextlib.ExitStack, path: str, max_fillers: int) -> bool:
    """Connect non-blocking AF_UNIX sockets to ``path`` (``stack`` holds them) until one gets EAGAIN: True
    when the backlog filled.  (A loop called inside the with, not written in it: tests/test_interrupt_coverage.py.)"""
    for _ in range(max_fillers):
        filler = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        filler.setblocking(False)
        err = filler.connect_ex(path)
        if err == errno.EAGAIN:
            return True
        if err != 0:
            raise OSError(err, f"filling the AF_UNIX backlog of {path}: {os.strerror(err)}")
    return False


@contextlib.contextmanager
def unix_full(*, backlog: int = 0, max_fillers: int = 64):
    """An AF_UNIX listener whose backlog is full: a non-blocking connect fails at once with
    EAGAIN (Linux), which nginx treats like ECONNREFUSED (ngx_event_connect_peer)."""
    backlog = validate.integer("backlog", backlog, 0, MAX_FILLERS - 2)
    max_fillers = validate.integer("max_fillers", max_fillers, 1, MAX_FILLERS)
    if max_fillers < backlog + 2:  # the queue holds backlog + 1 (unix_recvq_full: "len > backlog"), one more to see EAGAIN
        raise ValueError(f"max_fillers={max_fillers} cannot fill backlog={backlog}: it takes backlog + 2 connects")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(_unix_dir())
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        path = os.path.join(tmp, "full.sock")
        sock.bind(path)
        sock.listen(backlog)
        if not _fill_backlog(stack, path, max_fillers):
            raise RuntimeError(f"AF_UNIX backlog of {path} did not fill after {max_fillers} connections")
        yield Peer(f"unix:{path}", "unix_full", path=path)


@contextlib.contextmanager
def unix_missing():
    """An AF_UNIX path in a fresh private directory that nothing ever creates: ENOENT."""
    with _unix_dir() as tmp:
        path = os.path.join(tmp, "nobody-here.sock")
        yield Peer(f"unix:{path}", "unix_missing", path=path)
