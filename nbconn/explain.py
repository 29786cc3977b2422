"""Small live demonstrations and tables for the notebooks.

The notebooks keep their code cells short: one call here, one idea on the
screen.  Each function runs a real experiment on loopback (or AF_UNIX) and
returns a :class:`Table` -- shown as HTML in JupyterLab and as aligned text
elsewhere -- so what a reader sees is what *their* kernel did.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import os
import platform
import select
import socket
import subprocess
import struct
import sys
import termios
import time

from . import systools, validate
from .errors import errno_name
from .strace import format_ns as duration  # the one duration formatter: µs, ms from 1 ms, s from 1 s
from .loop import event_names


_FIONBIO_ON = struct.pack("i", 1)


def kernel() -> str:
    """The running kernel's release, e.g. ``6.18.44``: every kernel claim in the notebooks names it."""
    return platform.release()


class Table:
    """Rows with headers; ``_repr_html_`` for JupyterLab, ``repr`` as aligned text."""

    def __init__(self, headers, rows, *, title: str | None = None, highlight=None) -> None:
        self.headers = list(headers)
        self.rows = [[str(c) for c in row] for row in rows]
        self.title = title
        self.highlight = highlight or (lambda row: False)

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [self.title] if self.title else []
        out += [line(self.headers), line(["-" * w for w in widths])]
        out += [line(r) + ("   <-" if self.highlight(r) else "") for r in self.rows]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in self.headers)
        body = []
        for r in self.rows:
            style = " style='background:#fff3cd'" if self.highlight(r) else ""
            cells = "".join(f"<td style='text-align:left'><code>{html.escape(c)}</code></td>" for c in r)
            body.append(f"<tr{style}>{cells}</tr>")
        caption = f"<caption style='text-align:left'>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- step 2 of the five: options ------------------------------------------------------

def _sysctl(name: str) -> str:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def options_table(result) -> Table:
    """Requested vs effective socket options of one Result; rows the kernel changed are marked."""
    rows = [[name, repr(result.requested.get(name)), repr(value),
             "yes" if value != result.requested.get(name) else "no"]
            for name, value in result.effective.items()]
    return Table(["option", "requested", "effective (getsockopt)", "changed by the kernel"], rows,
                 title="step 2: what was asked for, and what the kernel kept",
                 highlight=lambda r: r[3] == "yes")


def rcvbuf_readback(values=(1024, 4096, 65536, 1 << 20, 1 << 24)) -> Table:
    """SO_RCVBUF set to each value and read back on a fresh TCP socket, next to net.core.rmem_max."""
    rmem_max = int(_sysctl("net.core.rmem_max"))
    rows = []
    for v in values:
        with socket.socket() as s:
            default = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, v)
            got = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if got == 2 * v:
            rule = "doubled"
        elif got == 2 * rmem_max:
            rule = "capped: 2 x rmem_max"
        elif got > 2 * v:
            rule = "raised to the kernel's minimum"
        else:
            rule = "other"
        rows.append([v, got, rule, default])
    return Table(["setsockopt(SO_RCVBUF)", "getsockopt(SO_RCVBUF)", "rule", "default before"], rows,
                 title=f"net.core.rmem_max = {rmem_max}")


# -- step 3 of the five: non-blocking -------------------------------------------------

_METHOD_SNIPPETS = {
    "ioctl(FIONBIO)": "import fcntl, termios, struct; fcntl.ioctl(s.fileno(), termios.FIONBIO, struct.pack('i', 1))",
    "fcntl(O_NONBLOCK)": "import fcntl, os; fl = fcntl.fcntl(s.fileno(), fcntl.F_GETFL); "
                         "fcntl.fcntl(s.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)",
    "sock.setblocking(False)": "s.setblocking(False)",
}


def nonblocking_syscalls() -> Table | str:
    """Run each way of making a socket non-blocking under strace and show the syscalls it made."""
    strace = systools.find("strace")
    if strace is None:
        return "strace is not installed here (apt-get install strace): this demonstration is skipped."
    rows = []
    for label, snippet in _METHOD_SNIPPETS.items():
        code = f"import socket\ns = socket.socket()\nfd = s.fileno()\n{snippet}\n"
        proc = subprocess.run([strace, "-qq", "-e", "trace=ioctl,fcntl", sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=30)
        calls = [line.split(" = ")[0].strip() for line in proc.stderr.splitlines()
                 if ("FIONBIO" in line or "F_GETFL" in line or "F_SETFL" in line)]
        rows.append([label, "; ".join(calls) or "(none)"])
    return Table(["Python call", "syscalls strace saw"], rows, title="three ways to make a socket non-blocking")


def blocking_vs_nonblocking(target, *, timeout_s: float = 0.5) -> Table:
    """connect() to ``target`` (a black hole) in blocking mode, bounded by SO_SNDTIMEO, and non-blocking."""
    host, port = target.rsplit(":", 1)
    rows = []
    with socket.socket() as s:  # blocking; SO_SNDTIMEO bounds how long connect() may sleep
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))
        t0 = time.monotonic()
        err = s.connect_ex((host, int(port)))
        rows.append(["blocking, SO_SNDTIMEO", duration((time.monotonic() - t0) * 1e9), errno_name(err) or "0"])
    with socket.socket() as s:
        s.setblocking(False)
        t0 = time.monotonic()
        err = s.connect_ex((host, int(port)))
        rows.append(["non-blocking", duration((time.monotonic() - t0) * 1e9), errno_name(err) or "0"])
    return Table(["connect() mode", "time inside connect()", "returned"], rows,
                 title="connect() to a host that drops SYNs")


def _run_delay_ns() -> int | None:
    """This thread's total time spent runnable but waiting for a CPU (schedstat's 2nd field), or None."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def blocking_connect_lateness(target, *, timeouts_s=(0.5, 1.0), repeat: int = 3) -> Table:
    """How late a blocking connect() to ``target`` (a black hole) gives up after its SO_SNDTIMEO.

    The wait is an ordinary kernel timer (``inet_wait_for_connect`` sleeps in
    ``wait_woken``/``schedule_timeout``, net/ipv4/af_inet.c), and the timer wheel rounds
    an expiry *up* to its level's granularity (``calc_index``, kernel/time/timer.c): a
    0.5 s or 1 s timer sits on level 1, 8 jiffies wide (32 ms at HZ=250).  So it is never
    early and may be up to a level's granularity + 1 jiffy late
    (:func:`nbconn.synretry.wheel_lateness_s`).  On a busy machine the woken thread may
    then wait for a CPU: that time is read from the thread's schedstat (run_delay) around
    the call and taken out, so the third column is the timer's own lateness.
    Each timeout is measured ``repeat`` times; the row gives the smallest and largest.
    """
    from .synretry import config_hz, wheel_lateness_s

    if not 1 <= repeat <= 20:
        raise ValueError(f"repeat={repeat!r} is outside 1..20")
    host, port = target.rsplit(":", 1)
    hz = config_hz()
    rows = []
    for timeout_s in timeouts_s:
        late, timer_late = [], []
        for _ in range(repeat):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))
                waited0 = _run_delay_ns()
                t0 = time.perf_counter_ns()
                s.connect_ex((host, int(port)))
                took = (time.perf_counter_ns() - t0) / 1e9
                waited1 = _run_delay_ns()
            late.append(took - timeout_s)
            if waited0 is not None and waited1 is not None:
                timer_late.append(took - timeout_s - (waited1 - waited0) / 1e9)
        spread = lambda xs: f"{min(xs) * 1e3:.1f} ms to {max(xs) * 1e3:.1f} ms" if xs else "n/a"  # noqa: E731
        bound = (f"0 ms to {wheel_lateness_s(timeout_s, hz) * 1e3:.0f} ms (HZ={hz})" if hz
                 else "unknown: CONFIG_HZ not readable")
        rows.append([f"{timeout_s:g} s", spread(late), spread(timer_late), bound])
    return Table(["SO_SNDTIMEO", f"late by (min to max of {repeat})", "less the time waiting for a CPU",
                  "timer wheel's bound"], rows,
                 title="a blocking connect() gives up after its timeout, on the timer wheel's grid")


def rcvbuf_autotuning(total_bytes: int = 16 << 20, rcvbufs=(None, 65536)) -> Table:
    """Receive ``total_bytes`` over loopback with and without SO_RCVBUF; SO_RCVBUF read back before and after.

    The kernel grows a TCP socket's receive buffer as data arrives (tcp_rcv_space_adjust,
    net/ipv4/tcp_input.c) unless the application fixed it: setting SO_RCVBUF sets
    SOCK_RCVBUF_LOCK, and the autotuning leaves such a socket alone.
    """
    import threading

    rows = []
    for rcvbuf in rcvbufs:
        with socket.create_server(("127.0.0.1", 0)) as srv, socket.socket() as c:
            if rcvbuf:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            before = c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            c.settimeout(10.0)
            c.connect(srv.getsockname())
            peer, _ = srv.accept()

            def send(peer=peer) -> None:
                chunk, sent = b"x" * 65536, 0
                try:
                    while sent < total_bytes:
                        sent += peer.send(chunk)
                finally:
                    peer.close()

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            got = 0
            while got < total_bytes:
                data = c.recv(1 << 16)
                if not data:
                    break
                got += len(data)
            sender.join(10.0)
            after = c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        grew = "unchanged" if after == before else f"{after / before:.1f}x larger"
        rows.append(["not set (default)" if rcvbuf is None else f"setsockopt(SO_RCVBUF, {rcvbuf})",
                     before, grew, f"{got >> 20} MiB"])
    return Table(["SO_RCVBUF", "read back before connect()", "after the transfer", "received"],
                 rows, title=f"receive-buffer autotuning, Linux {kernel()} (net.ipv4.tcp_moderate_rcvbuf = "
                             f"{_sysctl('net.ipv4.tcp_moderate_rcvbuf')}, tcp_rmem = "
                             f"{' '.join(_sysctl('net.ipv4.tcp_rmem').split())})")


def user_timeout_in_handshake(target, values_ms=(500, 1500, 2500), *, wait_s: float = 5.0) -> Table:
    """Non-blocking connects to ``target`` (a black hole) with TCP_USER_TIMEOUT set: when SO_ERROR says ETIMEDOUT."""
    host, port = target.rsplit(":", 1)
    rows = []
    for ms in values_ms:
        with socket.socket() as s, select.epoll() as ep:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
            fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
            ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLET)
            t0 = time.monotonic_ns()
            err = s.connect_ex((host, int(port)))
            events = ep.poll(wait_s)
            waited = time.monotonic_ns() - t0
            so_error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        rows.append([f"{ms} ms", errno_name(err) or "0", event_names(events[0][1]) if events else "(nothing)",
                     duration(waited), errno_name(so_error) or "0"])
    return Table(["TCP_USER_TIMEOUT", "connect()", "epoll_wait reported", "after", "SO_ERROR"], rows,
                 title=f"TCP_USER_TIMEOUT during the handshake, Linux {kernel()} (tcp_syn_retries = "
                       f"{_sysctl('net.ipv4.tcp_syn_retries')}, tcp_syn_linear_timeouts = "
                       f"{_sysctl('net.ipv4.tcp_syn_linear_timeouts')})")


def nginx_version() -> str | None:
    """``nginx/1.22.1`` from ``nginx -v`` of this machine's nginx, or None when there is none."""
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(path, os.X_OK):
            proc = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
            text = (proc.stderr or proc.stdout).strip()
            return text.split("version: ", 1)[-1] if text else None
    return None


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


