"""The handshake's packets next to the syscalls: an AF_PACKET capture on the trace's own clock.

nbconn's trace says what the *program* saw: connect() returned EINPROGRESS,
epoll reported EPOLLOUT, SO_ERROR was 0.  What happened on the wire in between
-- the SYN, the SYN-ACK, the final ACK, an RST, a SYN sent again a second
later -- is the kernel's business.  A packet socket shows it without tcpdump:

* ``socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL))`` receives a copy of every
  frame that crosses an interface, in both directions.  It needs CAP_NET_RAW:
  real root, or "root" inside a user + network namespace of the lab's own
  (:func:`nbconn.lab.namespace`), whose helper makes the socket inside and
  passes it out over SCM_RIGHTS -- the ``source=`` argument.
* A classic BPF filter (``SO_ATTACH_FILTER``) keeps only TCP segments to or from
  one port, so a busy loopback (other programs, other tests) never fills the
  socket's buffer.  Whatever arrived before the filter was attached is drained.
* ``SO_TIMESTAMPNS`` stamps each copy with the kernel's time of the packet
  (taken in ``dev_queue_xmit_nit`` for a packet going out and in
  ``netif_receive_skb`` for one coming in), as CLOCK_REALTIME.  The trace uses
  CLOCK_MONOTONIC.  Both clocks tick at the same (NTP-slewed) rate; only their
  offset differs.  :func:`clock_offset_ns` reads the pair
  monotonic-realtime-monotonic a few times and keeps the tightest read: the
  offset is known to within half that window (typically well under 1 µs here),
  plus any *step* of the wall clock during the capture (``settimeofday``; NTP
  slewing does not step).  The capture measures the offset when it opens and
  when it is read, and reports the difference as ``clock_drift_ns``.

On loopback every segment crosses ``lo`` twice: once leaving the sender
(``PACKET_OUTGOING``) and once arriving at the receiver (``PACKET_HOST``).
The capture keeps the copy the *client* saw: client -> server segments as they
left (direction "out"), server -> client segments as they arrived ("in").  On
the impaired link's client side each segment crosses the TUN device once, in
the same sense.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from dataclasses import dataclass

from .. import validate

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_HOST, PACKET_OUTGOING = 0, 4
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772  # 14-byte Ethernet header before the IP header
SO_ATTACH_FILTER = 26
SOL_PACKET, PACKET_STATISTICS = 263, 6
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS

_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10

#: Most packets one capture keeps (a handshake is 3; a burst of connects a few hundred).
MAX_PACKETS = 200_000


# -- the clock pair ------------------------------------------------------------------------------

def clock_offset_ns(reads: int = 16) -> tuple[int, int]:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, and its uncertainty: (offset_ns, half_window_ns).

    Each read is monotonic, realtime, monotonic; the realtime value belongs to some instant
    between the two monotonic ones, so the tightest of ``reads`` tries bounds the error.
    """
    best = None
    for _ in range(reads):
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m2 - m1 < best[1] - best[0]:
            best = (m1, m2, r)
    m1, m2, r = best
    return r - (m1 + m2) // 2, (m2 - m1 + 1) // 2


def _stamped_before(ancdata, t_ns: int) -> bool:
    """Whether the control messages carry a kernel timestamp (SCM_TIMESTAMPNS) earlier than ``t_ns``."""
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(value) >= 16:
            sec, nsec = struct.unpack_from("qq", value)
            return sec * 1_000_000_000 + nsec < t_ns
    return False


