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

import contextlib
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
        # (the loop in a function of its own, so that an interrupt in it closes the sockets on every
        # Python: tests/test_interrupt_coverage.py says why)
        return _until_stamped(rx, tx, start, limit_s)


def _until_stamped(rx: socket.socket, tx: socket.socket, start: float, limit_s: float) -> float:
    while time.monotonic() - start < limit_s:
        tx.sendto(b"t", rx.getsockname())
        time.sleep(0.002)
        before_read = time.clock_gettime_ns(time.CLOCK_REALTIME)
        try:
            _, ancdata, _, _ = rx.recvmsg(16, socket.CMSG_SPACE(16))
        except socket.timeout:
            continue
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack_from("qq", value)
                if sec * 1_000_000_000 + nsec < before_read - 500_000:  # stamped on arrival, 2 ms ago
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
    sequence numbers; ``retransmission``: this SYN (or SYN-ACK) repeats an earlier one.
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
    """(src, dst, sport, dport, seq, ack, flags, payload) of a TCP segment, or None."""
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
    return src, dst, sport, dport, seq, ack, bits, payload


class Capture:
    """The TCP segments to or from ``port``, as the client sees them.  A context manager.

    ``interface``: bind to this interface ("lo"), or None for every interface of the
    socket's network namespace.  ``source``: an object whose ``socket(family, type, proto)``
    makes the packet socket somewhere else (a lab namespace); None: here, which needs
    CAP_NET_RAW.  Raises PermissionError when the packet socket cannot be made.
    """

    def __init__(self, port: int, *, interface: str | None = "lo", source=None) -> None:
        self.port = validate.integer("port", port, 1, 65535)
        if interface is not None and (not isinstance(interface, str) or not 0 < len(interface) < 16):
            raise ValueError(f"interface={validate.shown(interface)} is not an interface name")
        self.interface = interface
        self.source = source
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
        src, dst, sport, dport, seq, ack, bits, payload = parsed
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
                      payload, again)


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


# -- scenarios: one connect (or one burst) with its packets ------------------------------------------

#: the server namespace's TcpExt counters a syncookie run reports (as deltas)
OVERFLOW_COUNTERS = ("TCPReqQFullDoCookies", "SyncookiesSent", "SyncookiesRecv", "ListenOverflows", "ListenDrops")


@dataclass
class Shot:
    """One connect and its packets, on one clock.

    ``result``: the connect shown (for "slow-accept", the slowest of the burst); ``results``:
    every connect of the run; ``packets``: the shown connect's segments; ``all_packets``:
    everything captured; ``where``: where the sockets lived and who made the packet socket.
    """

    scenario: str
    result: object
    packets: list
    results: list
    all_packets: list
    where: str
    clock_error_ns: int = 0
    note: str = ""  # what the client's packets cannot show (the server's counters)
    counters: dict | None = None

    @property
    def t0_ns(self) -> int:
        return self.result.started_ns

    def to_dict(self) -> dict:
        """``{"packets": [...], "steps": [...]}``: times in ns since the connect's socket() call."""
        return {"scenario": self.scenario, "where": self.where, "clock_error_ns": self.clock_error_ns,
                "note": self.note, "counters": self.counters,
                "outcome": self.result.outcome, "handshake_ns": self.result.handshake_ns,
                "packets": [p.to_dict(self.t0_ns) for p in self.packets],
                "steps": self.result.to_dict()["steps"]}

    def story(self) -> str:
        """The handshake's segments in order, e.g. ``S> SA< A>`` (> out, < in, ! sent again), up to the decision."""
        last = max(s.t_ns for s in self.result.steps)
        return " ".join(p.flags + (">" if p.dir == "out" else "<") + ("!" if p.retransmission else "")
                        for p in self.packets if p.t_ns <= last)

    def timeline(self) -> str:
        """Syscalls and packets merged in time order, in µs since socket() was called (for root and normal
        users alike): each call at the moment it was called, with the moment it returned beside it, so a
        segment sent during connect() is listed between connect()'s two times; each segment when it crossed
        the interface."""
        t0 = self.t0_ns
        rows = [(s.t_start_ns, f"{(s.t_ns - t0) / 1e3:10.1f} µs  {s.call}" if s.t_ns > s.t_start_ns or s.name
                 not in ("timer", "timeout") else f"{'':13}  {s.call}") for s in self.result.steps]
        last = max(s.t_ns for s in self.result.steps)
        rows += [(p.t_ns, f"{'':13}      [wire] {p}") for p in self.packets if p.t_ns <= last]
        rows.sort(key=lambda row: row[0])
        head = f"{'called':>13}  {'returned':>13}"
        return "\n".join([head] + [f"{(t - t0) / 1e3:10.1f} µs  {text}" for t, text in rows])


