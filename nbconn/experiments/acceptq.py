"""A burst against a small accept queue, seen from both ends: what the client believes, what the server got.

The experiment (notebook 07): ``count`` non-blocking connects at once -- nbconn's
own flow, nginx's steps -- to a listener with ``listen(backlog)`` whose acceptor
takes one connection every ``interval_s``.  Then every connect that the client
calls "connected" sends a small request, the way nginx sends the request right
after ``ngx_http_upstream_test_connect``, and waits for the first byte of the
answer (what nginx logs as ``$upstream_header_time``).

Both views are recorded:

* the client's: each connect's outcome and handshake time; then, per connected
  socket, the time from sending the request to the first byte of the answer (or
  none before ``read_timeout_s``);
* the server's: the connections ``accept()`` returned (when, and which client
  port), the accept queue's length and limit read from the listener's
  ``TCP_INFO`` (:func:`nbconn.lab.netstat.listener_queue`, ss's Recv-Q / Send-Q), and the
  namespace's TcpExt counters before, between and after
  (:func:`nbconn.lab.netstat.read`).

Why the two disagree is in the kernel (Linux 6.18, read there):
``tcp_conn_request`` (``net/ipv4/tcp_input.c``) drops a SYN while the accept queue
is full (``ListenOverflows``), whatever ``tcp_abort_on_overflow`` says; when the
SYN queue is full it answers with a syncookie instead of a request socket
(``TCPReqQFullDoCookies``, ``SyncookiesSent``) if ``tcp_syncookies`` allows, else drops
the SYN (``TCPReqQFullDrop``).  The client's kernel takes a cookie SYN-ACK as any
SYN-ACK: the connect succeeds.  Its final ACK goes to ``cookie_v4_check``
(``net/ipv4/syncookies.c``), which creates the connection only if the accept
queue has room; if not, the ACK is dropped (``ListenOverflows`` again) and the
server forgets the client, who believes it is connected.  The request the
client sends later carries the same cookie and gets the same test, so it is
answered once the acceptor has made room -- or resent until then.
``tcp_abort_on_overflow`` is read only in ``tcp_check_req``
(``net/ipv4/tcp_minisocks.c``), for a final ACK that matches a request socket.

Everything runs in one network namespace: pass a lab namespace (its sockets and
counters, its sysctls), or ``None`` for this process's own namespace.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from ..lab import netstat

REQUEST = b"GET / HTTP/1.0\r\n\r\n"
ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
MAX_COUNT = 1000


class OwnNamespace:
    """This process's own namespace, with the same few methods as a lab namespace."""

    where = "made in this process's own network namespace"

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0, *,
               timeout_s: float | None = None) -> socket.socket:
        return socket.socket(family, type, proto)  # made here: nothing to wait for, timeout_s has no use

    def read_netstat(self) -> dict:
        return netstat.read()

    def sysctl(self, name: str) -> str:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()

    def using(self):
        from .. import socketsource

        return socketsource.using(None)