def wait_for_packet_timestamps(limit_s: float = 1.0) -> float:
    """Wait until the kernel stamps packets as they arrive; returns how long that took (s).

    Setting SO_TIMESTAMPNS turns on the kernel's packet time stamping (``net_enable_timestamp``),
    but through a work queue: for a moment afterwards packets still pass unstamped, and an
    unstamped packet gets the time it is *read* at instead.  A datagram sent to ourselves on
    loopback shows which it is: stamped on arrival, its time is before we read it.
    """
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        rx.settimeout(0.1)
        stamped = False
        for _ in range(int(limit_s / 0.002) + 1):  # bounded in count and in time
            if stamped or time.monotonic() - start >= limit_s:
                break
            tx.sendto(b"t", rx.getsockname())
            time.sleep(0.002)
            before_read = time.clock_gettime_ns(time.CLOCK_REALTIME)
            try:
                _, ancdata, _, _ = rx.recvmsg(16, socket.CMSG_SPACE(16))
            except socket.timeout:
                ancdata = []
            stamped = _stamped_before(ancdata, before_read - 500_000)  # on arrival, 2 ms before it was read
    if stamped:
        return time.monotonic() - start
    raise RuntimeError(f"the kernel did not start stamping packets within {limit_s} s")


# -- the filter ----------------------------------------------------------------------------------

def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def tcp_port_filter(port: int, link_header: int) -> bytes:
    """A classic BPF program: accept IPv4 or IPv6 TCP segments with source or destination ``port``.

    ``link_header``: bytes before the IP header (14 on lo and Ethernet, 0 on a TUN device).
    IPv4 fragments after the first are rejected (they carry no TCP header); IPv6 extension
    headers are not followed (a handshake carries none).
    """
    L = link_header
    LDB, LDH, LDXMSH = 0x30, 0x28, 0xB1  # ld [k] byte / half-word; ldx 4*([k]&0xf)
    LDH_X = 0x48  # ld half-word [x + k]
    RSH, JEQ, JSET, RET = 0x74, 0x15, 0x45, 0x06
    prog = [
        _bpf(LDB, 0, 0, L),            # 0: first byte of the IP header
        _bpf(RSH, 0, 0, 4),            # 1: its version nibble
        _bpf(JEQ, 0, 9, 4),            # 2: IPv4? else to 12
        _bpf(LDB, 0, 0, L + 9),        # 3: IPv4 protocol
        _bpf(JEQ, 0, 15, 6),           # 4: TCP? else drop (20)
        _bpf(LDH, 0, 0, L + 6),        # 5: flags + fragment offset
        _bpf(JSET, 13, 0, 0x1FFF),     # 6: a later fragment: drop (20)
        _bpf(LDXMSH, 0, 0, L),         # 7: x = IPv4 header length
        _bpf(LDH_X, 0, 0, L),          # 8: TCP source port
        _bpf(JEQ, 9, 0, port),         # 9: accept (19)
        _bpf(LDH_X, 0, 0, L + 2),      # 10: TCP destination port
        _bpf(JEQ, 7, 8, port),         # 11: accept (19) or drop (20)
        _bpf(JEQ, 0, 7, 6),            # 12: IPv6? else drop (20)
        _bpf(LDB, 0, 0, L + 6),        # 13: next header
        _bpf(JEQ, 0, 5, 6),            # 14: TCP? else drop (20)
        _bpf(LDH, 0, 0, L + 40),       # 15: TCP source port
        _bpf(JEQ, 2, 0, port),         # 16: accept (19)
        _bpf(LDH, 0, 0, L + 42),       # 17: TCP destination port
        _bpf(JEQ, 0, 1, port),         # 18: accept (19) or drop (20)
        _bpf(RET, 0, 0, 0x40000),      # 19: accept, whole packet (up to 256 KiB)
        _bpf(RET, 0, 0, 0),            # 20: drop
    ]
    return b"".join(prog)


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    buf = ctypes.create_string_buffer(program)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# -- packets -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Packet:
    """One TCP segment as the client side saw it.

    ``t_ns``: CLOCK_MONOTONIC (the trace's clock); ``dir``: "out" (client -> server) or
    "in"; ``flags``: "S", "SA", "A", "R", "RA", "FA", "PA"...; ``seq``/``ack``: raw
    sequence numbers; ``retransmission``: this SYN (or SYN-ACK) repeats an earlier one;
    ``data``: the TCP payload itself, kept only by ``Capture(payload=True)`` (the TLS records:
    :mod:`nbconn.lab.tlsrecords`).
    """

    t_ns: int
    dir: str
    flags: str
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    payload: int
    retransmission: bool = False
    data: bytes = b""  # the payload's bytes, when the capture keeps them (``Capture(payload=True)``)

    def to_dict(self, t0_ns: int = 0) -> dict:
        return {"t_ns": self.t_ns - t0_ns, "dir": self.dir, "flags": self.flags, "src": f"{self.src}:{self.sport}",
                "dst": f"{self.dst}:{self.dport}", "seq": self.seq, "ack": self.ack, "payload": self.payload,
                "retransmission": self.retransmission}

    def __str__(self) -> str:
        arrow = "->" if self.dir == "out" else "<-"
        again = " (again)" if self.retransmission else ""
        return f"{self.flags:>2} {arrow} {self.src}:{self.sport} > {self.dst}:{self.dport}{again}"


