"""Notebook 10's helper: when each of a worker's calls (picked by nbconn.nginx) happened, from ``strace -tt``.

``nbconn.nginx.upstream_connect_syscalls`` keeps the calls of one upstream connect without their times.
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