# -- step 4 of the five: epoll ----------------------------------------------------------

def edge_vs_level(rounds: int = 3) -> Table:
    """One writable socket registered twice, edge-triggered and level-triggered; ``rounds`` epoll_waits.

    Each row is one epoll_wait and what it returned for each registration: the event
    mask exactly as the kernel reported it.  (EPOLLET is a way of *registering*; it is
    never part of what epoll_wait reports.)
    """
    a, b = socket.socketpair()
    dup = a.dup()
    rows = []
    try:
        with select.epoll() as ep:
            ep.register(a.fileno(), select.EPOLLOUT | select.EPOLLET)
            ep.register(dup.fileno(), select.EPOLLOUT)
            for i in range(1, rounds + 1):
                got = dict(ep.poll(0.01))
                rows.append([f"epoll_wait #{i}",
                             event_names(got[a.fileno()]) if a.fileno() in got else "(not reported)",
                             event_names(got[dup.fileno()]) if dup.fileno() in got else "(not reported)"])
    finally:
        for s in (a, b, dup):
            s.close()
    return Table(["call", "registered EPOLLOUT|EPOLLET (edge)", "registered EPOLLOUT (level)"], rows,
                 title="one writable socket, registered twice: what each epoll_wait returned")


_NGINX_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


def _nginx_handlers(mask: int) -> str:
    """What ngx_epoll_process_events runs for one reported mask (ngx_epoll_module.c:862-930, 1.22.1).

    EPOLLERR or EPOLLHUP is widened to IN|OUT; EPOLLIN runs the read handler first (EPOLLRDHUP
    sets rev->pending_eof), then EPOLLOUT runs the write handler.
    """
    if mask & (select.EPOLLERR | select.EPOLLHUP):
        mask |= select.EPOLLIN | select.EPOLLOUT
    ran = []
    if mask & select.EPOLLIN:
        ran.append("read handler" + (" (pending_eof)" if mask & select.EPOLLRDHUP else ""))
    if mask & select.EPOLLOUT:
        ran.append("write handler")
    return ", then ".join(ran) or "-"


def _loopback_pair(wait_s: float):
    """A connected loopback TCP pair: (client, server); the client non-blocking, not yet registered."""
    with socket.create_server(("127.0.0.1", 0), backlog=1) as listener:
        listener.settimeout(wait_s)
        client = socket.socket()
        try:
            client.settimeout(wait_s)
            client.connect(listener.getsockname())
            client.setblocking(False)
            server, _ = listener.accept()
        except BaseException:
            client.close()
            raise
    return client, server


