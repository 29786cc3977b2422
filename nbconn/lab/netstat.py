"""The kernel's TCP counters (``/proc/net/netstat``) and a listener's queues, read without any tool.

Why not parse ``nstat`` or ``ss``?  Their text is meant for people and changes
between versions; the kernel's own files are stable.  ``/proc/net/netstat``
holds pairs of lines: a header line ``TcpExt: Name1 Name2 ...`` and a value line
``TcpExt: 12 0 ...`` (the same for ``IpExt:`` and ``MPTcpExt:``).  The counters
belong to the network namespace of whoever reads the file, so a lab that runs in
its own namespace has counters nobody else on the machine disturbs.

The counters that tell the accept-queue story (Linux ``net/ipv4/tcp_input.c``,
``tcp_conn_request``; ``net/ipv4/tcp_minisocks.c``, ``tcp_check_req``;
``net/ipv4/syncookies.c``, ``cookie_v4_check``; names from
``include/uapi/linux/snmp.h``):

* ``ListenOverflows`` -- a SYN or a final ACK met a full accept queue;
* ``ListenDrops`` -- everything a listener dropped (overflows included);
* ``TCPReqQFullDoCookies`` / ``TCPReqQFullDrop`` -- the SYN queue was full and a
  syncookie SYN-ACK was sent / the SYN was dropped (``tcp_syncookies=0``);
* ``SyncookiesSent`` / ``SyncookiesRecv`` / ``SyncookiesFailed`` -- cookie SYN-ACKs
  sent, valid cookies coming back in an ACK, invalid ones;
* ``EmbryonicRsts`` -- resets sent for half-open requests (``tcp_abort_on_overflow=1``).

A listening socket's ``TCP_INFO`` carries its queues (``tcp_get_info`` in
``net/ipv4/tcp.c``): for a socket in LISTEN, ``tcpi_unacked`` is the accept
queue's length (``sk_ack_backlog``: what ``ss -ltn`` prints as Recv-Q) and
``tcpi_sacked`` its limit (``sk_max_ack_backlog``: ss's Send-Q).
"""

from __future__ import annotations

import socket
import struct

NETSTAT_PATH = "/proc/net/netstat"

#: the counters the accept-queue lesson prints, in the order it prints them
ACCEPT_QUEUE_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDoCookies", "TCPReqQFullDrop",
                         "SyncookiesSent", "SyncookiesRecv", "SyncookiesFailed", "EmbryonicRsts")

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCPI_STATE = 0  # u8
_TCPI_UNACKED = 24  # u32: for a listener, the accept queue's length
_TCPI_SACKED = 28  # u32: for a listener, the accept queue's limit
_TCP_LISTEN = 10


def parse(text: str) -> dict[str, dict[str, int]]:
    """``{"TcpExt": {"ListenOverflows": 3, ...}, "IpExt": {...}}`` from the text of /proc/net/netstat.

    Lines come in pairs (names, then values) with the same prefix; a pair whose
    lengths differ is an error (a truncated read), not something to guess about.
    """
    tables: dict[str, dict[str, int]] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) % 2:
        raise ValueError(f"{NETSTAT_PATH}: expected header/value line pairs, got {len(lines)} lines")
    for names, values in zip(lines[::2], lines[1::2]):
        if names[0] != values[0] or not names[0].endswith(":"):
            raise ValueError(f"{NETSTAT_PATH}: header {names[0]!r} is followed by values for {values[0]!r}")
        if len(names) != len(values):
            raise ValueError(f"{NETSTAT_PATH}: {names[0]} has {len(names) - 1} names but {len(values) - 1} values")
        tables[names[0][:-1]] = {name: int(value) for name, value in zip(names[1:], values[1:])}
    return tables


def read(path: str = NETSTAT_PATH) -> dict[str, int]:
    """The TcpExt counters of the network namespace this thread is in."""
    with open(path) as f:
        return parse(f.read())["TcpExt"]


def delta(before: dict[str, int], after: dict[str, int], names=ACCEPT_QUEUE_COUNTERS) -> dict[str, int]:
    """``after - before`` for each of ``names`` (0 for a counter this kernel lacks)."""
    return {name: after.get(name, 0) - before.get(name, 0) for name in names}


def listener_queue(sock: socket.socket) -> dict:
    """A listening socket's accept queue: ``{"queued": n, "limit": backlog}`` (ss's Recv-Q / Send-Q)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    if raw[_TCPI_STATE] != _TCP_LISTEN:
        raise ValueError(f"socket fd {sock.fileno()} is not listening (tcpi_state {raw[_TCPI_STATE]})")
    queued, limit = struct.unpack_from("II", raw, _TCPI_UNACKED)
    return {"queued": queued, "limit": limit}