def flags_text(bits: int) -> str:
    """tcpdump's letters, ACK last: S, SA, A, R, RA, FA, PA."""
    text = "".join(ch for bit, ch in ((_SYN, "S"), (_FIN, "F"), (_RST, "R"), (_PSH, "P")) if bits & bit)
    return text + ("A" if bits & _ACK else "")


def _parse(frame: bytes, link_header: int):
    """(src, dst, sport, dport, seq, ack, flags, payload length, payload slice) of a TCP segment, or None."""
    ip = frame[link_header:]
    if len(ip) < 20:
        return None
    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6 or len(ip) < ihl + 20:
            return None
        total = struct.unpack_from("!H", ip, 2)[0]
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(socket.AF_INET, ip[16:20])
        tcp, end = ip[ihl:], total
        start = ihl
    elif version == 6:
        if len(ip) < 60 or ip[6] != 6:
            return None
        src = "[" + socket.inet_ntop(socket.AF_INET6, ip[8:24]) + "]"
        dst = "[" + socket.inet_ntop(socket.AF_INET6, ip[24:40]) + "]"
        tcp, end, start = ip[40:], 40 + struct.unpack_from("!H", ip, 4)[0], 40
    else:
        return None
    sport, dport, seq, ack, off, bits = struct.unpack_from("!HHIIBB", tcp, 0)
    payload = max(0, end - start - (off >> 4) * 4)
    first = link_header + start + (off >> 4) * 4
    return src, dst, sport, dport, seq, ack, bits, payload, slice(first, first + payload)


