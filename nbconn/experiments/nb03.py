"""Notebook 03's plumbing: a connected loopback pair, a bounded wait for events, and what nginx runs per mask.

The notebook's cells make the epoll calls themselves (register, poll, close); this module makes
the peers they need and reads nginx's event dispatch as a table.
"""

from __future__ import annotations

import select
import socket
import time

#: ngx_epoll_add_connection's mask (ngx_epoll_module.c:700-721, nginx 1.22.1)
NGINX_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


def loopback_pair(wait_s: float = 1.0) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server); the client non-blocking and not registered anywhere."""
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


def poll_until(ep: select.epoll, wanted: int, wait_s: float) -> int:
    """epoll_wait until every bit of ``wanted`` has been reported or ``wait_s`` passed: the OR of what came.

    One peer's reply and FIN may come in one wakeup or two; this waits for both, bounded.
    """
    deadline = time.monotonic() + wait_s
    seen = 0
    for _ in range(10_000):  # each round waits or returns events: bounded in count as well as time
        left = deadline - time.monotonic()
        if seen & wanted == wanted or left <= 0:
            break
        for _, mask in ep.poll(left):
            seen |= mask
    return seen


def nginx_handlers(mask: int) -> str:
    """What ``ngx_epoll_process_events`` runs for one reported mask (ngx_epoll_module.c:862-930, 1.22.1).

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