def _client_port(result) -> int | None:
    sock = result.sock
    return sock.getsockname()[1] if sock is not None else None


def _settle(capture: Capture, seconds: float = 0.02) -> None:
    # The last segments (the final ACK, an RST) are queued to the packet socket in softirq context,
    # a few µs after the syscall that caused them returned: give them a moment before reading.
    time.sleep(seconds)
    capture.read()


def shoot(scenario: str, *, delay_ms: float = 10.0, timeout: float | None = None, burst: int = 20) -> Shot:
    """Run one scenario with a capture around it (as root, on loopback or on the impaired link).

    ``timeout``: the connect timer (default: 2.5 s for the black hole -- three SYNs -- else 3 s);
    ``delay_ms``: one-way delay of the impaired link (for "impaired" and "syncookie"); ``burst``: connects
    at once for "slow-accept" and "syncookie".
    """
    from .. import api
    from . import peers

    validate.choice("scenario", scenario, validate.CAPTURE_SCENARIOS)
    delay_ms = validate.number("delay_ms", delay_ms, 0, 1000)
    if timeout is None:
        timeout = 2.5 if scenario == "blackhole" else 3.0
    timeout = validate.number("timeout", timeout, 0, 60, low_open=True)
    burst = validate.integer("burst", burst, 2, 200)
    if scenario == "impaired":
        from . import wire

        why = wire.wire_unavailable_reason()
        if why is not None:
            raise RuntimeError(f"the impaired link cannot run here: {why}")
        with wire.impaired(delay_ms=delay_ms) as link:
            port = link.serve_listener(backlog=128)
            # made by the link's helper in the client namespace (root there, as a normal user too), passed
            # out over SCM_RIGHTS: unbound, it sees that namespace's interfaces, the TUN device among them
            cap = Capture(port, interface=None, source=link.client_ns).open()
            with contextlib.closing(cap):
                with link.client():
                    result = api.connect(f"{link.server_addr}:{port}", timeout=timeout, keep=True)
                client_port = _client_port(result)
                result.close()
                _settle(cap)
            where = (f"impaired link, {delay_ms:g} ms each way; packet socket on the client side's TUN device, "
                     f"{link.client_ns.where}")
            return Shot(scenario, result, for_client_port(cap.packets, client_port), [result], cap.packets, where,
                        cap.offset_error_ns)

    if scenario == "syncookie":
        return _syncookie(delay_ms=delay_ms, timeout=timeout, burst=burst)

    with contextlib.ExitStack() as stack:
        if unavailable_reason() is None:
            ns, where = None, "host loopback (lo); packet socket made here, as root"
            client_side = contextlib.nullcontext
        else:
            # A normal user: everything -- peer, client socket, packet socket -- inside a lab namespace
            # of our own, where the helper is "root"; its loopback is as private as the namespace.
            from .namespace import namespace

            ns = stack.enter_context(namespace())
            where = f"the lab namespace's own loopback (lo); sockets {ns.where}"
            client_side = ns.using
        source = {"source": ns} if ns is not None else {}
        factory = {"listening": lambda: peers.listening(hold=True, **source),
                   "refused": lambda: peers.refused(**source),
                   "blackhole": lambda: peers.blackhole(**source),
                   "slow-accept": lambda: peers.slow_accept(backlog=4, interval_s=0.05, **source)}[scenario]
        peer = stack.enter_context(factory())
        cap = stack.enter_context(Capture(peer.port, interface="lo", source=ns))
        made_before = ns.created if ns is not None else 0
        with client_side():
            if scenario == "slow-accept":
                results = api.connect_many([peer] * burst, concurrency=burst, timeout=timeout, keep=True, linger=0)
            else:
                results = [api.connect(peer, timeout=timeout, keep=True)]
        ports = [_client_port(r) for r in results]
        for r in results:
            r.close()
        if ns is not None and ns.created - made_before < len(results):
            raise RuntimeError("this nbconn's flow did not make its sockets in the lab namespace (nbconn.socketsource)")
        _settle(cap)
    # the connect to show: the slowest one (in a burst, one whose SYN was dropped)
    index = max(range(len(results)), key=lambda i: results[i].handshake_ns or 0)
    result = results[index]
    if ports[index] is not None:
        packets = for_client_port(cap.packets, ports[index])
    else:  # not connected, so no socket to ask: its segments are the ones to the peer (one connect)
        packets = list(cap.packets)
    return Shot(scenario, result, packets, results, cap.packets, where, cap.offset_error_ns)


