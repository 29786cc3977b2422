"""Small live demonstrations and tables for the notebooks.

The notebooks keep their code cells short: one call here, one idea on the
screen.  Each function runs a real experiment on loopback (or AF_UNIX) and
returns a :class:`Table` -- shown as HTML in JupyterLab and as aligned text
elsewhere -- so what a reader sees is what *their* kernel did.
"""

from __future__ import annotations

import fcntl
import html
import select
import shutil
import socket
import subprocess
import struct
import sys
import termios
import time

from .errors import errno_name
from .loop import event_names


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


# -- seed step 2: options -----------------------------------------------------------

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
                 title="seed step 2: what was asked for, and what the kernel kept",
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


# -- seed step 3: non-blocking ------------------------------------------------------

_METHOD_SNIPPETS = {
    "ioctl(FIONBIO)": "import fcntl, termios, struct; fcntl.ioctl(s.fileno(), termios.FIONBIO, struct.pack('i', 1))",
    "fcntl(O_NONBLOCK)": "import fcntl, os; fl = fcntl.fcntl(s.fileno(), fcntl.F_GETFL); "
                         "fcntl.fcntl(s.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)",
    "sock.setblocking(False)": "s.setblocking(False)",
}


def nonblocking_syscalls() -> Table | str:
    """Run each way of making a socket non-blocking under strace and show the syscalls it made."""
    strace = shutil.which("strace")
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
        rows.append(["blocking, SO_SNDTIMEO", f"{time.monotonic() - t0:.3f} s", errno_name(err) or "0"])
    with socket.socket() as s:
        s.setblocking(False)
        t0 = time.monotonic()
        err = s.connect_ex((host, int(port)))
        rows.append(["non-blocking", f"{(time.monotonic() - t0) * 1e6:.0f} µs", errno_name(err) or "0"])
    return Table(["connect() mode", "time inside connect()", "returned"], rows,
                 title="connect() to a host that drops SYNs")


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


# -- seed step 4: epoll ----------------------------------------------------------

def edge_vs_level(rounds: int = 3) -> Table:
    """A writable socket registered twice: edge-triggered (EPOLLET) and level-triggered; poll ``rounds`` times."""
    a, b = socket.socketpair()
    dup = a.dup()
    rows = []
    try:
        with select.epoll() as ep:
            ep.register(a.fileno(), select.EPOLLOUT | select.EPOLLET)
            ep.register(dup.fileno(), select.EPOLLOUT)
            names = {a.fileno(): "edge (EPOLLOUT|EPOLLET)", dup.fileno(): "level (EPOLLOUT)"}
            counts = dict.fromkeys(names.values(), 0)
            for i in range(1, rounds + 1):
                ready = [names[fd] for fd, _ in ep.poll(0.01)]
                for n in ready:
                    counts[n] += 1
                rows.append([f"epoll_wait #{i}", ", ".join(sorted(ready)) or "(nothing)"])
    finally:
        for s in (a, b, dup):
            s.close()
    return Table(["call", "reported"], rows, title="the same writable socket, edge- vs level-triggered")


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


# -- seed step 5: connect() and SO_ERROR -------------------------------------------------

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
                     f"{first.ngx_connect} -> {first.ngx_decision}",
                     first.ngx_level or "-"])
    return Table(["target", "connect() returned", "decided", "nginx", "log level"], rows,
                 title="what this kernel's connect() answers")


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


__all__ = ["Table", "options_table", "rcvbuf_readback", "nonblocking_syscalls", "blocking_vs_nonblocking",
           "edge_vs_level", "rdhup_after_peer_close", "connect_returns", "so_error_twice"]
