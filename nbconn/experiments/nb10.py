"""Notebook 10's helper: when each of a worker's calls (picked by nbconn.nginx.runner) happened, from ``strace -tt``.

``nbconn.nginx.runner.upstream_connect_syscalls`` keeps the calls of one upstream connect without their times.
Notebook 10 needs the times too, to show that nginx's connect timer is measured from the cached
``ngx_current_msec`` (set when epoll_wait last returned), not from connect(): the interval from connect()
to the close() the timer caused can come out a little *shorter* than proxy_connect_timeout.
"""

from __future__ import annotations

import re

_LINE = re.compile(r"^(\d+)\s+(\d\d):(\d\d):(\d\d\.\d+)\s+(.*)$")


def call_times(lines: list[str], calls: list[str]) -> list[float]:
    """For each call of ``calls`` (a subsequence of the strace, as upstream_connect_syscalls returns it),
    the time of day it started, in seconds.  Matched in order, so a repeated text (two epoll_wait with
    the same result) takes the next one.  Raises ValueError when a call is not found."""
    times, j = [], 0
    for raw in lines:
        if j == len(calls):
            break
        m = _LINE.match(raw)
        if not m:
            continue
        text = re.sub(r"\s+= ", " = ", m.group(5))
        if text == calls[j]:
            times.append(int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4)))
            j += 1
    if j != len(calls):
        raise ValueError(f"strace line not found: {calls[j]!r}")
    return times


def with_workers(peers, *, workers: int = 2, **kwargs):
    """An ``nbconn.nginx.runner.Nginx`` (not started; use it in ``with``) whose configuration says ``worker_processes
    workers`` and ``listen ... reuseport``: each worker gets its own listening socket and the kernel spreads client
    connections over them by their addresses, so with a few dozen requests every worker serves some.  Used once, to
    show that without ``zone`` the round robin and the ``max_fails`` counts are per worker.  Everything else -- the
    checks, the private prefix, stop() -- is Nginx's."""
    from ..nginx import runner
    from .. import validate

    workers = validate.integer("workers", workers, 1, 8)

    class _Nginx(runner.Nginx):
        def config(self) -> str:
            text = super().config()
            listen = f"listen 127.0.0.1:{self.port};"
            if "worker_processes 1;" not in text or listen not in text:
                raise RuntimeError("nbconn.nginx.runner's configuration changed: update nb10.with_workers")
            return (text.replace("worker_processes 1;", f"worker_processes {workers};")
                    .replace(listen, f"listen 127.0.0.1:{self.port} reuseport;"))

    return _Nginx(peers, **kwargs)


def error_lines_by_worker(ng, text: str) -> dict:
    """How many error-log lines containing ``text`` each worker process wrote: {pid: count}."""
    import os

    counts: dict = {}
    with open(os.path.join(ng.prefix, "error.log")) as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"^\S+ \S+ \[\w+\] (\d+)#\d+: ", line)
        if m and text in line:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts
