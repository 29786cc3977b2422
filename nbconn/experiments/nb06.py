"""Notebook 06's helper: ``tcpi_backoff`` after each SYN retransmission, read from TCP_INFO.

Since Linux 6.8, ``tcp_retransmit_timer`` keeps the 1 s timeout of a SYN-SENT socket while
``tp->total_rto <= net.ipv4.tcp_syn_linear_timeouts``, and only the doubling branch raises
``icsk_backoff`` -- which TCP_INFO reports as ``tcpi_backoff`` (byte 4 of ``struct tcp_info``, after
state, ca_state, retransmits and probes; <linux/tcp.h>).  One connect to the lab black hole, its
TCP_INFO read every ``poll_s``: for every retransmission, when it was seen and the backoff then.
"""

from __future__ import annotations

import errno as _errno
import select
import socket
import time

from ..options import TCP_SYNCNT
from ..tcpinfo import parse_tcp_info, read_tcp_info_raw

_TCPI_BACKOFF = 4  # u8 in struct tcp_info


def backoff_after_each_retransmission(syncnt: int = 2, *, poll_s: float = 0.002, max_wait_s: float = 12.0) -> dict:
    """Connect to the lab black hole with TCP_SYNCNT=``syncnt`` and watch it until the kernel gives up.

    Returns {"rows": [(seconds after connect(), retransmissions so far, tcpi_backoff)], "failed_s": seconds
    or None when ``max_wait_s`` passed first, "errno": name or None}.
    """
    from ..lab import blackhole

    if isinstance(syncnt, bool) or not isinstance(syncnt, int) or not 1 <= syncnt <= 3:
        raise ValueError(f"syncnt={syncnt!r} must be 1, 2 or 3 (4 and up take over half a minute)")
    if not 0 < poll_s <= 0.1 or not 0 < max_wait_s <= 60:
        raise ValueError(f"poll_s={poll_s!r} must be in (0, 0.1] and max_wait_s={max_wait_s!r} in (0, 60]")
    rows, failed_s, err_name = [], None, None
    with blackhole() as peer, select.epoll() as ep, socket.socket() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_SYNCNT, syncnt)
        sock.setblocking(False)
        ep.register(sock.fileno(), select.EPOLLOUT)
        t0 = time.monotonic()
        err = sock.connect_ex(("127.0.0.1", peer.port))
        if err != _errno.EINPROGRESS:
            raise OSError(err, f"connect to the black hole returned {_errno.errorcode.get(err, err)}")
        seen = 0
        while True:  # (not `while <condition>:`, tests/test_interrupt_coverage.py says why)
            if time.monotonic() - t0 >= max_wait_s:
                break
            if ep.poll(poll_s):
  # writable: the kernel gave up (SO_ERROR says why)
                failed_s = time.monotonic() - t0
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                err_name = _errno.errorcode.get(code, str(code)) if code else None
                break
            raw = read_tcp_info_raw(sock)
            total = parse_tcp_info(raw)["total_retrans"]
            if total > seen:  # one more SYN went out since the last look
                seen = total
                rows.append((time.monotonic() - t0, total, raw[_TCPI_BACKOFF]))
    return {"rows": rows, "failed_s": failed_s, "errno": err_name}


def rto_max_ms() -> int | None:
    """``net.ipv4.tcp_rto_max_ms`` of this network namespace (Linux 6.15+: the cap on the doubling, 120000 by
    default), or None on a kernel without it."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rto_max_ms") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