class _Server:
    """A listener inside the namespace and one thread that accepts at most once per ``interval_s``,
    answers every request it reads, and notes the accept queue's length as it goes."""

    def __init__(self, ns, backlog: int, interval_s: float) -> None:
        self.listener = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.listener.bind(("127.0.0.1", 0))
            self.listener.listen(backlog)
            self.listener.setblocking(False)
        except BaseException:
            self.listener.close()
            raise
        self.port = self.listener.getsockname()[1]
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self.accepted: list[tuple[float, int]] = []  # (s since t0, client port)
        self.answered = 0
        self.queue: list[tuple[float, int]] = []  # (s since t0, accept queue length)
        self.limit = netstat.listener_queue(self.listener)["limit"]
        self._conns: dict[int, socket.socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbconn-acceptq", daemon=True)

    def _note_queue(self, now: float) -> None:
        self.queue.append((now - self.t0, netstat.listener_queue(self.listener)["queued"]))

    def _run(self) -> None:
        with select.epoll() as ep:
            lfd = self.listener.fileno()
            ep.register(lfd, select.EPOLLIN)
            listening, next_accept = True, 0.0
            while True:  # (not `while not stopped:`, tests/test_interrupt_coverage.py says why)
                if self._stop.is_set():
                    break
                now = time.monotonic()
                if not listening and now >= next_accept:  # the acceptor is ready for the next one
                    ep.modify(lfd, select.EPOLLIN)
                    listening = True
                wait = 0.01 if listening else min(0.01, next_accept - now)
                for fd, _ in ep.poll(max(wait, 0.0)):
                    if fd == lfd:
                        self._note_queue(time.monotonic())
                        try:
                            conn, addr = self.listener.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        now = time.monotonic()
                        self.accepted.append((now - self.t0, addr[1]))
                        conn.setblocking(False)
                        self._conns[conn.fileno()] = conn
                        ep.register(conn.fileno(), select.EPOLLIN)
                        # Slow acceptor: stop watching the listener until the interval has passed
                        # (a level-triggered listener would otherwise wake this loop without pause).
                        ep.modify(lfd, 0)
                        listening, next_accept = False, now + self.interval_s
                    else:
                        self._answer(ep, fd)

    def _answer(self, ep, fd: int) -> None:
        conn = self._conns.pop(fd)
        ep.unregister(fd)
        try:
            if conn.recv(4096):
                conn.sendall(ANSWER)
                self.answered += 1
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> "_Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        self.listener.close()


def burst(ns=None, *, count: int = 100, backlog: int = 8, interval_s: float = 0.005,
          connect_timeout_s: float = 1.5, read_timeout_s: float = 1.5) -> dict:
    """Run the burst once inside ``ns`` (a lab namespace, or None: this process's) and return both views.

    Bounded: at most ``connect_timeout_s`` for the connects (nbconn's connect timer,
    nginx's proxy_connect_timeout) plus ``read_timeout_s`` for the answers.
    """
    from ..api import connect_many
    from ..validate import integer, number

    count = integer("count", count, 1, MAX_COUNT)
    backlog = integer("backlog", backlog, 0, 4096)
    interval_s = number("interval_s", interval_s, 0.0005, 1.0)
    connect_timeout_s = number("connect_timeout_s", connect_timeout_s, 0.05, 10.0)
    read_timeout_s = number("read_timeout_s", read_timeout_s, 0.05, 10.0)
    ns = ns if ns is not None else OwnNamespace()
    sysctls = {name: ns.sysctl(f"net.ipv4.{name}") for name in ("tcp_syncookies", "tcp_abort_on_overflow")}
    results = []
    try:
        with _Server(ns, backlog, interval_s) as server:
            before = ns.read_netstat()
            with ns.using():
                results = connect_many([("127.0.0.1", server.port)] * count, concurrency=count,
                                       timeout=connect_timeout_s, keep=True, trace=False, tcp_info=False)
            connects_done_s = time.monotonic() - server.t0
            # Let the acceptor empty the queue (bounded): what it holds was known to the server all along.
            settle_until = time.monotonic() + min(1.0, (backlog + 2) * interval_s * 2)
            while True:
                if not netstat.listener_queue(server.listener)["queued"] or time.monotonic() >= settle_until:
                    break
                time.sleep(interval_s)
            accepted_then = list(server.accepted)
            connected_ports = set(_local_ports(results))
            queue_then = netstat.listener_queue(server.listener)
            between = ns.read_netstat()
            first_byte_ms, read_errors, sent_at = _request_all(results, read_timeout_s)
            time.sleep(0.02)  # let the acceptor answer what already arrived
            after = ns.read_netstat()
            accepted_all, answered = list(server.accepted), server.answered
            queue_samples, limit = list(server.queue), server.limit
    finally:
        for r in results:
            r.close()
    accepted_ports = {port for _, port in accepted_then}
    return {
        "sysctls": sysctls,
        "count": count, "backlog": backlog, "limit": limit, "interval_s": interval_s,
        "connect_timeout_s": connect_timeout_s, "read_timeout_s": read_timeout_s,
        "client": {
            "outcomes": [r.outcome for r in results],
            "started_s": [r.started_ns / 1e9 - server.t0 if r.started_ns else None for r in results],
            "decided_s": [r.finished_ns / 1e9 - server.t0 if r.finished_ns else None for r in results],
            "handshake_ms": [r.handshake_ns / 1e6 if r.handshake_ns is not None else None for r in results],
            "first_byte_ms": first_byte_ms,
            "first_byte_s": [None if ms is None else sent - server.t0 + ms / 1e3
                             for ms, sent in zip(first_byte_ms, sent_at)],
            "read_errors": read_errors,
        },
        "server": {
            "connects_done_s": connects_done_s,
            "accepted_during_connects": len(accepted_then),
            "accepted_s": [t for t, _ in accepted_all],
            "accepted_total": len(accepted_all),
            "answered": answered,
            "queue_at_end_of_connects": queue_then["queued"],
            "queue_samples": queue_samples,
            "connected_but_not_accepted": len(connected_ports - accepted_ports),
        },
        "counters": {"during_connects": netstat.delta(before, between), "total": netstat.delta(before, after)},
    }


def _local_ports(results):
    """The local ports of the connected Results (a generator: its loop is not in the caller's frame)."""
    return (r.sock.getsockname()[1] for r in results if r.outcome == "connected" and r.sock)


def _request_all(results, read_timeout_s: float) -> tuple[list, dict, list]:
    """Send the request on every connected socket, then wait (bounded) for each one's first byte.

    Returns, per Result, the ms from send to first byte, or None (not connected, no
    answer within ``read_timeout_s`` -- nginx would still be waiting on
    proxy_read_timeout -- or an error instead of an answer); the errors by name; and when
    each request was sent (time.monotonic(), 0.0 where none was).
    """
    import errno as _errno

    first = [None] * len(results)
    errors: dict[str, int] = {}
    sent_at = {}
    sent_times = [0.0] * len(results)
    with select.epoll() as ep:
        for i, r in enumerate(results):
            if r.outcome != "connected" or r.sock is None:
                continue
            try:
                r.sock.send(REQUEST)
            except OSError:
                continue
            sent_at[r.sock.fileno()] = (i, time.monotonic())
            sent_times[i] = sent_at[r.sock.fileno()][1]
            ep.register(r.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        deadline = time.monotonic() + read_timeout_s
        while True:
            if not sent_at or time.monotonic() >= deadline:
                break
            for fd, _ in ep.poll(max(0.0, min(0.05, deadline - time.monotonic()))):
                i, t_sent = sent_at.pop(fd)
                t = time.monotonic()
                ep.unregister(fd)
                try:
                    got = results[i].sock.recv(1, socket.MSG_PEEK)
                except OSError as exc:
                    name = _errno.errorcode.get(exc.errno, str(exc.errno))
                    errors[name] = errors.get(name, 0) + 1
                    continue
                if got:
                    first[i] = (t - t_sent) * 1e3
                else:
                    errors["EOF"] = errors.get("EOF", 0) + 1
    return first, errors, sent_times


def summary(b: dict) -> list[str]:
    """The run in a few sentences; every count that varies from run to run is written "N of TOTAL" or "+N"."""
    n = b["count"]
    c, s, k = b["client"], b["server"], b["counters"]["during_connects"]
    outcomes = {o: c["outcomes"].count(o) for o in ("connected", "timed_out", "reset", "refused")}
    fast = sum(1 for o, h in zip(c["outcomes"], c["handshake_ms"]) if o == "connected" and h is not None and h < 500)
    answered = sum(t is not None for t in c["first_byte_ms"])
    lines = [
        f"tcp_syncookies={b['sysctls']['tcp_syncookies']}, tcp_abort_on_overflow="
        f"{b['sysctls']['tcp_abort_on_overflow']}: {n} connects at once to listen({b['backlog']}), "
        f"one accept() every {b['interval_s'] * 1e3:g} ms",
        "  client: " + ", ".join(f"{v} of {n} {o}" for o, v in outcomes.items() if v or o != "refused")
        + f"; {fast} of {n} connected within 500 ms",
        f"  server: accepted {s['accepted_during_connects']} of {n}; "
        f"{s['connected_but_not_accepted']} of {n} clients are 'connected' but unknown to the server",
        "  kernel (TcpExt, this namespace): " + ", ".join(f"{name} +{v}" for name, v in list(k.items())[:4]),
        "                                   " + ", ".join(f"{name} +{v}" for name, v in list(k.items())[4:]),
        f"  then a request on each connected socket: first byte of the answer for {answered} of {n} "
        f"within {b['read_timeout_s'] * 1e3:.0f} ms",
    ]
    return lines