def edge_triggered_wakeups(*, wait_s: float = 1.0, quiet_s: float = 0.05) -> Table:
    """nginx's registration (IN|OUT|RDHUP|ET) on a connected loopback socket: what each epoll_wait returns.

    Edge-triggered is not "reported when writability becomes true".  The socket's wakeups
    call ``ep_poll_callback`` (fs/eventpoll.c), which queues an EPOLLET item whenever the
    wakeup's key matches any bit of its mask -- data arriving wakes with EPOLLIN -- and
    epoll_wait then polls the socket's *whole* state (``ep_send_events`` -> ``ep_item_poll``),
    so one byte arriving on a writable socket comes back as EPOLLIN|EPOLLOUT, and nginx runs
    its write handler again.  Between wakeups an EPOLLET item is not reported, even while
    unread data waits.  Events are waited for (up to ``wait_s``); "nothing" rows wait ``quiet_s``.
    """
    client, server = _loopback_pair(wait_s)
    rows = []
    try:
        with select.epoll() as ep:
            ep.register(client.fileno(), _NGINX_MASK)

            def step(what: str, timeout: float) -> None:
                got = 0
                for _, mask in ep.poll(timeout):
                    got |= mask
                rows.append([what, event_names(got) if got else "(nothing)", _nginx_handlers(got) if got else "-"])

            step("EPOLL_CTL_ADD on the connected socket, epoll_wait", wait_s)
            step("epoll_wait again: nothing happened", quiet_s)
            server.send(b"x")
            step("the peer sends 1 byte; epoll_wait", wait_s)
            step("epoll_wait again: the byte is still unread", quiet_s)
            server.send(b"y")
            step("the peer sends 1 more byte; epoll_wait", wait_s)
            server.shutdown(socket.SHUT_WR)
            step("the peer shuts down its side (FIN); epoll_wait", wait_s)
    finally:
        client.close()
        server.close()
    return Table(["what happened", "epoll_wait returned", "nginx 1.22.1 runs"], rows,
                 title="EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET on a connected socket: every matching wakeup is reported")


def close_with_a_duplicate(*, wait_s: float = 1.0, quiet_s: float = 0.05) -> Table:
    """close() takes a socket out of epoll only when its open file description goes.

    epoll registers the pair (descriptor number, open file description); the kernel
    removes the item when the *file* is released (``eventpoll_release``, called from the
    last ``fput``), not when one descriptor is closed.  With a dup() (or a forked child)
    still holding the file, the item stays and keeps reporting the old, closed number.
    """
    rows = []
    for dup in (False, True):
        client, server = _loopback_pair(wait_s)
        other = client.dup() if dup else None
        try:
            with select.epoll() as ep:
                fd = client.fileno()
                ep.register(fd, select.EPOLLIN | select.EPOLLET)
                client.close()  # close(fd): the registration goes only with the last reference
                server.send(b"x")
                got = ep.poll(wait_s if dup else quiet_s)
                shown = "; ".join(f"{event_names(m)}, for " + ("the closed descriptor" if n == fd else f"fd {n}")
                                  for n, m in got) or "(nothing)"
                rows.append(["a dup() still open" if dup else "no other descriptor", f"close({fd})", shown])
        finally:
            for s in (client, server, other):
                if s is not None:
                    s.close()
    return Table(["the socket's file also held by", "then", "epoll_wait after the peer sends 1 byte"], rows,
                 title="close() and an epoll registration")


def register_order(target, *, wait_s: float = 1.0) -> Table:
    """EPOLL_CTL_ADD before connect() (nginx's order) and after it: what the first epoll_wait reports.

    epoll_ctl(EPOLL_CTL_ADD) checks the descriptor's readiness when it is added
    (fs/eventpoll.c, ep_insert calls the file's poll), so a socket that is already
    writable is reported by the next epoll_wait even with EPOLLET: the order is not
    what makes the connect correct.
    """
    host, port = target.rsplit(":", 1)
    mask = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
    rows = []
    for order in ("ADD, then connect()", "connect(), then ADD"):
        with socket.socket() as s, select.epoll() as ep:
            fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
            if order.startswith("ADD"):
                ep.register(s.fileno(), mask)
            err = s.connect_ex((host, int(port)))
            if not order.startswith("ADD"):
                ep.register(s.fileno(), mask)
            t0 = time.perf_counter_ns()
            events = ep.poll(wait_s)
            waited = time.perf_counter_ns() - t0
            so_error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        rows.append([order, errno_name(err) or "0", event_names(events[0][1]) if events else "(nothing)",
                     duration(waited), so_error])
    return Table(["order", "connect()", "first epoll_wait reported", "epoll_wait took", "SO_ERROR"], rows,
                 title=f"EPOLL_CTL_ADD before and after connect() to {target}")


