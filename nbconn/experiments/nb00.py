"""Notebook 00's experiments: the code on the page under strace, next to nbconn and an nginx worker.

``connect_nonb`` (:mod:`nbconn.connect_nonb`, printed verbatim in notebook 00) and
``nbconn.connect(nginx_exact=True)`` run in fresh interpreters under strace; the calls each makes on its
socket are set beside the ones an nginx 1.22.1 worker makes (a recording: notebook 10 runs nginx live).
And what nbconn's default mode adds to nginx's calls, counted from a Result's trace.
"""

from __future__ import annotations

import re
import subprocess
import sys

from .. import systools
from .table import Table

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


__all__ = ["NGINX_WORKER_CALLS", "syscalls_on_the_socket", "strace_python", "strace_side_by_side",
           "extras_beyond_nginx"]
