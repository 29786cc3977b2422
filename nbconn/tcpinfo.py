"""TCP_INFO: what the kernel itself measured about a connection (tcp(7), <linux/tcp.h>).

After the handshake the kernel already has a round-trip estimate: the time from
sending the SYN to receiving the SYN-ACK seeds ``tcpi_rtt``.  Comparing it
with the handshake time nbconn measures in user space shows how much the event
loop adds.  Compare only connections with ``total_retrans == 0``: after a
resent SYN the handshake time holds the 1 s retransmission timeout.  The
kernel's sample then comes from the timestamp the SYN-ACK echoes (measured on
Linux 6.18): one round trip, at millisecond resolution (at least 1 ms), when the
first SYN was lost; the whole handshake when the SYN-ACK was lost, because the
listener's resent SYN-ACK (tcp_check_req -> inet_rtx_syn_ack) still echoes the
first SYN's timestamp.

``struct tcp_info`` is read as raw bytes; the fields used here sit at fixed
offsets in every kernel since 2.6 (the struct only grows at its end).
"""

from __future__ import annotations

import socket
import struct

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCPI_STATE = 0  # u8
_TCPI_RETRANSMITS = 2  # u8: retransmissions of the current unacked segment
_TCPI_RTT = 68  # u32, microseconds
_TCPI_RTTVAR = 72  # u32, microseconds
_TCPI_TOTAL_RETRANS = 100  # u32

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


def parse_tcp_info(raw: bytes) -> dict:
    """The few fields nbconn uses, from the raw struct tcp_info bytes."""
    rtt, rttvar = struct.unpack_from("II", raw, _TCPI_RTT)
    (total_retrans,) = struct.unpack_from("I", raw, _TCPI_TOTAL_RETRANS) if len(raw) >= 104 else (0,)
    return {
        "state": TCP_STATES.get(raw[_TCPI_STATE], str(raw[_TCPI_STATE])),
        "rtt_us": rtt,
        "rttvar_us": rttvar,
        "retransmits": raw[_TCPI_RETRANSMITS],
        "total_retrans": total_retrans,
    }


def read_tcp_info(sock: socket.socket) -> dict:
    """getsockopt(IPPROTO_TCP, TCP_INFO) on a TCP socket, parsed."""
    return parse_tcp_info(read_tcp_info_raw(sock))


def read_tcp_info_raw(sock: socket.socket) -> bytes:
    """getsockopt(IPPROTO_TCP, TCP_INFO): the struct's bytes (parse them with :func:`parse_tcp_info` when needed)."""
    return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 232)


def total_retrans(raw: bytes) -> int:
    """tcpi_total_retrans alone, from the raw struct (for a handshake: the SYNs sent again)."""
    return struct.unpack_from("I", raw, _TCPI_TOTAL_RETRANS)[0] if len(raw) >= _TCPI_TOTAL_RETRANS + 4 else 0


_RTT = struct.Struct("I")


def rtt_us(raw: bytes) -> int:
    """tcpi_rtt (µs) alone, from the raw struct."""
    return _RTT.unpack_from(raw, _TCPI_RTT)[0]