def one_registration(target, *, wait_s: float = 2.0) -> Table:
    """One EPOLL_CTL_ADD serves the whole connection: EPOLLOUT for the connect, later EPOLLIN for the reply.

    ``target`` is an HTTP peer (``lab.listening(http=True)``).  Every epoll_ctl this
    function makes is counted, so the table shows that no EPOLL_CTL_MOD was needed.
    """
    host, port = target.rsplit(":", 1)
    rows = []
    with socket.socket() as s, select.epoll() as ep:
        fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
        rows.append(["epoll_ctl(EPOLL_CTL_ADD, EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET)", "-"])
        err = s.connect_ex((host, int(port)))
        rows.append(["connect()", errno_name(err) or "0"])
        events = ep.poll(wait_s)
        rows.append(["epoll_wait", event_names(events[0][1]) if events else "(timed out)"])
        rows.append(["getsockopt(SO_ERROR)", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)])
        sent = s.send(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
        rows.append(["send() the request", f"{sent} bytes"])
        # The peer answers and closes: wait for both (bounded), so the row does not depend on whether the
        # reply and the FIN arrive in one wake-up or two.
        deadline = time.monotonic() + wait_s
        seen = 0
        while (seen & (select.EPOLLIN | select.EPOLLRDHUP)) != select.EPOLLIN | select.EPOLLRDHUP \
                and time.monotonic() < deadline:
            for _, mask in ep.poll(max(0.0, deadline - time.monotonic())):
                seen |= mask
        rows.append(["epoll_wait (until the reply and the peer's FIN)", event_names(seen) if seen else "(timed out)"])
        reply = s.recv(4096)
        rows.append(["recv()", reply.split(b"\r\n", 1)[0].decode(errors="replace")])
    return Table(["call (the only epoll_ctl is the first row)", "result"], rows,
                 title="one registration for the connection's life")


def rdhup_after_peer_close(target, *, wait_s: float = 2.0) -> str:
    """Connect to a peer that accepts and closes; return the epoll events reported once its FIN arrives."""
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait_s) as s, select.epoll() as ep:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
        deadline = time.monotonic() + wait_s
        seen = 0
        while time.monotonic() < deadline:
            for _, mask in ep.poll(0.05):
                seen |= mask
            if seen & select.EPOLLRDHUP:
                break
        return event_names(seen)


# -- step 5 of the five: connect() and SO_ERROR -----------------------------------------

# -- the code on the page, under strace ----------------------------------------------------

#: The syscalls an nginx 1.22.1 worker makes on its socket for one upstream connect that succeeds,
#: reduced like :func:`syscalls_on_the_socket` does (recorded with strace; notebook 10 runs it live).
NGINX_WORKER_CALLS = (("socket", "AF_INET"), ("ioctl", "FIONBIO"),
                      ("epoll_ctl", "EPOLL_CTL_ADD", "EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET"),
                      ("connect", "EINPROGRESS"), ("epoll_wait",), ("getsockopt", "SO_ERROR"), ("close",))

_STRACE_SET = "trace=socket,ioctl,fcntl,epoll_ctl,connect,epoll_wait,epoll_pwait,getsockopt,setsockopt,close"


def syscalls_on_the_socket(strace_text: str) -> list[tuple]:
    """The calls an strace shows on the first AF_INET stream socket, up to its close().

    Each call is reduced to its name and the argument the lesson is about -- ioctl's
    request, epoll_ctl's operation and mask, connect()'s errno, the option of
    getsockopt/setsockopt -- so two runs compare equal whatever their descriptors
    and ports.  ``epoll_wait`` counts when it follows the connect.
    """
    import re

    fd, calls = None, []
    for line in strace_text.splitlines():
        if fd is None:
            m = re.match(r"socket\(AF_INET, SOCK_STREAM\S*, \w+\)\s+= (\d+)", line)
            if m:
                fd = m.group(1)
                calls.append(("socket", "AF_INET"))
            continue
        if re.match(rf"(ioctl|getsockopt|setsockopt|connect|close|fcntl)\({fd}[,)]", line):
            name = line.split("(", 1)[0]
            args = line.split(", ")
            if name in ("ioctl", "fcntl"):
                calls.append((name, args[1].rstrip(")")))
            elif name in ("getsockopt", "setsockopt"):
                calls.append((name, args[2]))
            elif name == "connect":
                ret = line.rsplit("= ", 1)[1].split()
                calls.append((name, ret[1] if ret[0] == "-1" else ret[0]))
            else:
                calls.append((name,))
                break
        elif re.match(rf"epoll_ctl\(\d+, EPOLL_CTL_\w+, {fd},", line):
            mask = re.search(r"events=([\w|]+)", line)
            calls.append(("epoll_ctl", line.split(", ")[1]) + ((mask.group(1),) if mask else ()))
        elif line.startswith(("epoll_wait(", "epoll_pwait(")) and any(c[0] == "connect" for c in calls):
            calls.append(("epoll_wait",))
    return calls