class Capture:
    """The TCP segments to or from ``port``, as the client sees them.  A context manager.

    ``interface``: bind to this interface ("lo"), or None for every interface of the
    socket's network namespace.  ``source``: an object whose ``socket(family, type, proto)``
    makes the packet socket somewhere else (a lab namespace); None: here, which needs
    CAP_NET_RAW.  Raises PermissionError when the packet socket cannot be made.  ``payload=True``: keep
    each segment's payload bytes in ``Packet.data`` (for the TLS records; off by default: a burst of
    connects needs only the headers).
    """

    def __init__(self, port: int, *, interface: str | None = "lo", source=None, payload: bool = False) -> None:
        self.port = validate.integer("port", port, 1, 65535)
        if interface is not None and (not isinstance(interface, str) or not 0 < len(interface) < 16):
            raise ValueError(f"interface={validate.shown(interface)} is not an interface name")
        self.interface = interface
        self.source = source
        self.keep_payload = validate.flag("payload", payload)
        self.sock: socket.socket | None = None
        self.packets: list[Packet] = []
        self.offset_ns = 0  # CLOCK_REALTIME - CLOCK_MONOTONIC when the capture opened
        self.offset_error_ns = 0
        self.clock_drift_ns = 0  # how far the offset moved between open and the last read
        self.dropped = 0  # frames the kernel could not queue to the packet socket (PACKET_STATISTICS)
        self._seen_syn: set = set()

    # -- lifetime ------------------------------------------------------------------------------
    def open(self) -> "Capture":
        proto = socket.htons(ETH_P_ALL)
        if self.source is not None:
            sock = self.source.socket(socket.AF_PACKET, socket.SOCK_RAW, proto)
        else:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, proto)
        try:
            # Until the filter is attached (and the socket bound) the socket sees every frame; nothing
            # of it is kept: the filter first, then drain.  Link header: 14 bytes on lo, 0 on a TUN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            header = 0  # unbound: every interface of the namespace, read as TUN devices (no link header)
            if self.interface is not None:
                sock.bind((self.interface, ETH_P_ALL))  # the name is looked up in the socket's own namespace
                header = 14 if sock.getsockname()[3] in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else 0
            _attach_filter(sock, tcp_port_filter(self.port, header))
            sock.setblocking(False)
            self._drain(sock)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        try:
            wait_for_packet_timestamps()
        except BaseException:
            self.close()
            raise
        self.offset_ns, self.offset_error_ns = clock_offset_ns()
        return self

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        for _ in range(100_000):
            try:
                sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Capture":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> list[Packet]:
        """Everything captured since the last read, appended to ``self.packets``; returns the new ones."""
        if self.sock is None:
            raise RuntimeError("the capture is not open")
        new = []
        ancsize = socket.CMSG_SPACE(16)
        for _ in range(MAX_PACKETS):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65536, ancsize)
            except (BlockingIOError, InterruptedError):
                break
            packet = self._packet(data, ancdata, addr)
            if packet is not None and len(self.packets) + len(new) < MAX_PACKETS:
                new.append(packet)
        # struct tpacket_stats {tp_packets, tp_drops}: counts since the last read; reading resets them
        _, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.dropped += drops
        offset, _ = clock_offset_ns()
        self.clock_drift_ns = offset - self.offset_ns
        self.packets.extend(new)
        return new

    def _packet(self, data: bytes, ancdata, addr) -> Packet | None:
        # addr: (ifname, proto, pkttype, hatype, hwaddr)
        pkttype, hatype = addr[2], addr[3]
        header = 14 if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else 0
        parsed = _parse(data, header)
        if parsed is None:
            return None
        src, dst, sport, dport, seq, ack, bits, payload, where = parsed
        direction = "out" if dport == self.port else "in" if sport == self.port else None
        if direction is None:
            return None
        # One copy per segment: what left the client ("out", PACKET_OUTGOING) and what reached it
        # ("in", PACKET_HOST).  On lo the other copy of each segment is the server's view.
        if (direction == "out") != (pkttype == PACKET_OUTGOING):
            return None
        t_real = None
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack_from("qq", value)
                t_real = sec * 1_000_000_000 + nsec
        if t_real is None:
            return None
        again = False
        if bits & _SYN:
            key = (src, sport, dst, dport, seq)
            again = key in self._seen_syn
            self._seen_syn.add(key)
        return Packet(t_real - self.offset_ns, direction, flags_text(bits), src, dst, sport, dport, seq, ack,
                      payload, again, data[where] if self.keep_payload else b"")


# -- what the packets say about one connect --------------------------------------------------------

def for_client_port(packets: list[Packet], client_port: int) -> list[Packet]:
    """The segments of the one connection that used ``client_port``."""
    return [p for p in packets if (p.sport if p.dir == "out" else p.dport) == client_port]


def wire_handshake_ns(packets: list[Packet]) -> int | None:
    """First SYN out to first SYN-ACK in, or None when either is missing."""
    syn = next((p.t_ns for p in packets if p.dir == "out" and p.flags == "S"), None)
    synack = next((p.t_ns for p in packets if p.dir == "in" and p.flags == "SA"), None)
    if syn is None or synack is None:
        return None
    return synack - syn


def unavailable_reason() -> str | None:
    """None when this process can open a packet socket itself (CAP_NET_RAW), else why not."""
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)):
            return None
    except PermissionError:
        return "an AF_PACKET socket needs CAP_NET_RAW (root), or a lab namespace of its own (nbconn.lab.namespace)"
    except OSError as exc:
        return f"socket(AF_PACKET) failed here: {os.strerror(exc.errno)}"


__all__ = ["Capture", "Packet", "clock_offset_ns", "tcp_port_filter", "flags_text", "for_client_port",
           "wire_handshake_ns", "unavailable_reason"]
