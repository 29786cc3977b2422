"""Notebook 04's helper: one connect through the lab's router, with every packet on the client's wire.

``lab.impaired(router=...)`` makes the server namespace a router for 198.19.0.0/24 that holds an
``unreachable``, ``prohibit`` or ``blackhole`` route for it.  The lab's capture
(:mod:`nbconn.lab.capture`) keeps TCP segments only, and the router's answer is ICMP, a different
protocol that quotes the segment it answers.  So this reads the client's TUN device with a packet
socket and no filter: nothing else crosses that wire (IPv6 is off in both namespaces, nothing
else runs there).  Each packet is stamped by the kernel (SO_TIMESTAMPNS) and put on the trace's
clock as the capture does (:func:`nbconn.lab.capture.clock_offset_ns`); the merged timeline is a
:class:`nbconn.experiments.nb11.Shot`.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from .. import validate
from ..lab import capture
from .nb11 import Shot

_IPPROTO_ICMP, _IPPROTO_TCP = 1, 6
#: (type, code) -> name, as RFC 792 / RFC 1812 call them (<linux/icmp.h>: ICMP_DEST_UNREACH = 3, ...)
ICMP_NAMES = {(3, 0): "net unreachable", (3, 1): "host unreachable", (3, 3): "port unreachable",
              (3, 13): "communication administratively prohibited", (11, 0): "time exceeded"}
_SETTLE_S = 0.05  # the last packet is queued to the packet socket in softirq context, just after the decision


@dataclass(frozen=True)
class WirePacket:
    """One IPv4 packet on the client's TUN device: a TCP segment or an ICMP error quoting one.

    The attributes :class:`nbconn.experiments.nb11.Shot` reads: ``t_ns`` (CLOCK_MONOTONIC), ``dir``
    ("out" from the client, "in" to it), ``flags`` ("S", "SA", "R"..., or "ICMP 3/1"),
    ``retransmission`` (a SYN sent again).
    """

    t_ns: int
    dir: str
    flags: str
    src: str
    dst: str
    text: str
    retransmission: bool = False
    icmp: tuple | None = None  # (type, code) of an ICMP error

    def to_dict(self, t0_ns: int = 0) -> dict:
        """As :meth:`nbconn.lab.capture.Packet.to_dict` (so ``Shot.to_dict()`` works), plus the ICMP kind."""
        return {"t_ns": self.t_ns - t0_ns, "dir": self.dir, "flags": self.flags, "src": self.src, "dst": self.dst,
                "text": self.text, "retransmission": self.retransmission, "icmp": self.icmp}

    def __str__(self) -> str:
        arrow = "->" if self.dir == "out" else "<-"
        return f"{arrow} {self.src} > {self.dst}  {self.text}" + (" (again)" if self.retransmission else "")


def parse(packet: bytes, t_ns: int, direction: str, seen_syn: set) -> WirePacket | None:
    """A WirePacket for an IPv4 TCP segment or ICMP message (no link header, as a TUN device has none)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    body = packet[ihl:]
    if proto == _IPPROTO_TCP and len(body) >= 14:
        sport, dport, seq = struct.unpack_from("!HHI", body, 0)
        flags = capture.flags_text(body[13])
        again = False
        if "S" in flags:
            key = (src, sport, dst, dport, seq)
            again = key in seen_syn
            seen_syn.add(key)
        return WirePacket(t_ns, direction, flags, f"{src}:{sport}", f"{dst}:{dport}", f"TCP {flags}", again)
    if proto == _IPPROTO_ICMP and len(body) >= 8:
        kind = (body[0], body[1])
        name = ICMP_NAMES.get(kind, "type %d code %d" % kind)
        quoted = body[8:]  # the IP header and first 8 bytes of the packet it answers (RFC 792)
        about = ""
        if len(quoted) >= 20 and quoted[9] == _IPPROTO_TCP:
            qihl = (quoted[0] & 0x0F) * 4
            if len(quoted) >= qihl + 4:
                qsport, qdport = struct.unpack_from("!HH", quoted, qihl)
                about = (f", quoting TCP {socket.inet_ntoa(quoted[12:16])}:{qsport} > "
                         f"{socket.inet_ntoa(quoted[16:20])}:{qdport}")
        return WirePacket(t_ns, direction, "ICMP %d/%d" % kind, src, dst,
                          f"ICMP {kind[0]}/{kind[1]} {name}{about}", icmp=kind)
    return None