def strace_python(code: str, *, timeout_s: float = 60.0) -> list[tuple]:
    """Run ``code`` in a fresh interpreter under strace; :func:`syscalls_on_the_socket` of what it saw."""
    strace = systools.find("strace")
    if strace is None:
        raise FileNotFoundError("strace is not installed here (apt-get install strace)")
    proc = subprocess.run([strace, "-qq", "-e", _STRACE_SET, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the traced interpreter failed: {proc.stderr[-500:]}")
    return syscalls_on_the_socket(proc.stderr)


def _shown(call: tuple | None) -> str:
    if call is None:
        return ""
    name, *args = call
    text = ", ".join(args).replace("EPOLL_CTL_", "").replace("EPOLL", "")
    return f"{name}({text})"


def strace_side_by_side(target) -> Table | str:
    """connect_nonb and nbconn.connect(nginx_exact=True) under strace against ``target``, next to nginx's worker."""
    host, port = target.rsplit(":", 1)
    try:
        plain = strace_python(f"from nbconn.connect_nonb import connect_nonb; connect_nonb({host!r}, {int(port)})")
        ours = strace_python(f"import nbconn; nbconn.connect({target!r}, nginx_exact=True)")
    except FileNotFoundError as exc:
        return f"{exc}: this comparison is skipped (the test suite runs it where strace exists)."
    worker = list(NGINX_WORKER_CALLS)
    rows = []
    for i in range(max(len(plain), len(ours), len(worker))):
        cells = [c[i] if i < len(c) else None for c in (plain, ours, worker)]
        rows.append([_shown(c) for c in cells] + ["yes" if cells[0] == cells[1] == cells[2] else "NO"])
    same = sum(r[3] == "yes" for r in rows)
    title = f"syscalls on the socket, in order: {same} of {len(rows)} rows identical in all three"
    return Table(["connect_nonb (this notebook)", "nbconn.connect(nginx_exact=True)",
                  "nginx 1.22.1 worker (recorded)", "same"], rows, title=title, highlight=lambda r: r[3] != "yes")


_EXTRAS = (
    ("getsockopt", "option read-back: getsockopt after each setsockopt",
     "to show what the kernel kept (notebook 01)"),
    ("tcp_info", "getsockopt(TCP_INFO) once connected, or when the timer ends the handshake",
     "the kernel's RTT estimate (notebook 08), or the SYNs sent before the timer fired"),
    ("unregister", "epoll_ctl(EPOLL_CTL_DEL) before close()",
     "nginx closes without it: the registration goes with the last reference to the open file (notebook 03)"),
)


def extras_beyond_nginx(result) -> Table:
    """The calls in ``result``'s trace that an nginx 1.22.1 worker would not make, with how many of each.

    The count column counts syscalls only, so the title's total is its sum.  SOCK_CLOEXEC
    is a flag on the socket() call nginx makes too: its row says whether the flag was set,
    and adds no call.
    """
    names = [s.name for s in result.steps]
    rows = [[what, names.count(name), why] for name, what, why in _EXTRAS]
    socket_call = next((s.call for s in result.steps if s.name == "socket"), "")
    rows.append(["SOCK_CLOEXEC flag on socket() (" + ("set" if "SOCK_CLOEXEC" in socket_call else "not set") + ")", 0,
                 "no extra call: a flag on nginx's own socket() (CPython's socket() always asks for it)"])
    return Table(["what nbconn adds", "extra syscalls", "why"], rows,
                 title=f"beyond nginx 1.22.1: {sum(r[1] for r in rows)} extra syscalls in this trace")


def _nginx_path(result) -> str:
    """nginx's codes for one attempt, each once: ``NGX_AGAIN -> NGX_OK``, ``NGX_DECLINED -> next peer (FT_ERROR)``."""
    codes = [result.ngx_connect]
    if result.ngx_decision and result.ngx_decision != result.ngx_connect:
        codes.append(result.ngx_decision)
    following = getattr(result, "ngx_next", None)
    if following:
        codes.append(f"next peer ({following.replace('NGX_HTTP_UPSTREAM_', '')})")
    return " -> ".join(str(c) for c in codes)


def connect_returns(targets: dict, *, repeat: int = 20, timeout: float = 1.0) -> Table:
    """For each labelled target: what connect() returned over ``repeat`` tries, and nginx's verdict."""
    from .api import connect_many

    rows = []
    for label, target in targets.items():
        results = connect_many([target] * repeat, concurrency=1, timeout=timeout)
        returned: dict = {}
        for r in results:
            key = "0" if r.connect_returned == 0 else str(r.connect_returned)
            returned[key] = returned.get(key, 0) + 1
        first = results[0]
        rows.append([label, ", ".join(f"{k} {v}/{repeat}" for k, v in returned.items()),
                     first.outcome + (f" ({first.errno})" if first.errno else ""),
                     _nginx_path(first), first.ngx_level or "-"])
    return Table(["target", "connect() returned", "decided", "nginx", "log level"], rows,
                 title="what this kernel's connect() answers")


_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 7: "CLOSE"}


def local_port_exhaustion(*, ports: int = 4, upstreams: int = 2, limit: int = 64) -> Table:
    """Connects from a lab namespace whose ``ip_local_port_range`` holds ``ports`` ports, until one fails.

    ``upstreams`` listeners inside the namespace are connected to in turn, every connection
    kept open, three ways: no local address (nginx without ``proxy_bind``); ``proxy_bind
    127.0.0.1`` as nginx 1.22.1 does it, IP_BIND_ADDRESS_NO_PORT then bind(), so the port is
    chosen at connect() and only the 4-tuple must be unique (``__inet_hash_connect``); and a
    bind() that picks the port itself, which reserves it for every destination
    (``inet_csk_get_port``).  The range is set after the listeners took their ports, to
    ``ports`` ports none of them holds.  At most ``limit`` connects per row.
    """
    from . import api
    from .lab import namespace, peers

    ports = validate.integer("ports", ports, 1, 64)
    upstreams = validate.integer("upstreams", upstreams, 1, 8)
    limit = validate.integer("limit", limit, 1, 1024)
    ways = (("none", {}),
            ("127.0.0.1, IP_BIND_ADDRESS_NO_PORT then bind() (nginx 1.22.1)",
             {"bind": "127.0.0.1", "bind_address_no_port": True}),
            ("127.0.0.1, bind() picks the port", {"bind": "127.0.0.1", "bind_address_no_port": False}))
    rows = []
    for label, options in ways:
        with namespace() as ns, contextlib.ExitStack() as stack:
            targets = [stack.enter_context(peers.listening(hold=True, source=ns)) for _ in range(upstreams)]
            taken = {int(t.rsplit(":", 1)[1]) for t in targets}
            low = next(p for p in range(40000, 60000, ports) if not taken & set(range(p, p + ports)))
            ns.set_sysctl("net.ipv4.ip_local_port_range", f"{low} {low + ports - 1}")
            used: dict = {}
            failed = "none failed"
            with ns.using():
                for i in range(limit):
                    res = stack.enter_context(api.connect(targets[i % upstreams], keep=True, timeout=1.0, **options))
                    if res.outcome != "connected":
                        call = next(s.name for s in reversed(res.steps) if s.name in ("bind", "connect"))
                        failed = f"{call}(): {res.errno} -> {res.ngx_connect}"
                        break
                    port = res.sock.getsockname()[1]
                    used[port] = used.get(port, 0) + 1
        uses = sorted(set(used.values()))
        rows.append([label, sum(used.values()),
                     f"{len(used)}, each used " + " or ".join(map(str, uses)) + (" time" if uses == [1] else " times"),
                     failed])
    return Table(["proxy_bind", "connections kept", "local ports", "the next connect"], rows,
                  title=f"ip_local_port_range of {ports} ports, {upstreams} upstreams, every connection kept open")


def tcp_state(sock: socket.socket) -> str:
    """The kernel's TCP state of ``sock`` (tcpi_state, the first byte of TCP_INFO)."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return _TCP_STATES.get(state, str(state))


def right_after_connect(targets: dict) -> Table:
    """For each labelled TCP target: what connect() returned, and the socket's TCP state the moment it returned.

    Nothing is waited for and SO_ERROR is not read: the state is what the kernel had
    already done by the time the call came back to user space.
    """
    rows = []
    for label, target in targets.items():
        host, port = target.rsplit(":", 1)
        with socket.socket() as s:
            fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
            t0 = time.perf_counter_ns()
            err = s.connect_ex((host, int(port)))
            took = time.perf_counter_ns() - t0
            state = tcp_state(s)
        rows.append([label, errno_name(err) or "0", duration(took), state])
    return Table(["target", "connect() returned", "inside connect()", "TCP state right after"], rows,
                 title=f"non-blocking connect() on loopback, Linux {kernel()}")


def other_ways_to_learn(targets: dict, *, wait_s: float = 0.2) -> Table:
    """UNP 16.3's other ways to learn a pending connect's outcome, after epoll_wait (or its timeout).

    For each target: getpeername(), then connect() again, then connect() a third time,
    then SO_ERROR -- all on the same socket, in that order, so the table also shows
    what each call *consumes*.
    """
    rows = []
    for label, target in targets.items():
        host, port = target.rsplit(":", 1)
        addr = (host, int(port))
        with socket.socket() as s, select.epoll() as ep:
            fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
            s.connect_ex(addr)
            events = ep.poll(wait_s)
            try:
                s.getpeername()
                peer = "an address"
            except OSError as exc:
                peer = errno_name(exc.errno)
            again = errno_name(s.connect_ex(addr)) or "0"
            third = errno_name(s.connect_ex(addr)) or "0"
            so_error = errno_name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) or "0"
        rows.append([label, event_names(events[0][1]) if events else "(nothing yet)", peer, again, third, so_error])
    return Table(["target", "epoll_wait", "getpeername()", "connect() again", "and again", "then SO_ERROR"],
                 rows, title=f"other ways to learn the outcome, Linux {kernel()}")


def eintr_during_wait(target, *, wait_s: float = 0.3, signal_after_s: float = 0.05) -> Table:
    """A signal arrives while epoll_wait waits for a pending connect (``target``: a black hole).

    CPython retries a system call interrupted by a signal whose handler returns
    (PEP 475), recomputing the timeout, so ``epoll.poll`` still waits its whole time;
    in C, epoll_wait returns -1/EINTR and the caller must loop (nginx's event loop does).
    """
    import signal

    host, port = target.rsplit(":", 1)
    caught = []
    previous = signal.signal(signal.SIGALRM, lambda *_: caught.append(time.monotonic()))
    try:
        with socket.socket() as s, select.epoll() as ep:
            fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
            s.connect_ex((host, int(port)))
            t0 = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, signal_after_s)
            events = ep.poll(wait_s)
            waited = time.monotonic() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    rows = [["signal (SIGALRM) delivered after", duration((caught[0] - t0) * 1e9) if caught else "(none)"],
            ["epoll.poll(timeout) asked to wait", duration(wait_s * 1e9)],
            ["epoll.poll returned after", duration(waited * 1e9)],
            ["events", event_names(events[0][1]) if events else "none: the connect timer's time is up"]]
    return Table(["", "measured"], rows, title="EINTR: a signal during the wait")


def soft_error_while_connecting(*, syncnt: int = 1, first_read_s: float = 1.5, end_s: float = 10.0) -> Table:
    """SO_ERROR returns a *soft* error while a connect is still pending, and the connect may end with it.

    In a lab namespace a route ``2001:db8::/32 dev lo`` lets a SYN leave and vanish (the
    namespace does not forward), so the connect stays in SYN_SENT.  Then IPv6 is switched off
    on ``lo``, which takes the route away: the next SYN resend finds no route, and
    ``inet6_sk_rebuild_header`` (net/ipv6/af_inet6.c) stores ENETUNREACH in ``sk_err_soft``
    -- no wakeup, the state stays SYN_SENT.  ``getsockopt(SO_ERROR)`` returns ``sk_err``, or
    when that is 0 ``sk_err_soft``, and clears what it returned (``sk_getsockopt``,
    net/core/sock.c).  When the kernel gives up (``TCP_SYNCNT`` = ``syncnt``),
    ``tcp_write_err`` (net/ipv4/tcp_timer.c) reports ``sk_err_soft`` if one is pending,
    ETIMEDOUT otherwise.  Raises RuntimeError where namespaces or IPv6 are not available.
    """
    import errno as _errno

    from .lab import namespace

    syncnt = validate.integer("syncnt", syncnt, 1, 3)
    name = lambda e: _errno.errorcode.get(e, str(e)) if e else "0"  # noqa: E731
    rows = []
    with namespace(routes=["2001:db8::/32 dev lo"]) as ns:
        if ns.sysctl("net.ipv6.conf.lo.disable_ipv6") != "0":
            raise RuntimeError("IPv6 is off in the lab namespace: the route this needs cannot exist")
        with ns.socket(socket.AF_INET6, socket.SOCK_STREAM) as s, select.epoll() as ep:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, syncnt)
            fcntl.ioctl(s.fileno(), termios.FIONBIO, _FIONBIO_ON)
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
            err = s.connect_ex(("2001:db8::1", 80))
            t0 = time.monotonic()
            rows.append(["connect() to 2001:db8::1 (the SYN leaves, nothing answers)", name(err), tcp_state(s), "-"])
            ns.set_sysctl("net.ipv6.conf.lo.disable_ipv6", "1")  # the route goes with lo's IPv6
            events = ep.poll(first_read_s)  # past the first SYN resend (1 s): nothing to report
            rows.append([f"IPv6 off on lo; epoll_wait({first_read_s:g} s), past the first resend",
                         event_names(events[0][1]) if events else "(nothing)", tcp_state(s),
                         name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))])
            rows.append(["getsockopt(SO_ERROR) again at once", "-", tcp_state(s),
                         name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))])
            events = ep.poll(max(0.0, end_s - (time.monotonic() - t0)))
            rows.append([f"the kernel gives up (TCP_SYNCNT {syncnt}), after {duration((time.monotonic() - t0) * 1e9)}",
                         event_names(events[0][1]) if events else "(nothing yet)", tcp_state(s),
                         name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))])
    return Table(["moment", "connect() / epoll_wait", "TCP state", "SO_ERROR"], rows,
                 title="a soft error: SO_ERROR says ENETUNREACH while the connect is still pending")


def so_error_twice(target, *, wait_s: float = 2.0) -> Table:
    """Non-blocking connect, wait for epoll, then read SO_ERROR twice: the first read clears it."""
    host, port = target.rsplit(":", 1)
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family) as s, select.epoll() as ep:
        fcntl.ioctl(s.fileno(), termios.FIONBIO, struct.pack("i", 1))
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
        err = s.connect_ex((host.strip("[]"), int(port)))
        events = ep.poll(wait_s)
        first = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        second = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    mask = event_names(events[0][1]) if events else "(timed out)"
    rows = [["connect()", errno_name(err) if err else "0"],
            ["epoll_wait events", mask],
            ["getsockopt(SO_ERROR) #1", f"{first} ({errno_name(first) or 'no error'})"],
            ["getsockopt(SO_ERROR) #2", f"{second} ({errno_name(second) or 'no error'})"]]
    return Table(["call", "result"], rows, title=f"SO_ERROR against {target}")


__all__ = ["Table", "duration", "kernel", "options_table", "rcvbuf_readback", "rcvbuf_autotuning",
           "user_timeout_in_handshake", "nginx_version", "nonblocking_syscalls", "blocking_vs_nonblocking",
           "edge_vs_level", "register_order", "one_registration", "rdhup_after_peer_close", "tcp_state",
           "right_after_connect", "connect_returns", "NGINX_WORKER_CALLS", "syscalls_on_the_socket", "strace_python",
           "strace_side_by_side", "extras_beyond_nginx", "other_ways_to_learn", "eintr_during_wait", "so_error_twice"]
