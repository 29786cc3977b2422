"""Notebook 07's helper: the accept-queue burst seen by a real nginx running inside the burst's lab namespace.

The burst of :mod:`nbconn.experiments.acceptq` sends ``count`` connects at once to a listener with ``listen(backlog)``
whose acceptor takes one connection every ``interval_s``.  Here the ``count`` clients are nginx's: as many
requests arrive at a real nginx 1.22.1 (:class:`nbconn.nginx.runner.Nginx` with ``netns=``) at once, and nginx makes
one upstream connect per request to that listener, in the same namespace, so its connects meet the same full
queues and the namespace's syncookie settings.  What nginx saw is read from its access log, where it writes
it: ``$upstream_connect_time`` (from the connect's start until ngx_http_upstream_send_request runs after the
connect completed) and ``$upstream_header_time`` (until the response header was read).

:class:`TimedNginx` only adds those two variables (and ``$request_time``) to nbconn.nginx.runner's access-log
format; everything else -- the config, the checks, the guard that ends nginx with its owner -- is
nbconn.nginx.runner's.
"""

from __future__ import annotations

import selectors
import socket
import time

from . import acceptq
from ..lab import netstat
from ..nginx.runner import LOG_FORMAT, Nginx

#: the fields TimedNginx's access log adds after nbconn.nginx.runner's
TIMES = "$upstream_header_time|$request_time"


class TimedNginx(Nginx):
    """nbconn.nginx.runner.Nginx whose access log also holds $upstream_header_time and $request_time (see
    :meth:`timings`; nbconn.nginx.runner's own ``access_log()`` does not read this format)."""

    def config(self) -> str:
        text = super().config()
        plain = f"log_format nbconn '{LOG_FORMAT}';"
        if plain not in text:  # nbconn.nginx.runner changed its format: say so rather than log something else
            raise RuntimeError(f"nbconn.nginx.runner's config no longer holds {plain!r}")
        return text.replace(plain, f"log_format nbconn '{LOG_FORMAT}|{TIMES}';")

    def timings(self) -> list[dict]:
        """One dict per request nginx finished: status, upstream_status, connect_s, header_s, request_s
        (seconds; None where nginx wrote "-": no connect made, or no header read)."""
        import os

        def seconds(text: str):
            last = text.split(",")[-1].strip()  # the last try's (one peer here: the only one)
            return None if last == "-" else float(last)

        out = []
        with open(os.path.join(self.prefix, "access.log")) as f:
            for line in f:
                status, _addr, ctime, ustatus, htime, rtime = line.rstrip("\n").split("|")
                out.append({"status": status, "upstream_status": ustatus.split(",")[-1].strip(),
                            "connect_s": seconds(ctime), "header_s": seconds(htime), "request_s": float(rtime)})
        return out


def _requests_at_once(ns, port: int, count: int, timeout_s: float) -> int:
    """``count`` HTTP/1.0 requests to nginx's listener inside ``ns``, all sent before any answer is read;
    returns how many answers began with "HTTP/".  Bounded: ``timeout_s`` in all."""
    socks, answers = [], {}
    try:
        for _ in range(count):
            s = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(timeout_s)
            s.connect(("127.0.0.1", port))  # nginx's listen backlog (511) holds them all
        for s in socks:
            s.sendall(b"GET / HTTP/1.0\r\nHost: nbconn\r\n\r\n")
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            for s in socks:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                answers[s.fileno()] = b""
            open_ = len(socks)
            while True:  # (not `while <condition>:`, tests/test_interrupt_coverage.py says why)
                if not open_ or time.monotonic() >= deadline:
                    break
                for key, _ in sel.select(min(0.5, max(0.0, deadline - time.monotonic()))):
                    try:
                        chunk = key.fileobj.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    if chunk and len(answers[key.fd]) < 65536:
                        answers[key.fd] += chunk
                        continue
                    sel.unregister(key.fileobj)
                    open_ -= 1
        return sum(a.startswith(b"HTTP/") for a in answers.values())
    finally:
        for s in socks:
            s.close()


def _error_lines(ng) -> list[str]:
    return [f"[{e.level}] {e.message}" for e in ng.error_log() if e.level not in ("info", "notice")]


def nginx_burst(ns, *, count: int = 100, backlog: int = 8, interval_s: float = 0.005,
                connect_timeout_s: float = 5.0, read_timeout_s: float = 10.0) -> dict:
    """``count`` requests at once through a real nginx inside ``ns`` (a lab namespace) to a listener there
    with ``listen(backlog)`` and one accept() every ``interval_s``.  Returns nginx's timings (one per request,
    from its access log), how many answers the clients got, what the listener accepted and the namespace's
    TcpExt deltas.  nginx's connect timer is ``connect_timeout_s`` (longer than the SYN resend at ~1 s, so
    the kernel's queues, not the timer, decide), its read timer ``read_timeout_s``; ``errors``: its error-log
    lines above notice, as "[level] message"."""
    from ..validate import integer, number

    # checked before any socket or process exists; nginx needs two connections per request (the client's and
    # the upstream's), so count is held to what worker_connections below allows
    count = integer("count", count, 1, 500)
    backlog = integer("backlog", backlog, 0, 4096)
    interval_s = number("interval_s", interval_s, 0.0005, 1.0)
    connect_timeout_s = number("connect_timeout_s", connect_timeout_s, 0.05, 30.0)
    read_timeout_s = number("read_timeout_s", read_timeout_s, 0.05, 30.0)
    if not (callable(getattr(ns, "socket", None)) and callable(getattr(ns, "read_netstat", None))):
        raise TypeError(f"ns must be a lab namespace (nbconn.lab.namespace()), got {ns!r}")
    keys = ("ListenOverflows", "ListenDrops", "TCPReqQFullDoCookies", "TCPReqQFullDrop", "SyncookiesSent",
            "SyncookiesRecv", "SyncookiesFailed")
    before = ns.read_netstat()
    with acceptq._Server(ns, backlog, interval_s) as server:
        with TimedNginx([f"127.0.0.1:{server.port}"], netns=ns, connect_timeout=connect_timeout_s,
                        read_timeout=read_timeout_s, next_upstream=(), worker_connections=2 * count + 16) as ng:
            answered = _requests_at_once(ns, ng.port, count, connect_timeout_s + read_timeout_s + 5.0)
            time.sleep(0.05)  # nginx writes the access-log line as it finalizes the request
            timings = ng.timings()
            errors = _error_lines(ng)
        accepted = len(server.accepted)
    after = ns.read_netstat()
    return {"count": count, "backlog": backlog, "interval_s": interval_s, "answered": answered,
            "accepted": accepted, "timings": timings, "errors": errors,
            "tcpext": netstat.delta(before, after, keys),
            "sysctls": {name: ns.sysctl(f"net.ipv4.{name}") for name in ("tcp_syncookies", "tcp_abort_on_overflow")}}