def _syncookie(*, delay_ms: float, timeout: float, burst: int, backlog: int = 2) -> Shot:
    """A burst over the impaired link against a listener that never accepts (backlog 2).

    All SYNs reach the server before any final ACK (they are a round trip apart), so the accept
    queue is still empty when they arrive: the first ones get request sockets, and once the SYN
    queue counts ``backlog`` the kernel answers with syncookie SYN-ACKs (TCPReqQFullDoCookies).
    One round trip later the final ACKs arrive; three fill the accept queue and the kernel drops
    the rest (ListenOverflows).  Every client has seen SYN-ACK and sent its ACK: connect() says
    connected, and the server never had the connection.
    """
    from .. import api
    from . import wire

    why = wire.wire_unavailable_reason()
    if why is not None:
        raise RuntimeError(f"the impaired link cannot run here: {why}")
    with wire.impaired(delay_ms=delay_ms) as link:
        server = link.server_ns
        listener = server.socket(socket.AF_INET, socket.SOCK_STREAM)
        with contextlib.closing(listener):
            listener.bind((link.server_addr, 0))
            listener.listen(backlog)
            port = listener.getsockname()[1]
            before = server.read_netstat()
            cap = Capture(port, interface=None, source=link.client_ns).open()
            with contextlib.closing(cap):
                with link.client():
                    results = api.connect_many([f"{link.server_addr}:{port}"] * burst, concurrency=burst,
                                               timeout=timeout, keep=True)
                ports = [_client_port(r) for r in results]
                time.sleep(4 * delay_ms / 1e3 + 0.02)  # the last final ACKs reach the server a one-way delay later
                after = server.read_netstat()
                listener.setblocking(False)
                accepted = set()
                for _ in range(burst):  # who made it into the accept queue
                    try:
                        conn, peer = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    accepted.add(peer[1])
                    conn.close()
                for r in results:
                    r.close()
                _settle(cap)
        where = f"impaired link, {delay_ms:g} ms each way; listener (backlog {backlog}, never accepting) in the server namespace"
    counters = {k: after.get(k, 0) - before.get(k, 0) for k in OVERFLOW_COUNTERS}
    dropped = [i for i, (r, p) in enumerate(zip(results, ports)) if r.connected and p not in accepted]
    index = dropped[-1] if dropped else 0
    result = results[index]
    note = (("the client shown connected, and the server dropped its final ACK; " if dropped else "") +
            f"{len([r for r in results if r.connected])} of {burst} clients connected, the server accepted "
            f"{len(accepted)}; server counters: " + ", ".join(f"{k} +{v}" for k, v in counters.items()))
    return Shot("syncookie", result, for_client_port(cap.packets, ports[index]), results, cap.packets, where,
                cap.offset_error_ns, note, counters)


# -- the instrument's accuracy ---------------------------------------------------------------------

@dataclass
class Accuracy:
    """nbconn's handshake time against the packets', connect by connect.

    Per connect (ns): ``nbconn`` = handshake_ns (clock read before connect() to the clock read
    after getsockopt(SO_ERROR)); ``wire`` = SYN out to SYN-ACK in; ``difference`` = nbconn - wire,
    split into ``before_syn`` (connect() called -> SYN on the wire) and ``after_synack``
    (SYN-ACK arrived -> SO_ERROR returned).  Only connects with exactly one SYN and one SYN-ACK
    count: a retransmission makes "the" handshake ambiguous (``skipped`` says how many).
    """

    label: str
    nbconn: list
    wire: list
    before_syn: list
    after_synack: list
    synack_inside_connect: list  # 1 when the SYN-ACK arrived before connect() returned
    skipped: int
    clock_error_ns: int
    frames_dropped: int = 0  # by the kernel, for want of room in the packet socket (should be 0)

    @property
    def difference(self) -> list:
        return [a - b for a, b in zip(self.nbconn, self.wire)]

    def summary(self) -> dict:
        from ..stats import percentiles

        def us(values):
            return {k: v / 1e3 for k, v in percentiles(values, (50, 99)).items()}

        return {"label": self.label, "count": len(self.nbconn), "skipped": self.skipped,
                "frames_dropped": self.frames_dropped,
                "clock_error_us": self.clock_error_ns / 1e3, "difference_us": us(self.difference),
                "wire_us": us(self.wire), "nbconn_us": us(self.nbconn),
                "before_syn_us": us(self.before_syn), "after_synack_us": us(self.after_synack),
                "synack_inside_connect": sum(self.synack_inside_connect)}