class WireCapture:
    """Every IPv4 packet on one interface of a lab namespace, as the client side sees it.  A context manager."""

    def __init__(self, namespace, interface: str) -> None:
        self.namespace = namespace
        self.interface = interface
        self.sock: socket.socket | None = None
        self.packets: list[WirePacket] = []
        self.offset_ns = 0
        self.offset_error_ns = 0
        self._seen_syn: set = set()

    def __enter__(self) -> "WireCapture":
        sock = self.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(capture.ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, capture.SO_TIMESTAMPNS, 1)
            sock.bind((self.interface, capture.ETH_P_ALL))  # the name is looked up in the socket's namespace
            sock.setblocking(False)
            capture.wait_for_packet_timestamps()
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.offset_ns, self.offset_error_ns = capture.clock_offset_ns()
        return self

    def __exit__(self, *exc) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def read(self) -> list[WirePacket]:
        """Everything queued since the last read (appended to ``self.packets``)."""
        new = []
        for _ in range(10_000):  # bounded: the wire carries a handful of packets per connect
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                break
            t_real = None
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == capture.SCM_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack_from("qq", value)
                    t_real = sec * 1_000_000_000 + nsec
            if t_real is None:
                continue
            direction = "out" if addr[2] == capture.PACKET_OUTGOING else "in"
            packet = parse(data, t_real - self.offset_ns, direction, self._seen_syn)
            if packet is not None:
                new.append(packet)
        self.packets.extend(new)
        return new


def round_trip_floor_ms(delay_ms: float) -> float:
    """The shortest a SYN's answer can take over the wire: two one-way delays, each released at most
    ``MAX_WAKE_ALLOWANCE_S`` early by the forwarder (:mod:`nbconn.lab.wire.forwarder`)."""
    from ..lab.wire.forwarder import MAX_WAKE_ALLOWANCE_S

    return 2 * max(0.0, delay_ms - MAX_WAKE_ALLOWANCE_S * 1000.0)


def through_router(router: str, *, delay_ms: float = 5.0, timeout: float = 1.5, port: int = 80):
    """One nbconn connect to an address behind the lab's router (``lab.impaired(router=router)``).

    Returns ``(shot, stats)``: a :class:`nbconn.experiments.nb11.Shot` (the result, the client wire's
    packets, ``shot.timeline()``) and the forwarder's counters (``out_forwarded``, ``back_forwarded``).
    """
    from .. import api
    from ..lab.wire import impaired
    from ..lab.wire.link import CLIENT_IFNAME

    timeout = validate.number("timeout", timeout, 0, 30, low_open=True)
    port = validate.integer("port", port, 1, 65535)
    with impaired(delay_ms=delay_ms, router=router) as link:
        with WireCapture(link.client_ns, CLIENT_IFNAME) as cap:
            with link.client():
                result = api.connect(f"{link.far_addr}:{port}", timeout=timeout)
            time.sleep(_SETTLE_S)
            cap.read()
        stats = link.stats()
        where = (f"impaired link, {delay_ms:g} ms each way, the server namespace routing {link.far_prefix} to a "
                 f"{router} route; packet socket on the client's TUN device, {link.client_ns.where}")
    shot = Shot(f"router:{router}", result, cap.packets, [result], cap.packets, where, cap.offset_error_ns)
    return shot, stats


def nginx_through_router(router: str, *, delay_ms: float = 5.0, connect_timeout: float = 1.0) -> dict:
    """nginx 1.22.1 itself in the link's client namespace, in front of two peers: ``link.far_addr:80``
    (behind the router) first, then an HTTP peer listening in the server namespace.  One request.

    Returns {"status", "tried" (the access log's $upstream_addr), "upstream_status", "error_log"
    (nbconn.nginx.runner.ErrorEntry list)}.  Round robin with equal weights picks the first server first.
    """
    from ..lab import peers as lab_peers
    from ..lab.wire import impaired
    from ..nginx.runner import Nginx

    with impaired(delay_ms=delay_ms, router=router) as link, \
            lab_peers.listening(link.server_addr, http=True, source=link.server_ns) as up:
        with Nginx([f"{link.far_addr}:80", f"{link.server_addr}:{up.port}"], netns=link.client_ns,
                   connect_timeout=connect_timeout) as ng:
            status = ng.request()
            entries = []
            deadline = time.monotonic() + 2.0  # the access log line is written as the request ends
            for _ in range(400):  # bounded by the deadline and the count
                entries = ng.access_log()
                if entries or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
            errors_seen = ng.error_log()
    entry = entries[0] if entries else None
    return {"status": status, "tried": entry.upstream_addr if entry else [],
            "upstream_status": entry.upstream_status if entry else [], "error_log": errors_seen}