def _split(result, packets) -> tuple | None:
    syns = [p for p in packets if p.dir == "out" and p.flags == "S"]
    synacks = [p for p in packets if p.dir == "in" and p.flags == "SA"]
    if len(syns) != 1 or len(synacks) != 1 or result.handshake_ns is None:
        return None
    decided = next(s.t_ns for s in result.steps if s.name == "so_error")
    t_connect = decided - result.handshake_ns
    returned = next(s.t_ns for s in result.steps if s.name == "connect")
    return (result.handshake_ns, synacks[0].t_ns - syns[0].t_ns, syns[0].t_ns - t_connect, decided - synacks[0].t_ns,
            int(synacks[0].t_ns <= returned))


def _quiet_listener(host: str, source=None) -> socket.socket:
    """A listener nobody accepts from: the kernel completes every handshake on its own.

    Why not a lab peer: their accept thread lives in this process, and when a handshake wakes
    it, it takes the GIL while our thread is still inside connect() -- the thread then waits for
    the GIL on its way out, and that wait would be counted as handshake time.  Unaccepted
    connections sit in the accept queue (closed by the client's RST, they take no more), so the
    backlog bounds how many connects one listener serves.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM) if source is None else \
        source.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return sock


def accuracy(count: int = 1000, *, impaired: bool = False, delay_ms: float = 10.0, batch: int = 100) -> Accuracy:
    """``count`` connects one after another to a listener, each compared with its own SYN and SYN-ACK.

    ``impaired=False``: host loopback; True: the impaired link with ``delay_ms`` each way.
    """
    from .. import api

    count = validate.integer("count", count, 1, 4000)  # at most the quiet listener's backlog
    batch = validate.integer("batch", batch, 1, 1000)
    delay_ms = validate.number("delay_ms", delay_ms, 0, 1000)
    rows: list = []
    skipped = 0
    with contextlib.ExitStack() as stack:
        ns = None
        if not impaired and unavailable_reason() is not None:
            # A normal user: listener, client sockets and packet socket inside a lab namespace of our own.
            from .namespace import namespace

            ns = stack.enter_context(namespace())
        if impaired:
            from . import wire

            why = wire.wire_unavailable_reason()
            if why is not None:
                raise RuntimeError(f"the impaired link cannot run here: {why}")
            link = stack.enter_context(wire.impaired(delay_ms=delay_ms))
            listener = stack.enter_context(_quiet_listener(link.server_addr, link.server_ns))
            port = listener.getsockname()[1]
            target, client_side = f"{link.server_addr}:{port}", link.client
            cap = stack.enter_context(contextlib.closing(Capture(port, interface=None, source=link.client_ns).open()))
            label = f"impaired link, {delay_ms:g} ms each way"
        else:
            listener = stack.enter_context(_quiet_listener("127.0.0.1", ns))
            port = listener.getsockname()[1]
            target = f"127.0.0.1:{port}"
            client_side = contextlib.nullcontext if ns is None else ns.using
            cap = stack.enter_context(Capture(port, interface="lo", source=ns))
            label = "loopback"  # where: the notebook says (root: the host's lo; else a lab namespace's)
        done = 0
        while True:
            if done >= count:
                break
            n = min(batch, count - done)
            with client_side():
                # one at a time: nothing else on the loop adds to the times compared
                results = api.connect_many([target] * n, concurrency=1, timeout=5.0, keep=True, linger=0)
            ports = [_client_port(r) for r in results]
            for r in results:
                r.close()
            if ns is not None and ns.created < done + n:
                raise RuntimeError("this nbconn's flow did not make its sockets in the lab namespace "
                                   "(nbconn.socketsource)")
            _settle(cap, 0.005)
            by_port: dict = {}
            for p in cap.packets:
                by_port.setdefault(p.sport if p.dir == "out" else p.dport, []).append(p)
            for r, client_port in zip(results, ports):
                row = _split(r, by_port.get(client_port, [])) if client_port else None
                if row is None:
                    skipped += 1
                else:
                    rows.append(row)
            cap.packets.clear()
            cap._seen_syn.clear()
            done += n
        error = cap.offset_error_ns + abs(cap.clock_drift_ns)
    columns = list(zip(*rows)) if rows else [()] * 5
    return Accuracy(label, *[list(c) for c in columns], skipped=skipped, clock_error_ns=error,
                    frames_dropped=cap.dropped)



# -- the plot --------------------------------------------------------------------------------------

def plot_shots(shots, *, title: str | None = None):
    """One panel per scenario: each call a bar from its start to its return, the segments out and in below,
    on one time axis since socket() (drawn by :func:`nbconn.plots.packets`, the one home of the figure)."""
    from ..plots import packets

    return packets(shots, title=title)
