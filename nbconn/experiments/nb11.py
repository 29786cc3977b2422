"""Notebook 11's experiments: connects with the packet capture around them, and the instrument's accuracy.

The instrument -- the packet socket, its BPF filter, the clock pair, the parsed segments -- is
:mod:`nbconn.lab.capture`; this module only *uses* it: :func:`shoot` runs one lab scenario (or one
burst) inside a capture and returns a :class:`Shot` (the connect, its segments, where the sockets
lived), and :func:`accuracy` compares nbconn's handshake time with the wire's, connect by connect.
The figure is :func:`nbconn.view.plots.packets` (the notebook calls it with the shots).
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass

from .. import api, validate
from ..lab import peers, wire
from ..lab.capture import Capture, for_client_port, unavailable_reason
from ..lab.namespace import namespace
from ..stats import percentiles


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


def client_port_of(result) -> int | None:
    sock = result.sock
    return sock.getsockname()[1] if sock is not None else None


def settle(capture: Capture, seconds: float = 0.02) -> None:
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
    validate.choice("scenario", scenario, validate.CAPTURE_SCENARIOS)
    delay_ms = validate.number("delay_ms", delay_ms, 0, 1000)
    if timeout is None:
        timeout = 2.5 if scenario == "blackhole" else 3.0
    timeout = validate.number("timeout", timeout, 0, 60, low_open=True)
    burst = validate.integer("burst", burst, 2, 200)
    if scenario == "impaired":
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
                client_port = client_port_of(result)
                result.close()
                settle(cap)
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
        ports = [client_port_of(r) for r in results]
        for r in results:
            r.close()
        if ns is not None and ns.created - made_before < len(results):
            raise RuntimeError("this nbconn's flow did not make its sockets in the lab namespace (nbconn.socketsource)")
        settle(cap)
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
                ports = [client_port_of(r) for r in results]
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
                settle(cap)
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


def quiet_listener(host: str, source=None) -> socket.socket:
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
    count = validate.integer("count", count, 1, 4000)  # at most the quiet listener's backlog
    batch = validate.integer("batch", batch, 1, 1000)
    delay_ms = validate.number("delay_ms", delay_ms, 0, 1000)
    rows: list = []
    skipped = 0
    with contextlib.ExitStack() as stack:
        ns = None
        if not impaired and unavailable_reason() is not None:
            # A normal user: listener, client sockets and packet socket inside a lab namespace of our own.
            ns = stack.enter_context(namespace())
        if impaired:
            why = wire.wire_unavailable_reason()
            if why is not None:
                raise RuntimeError(f"the impaired link cannot run here: {why}")
            link = stack.enter_context(wire.impaired(delay_ms=delay_ms))
            listener = stack.enter_context(quiet_listener(link.server_addr, link.server_ns))
            port = listener.getsockname()[1]
            target, client_side = f"{link.server_addr}:{port}", link.client
            cap = stack.enter_context(contextlib.closing(Capture(port, interface=None, source=link.client_ns).open()))
            label = f"impaired link, {delay_ms:g} ms each way"
        else:
            listener = stack.enter_context(quiet_listener("127.0.0.1", ns))
            port = listener.getsockname()[1]
            target = f"127.0.0.1:{port}"
            client_side = contextlib.nullcontext if ns is None else ns.using
            cap = stack.enter_context(Capture(port, interface="lo", source=ns))
            label = "loopback"  # where: the notebook says (root: the host's lo; else a lab namespace's)
        for done in range(0, count, batch):  # bounded: count / batch rounds
            n = min(batch, count - done)
            with client_side():
                # one at a time: nothing else on the loop adds to the times compared
                results = api.connect_many([target] * n, concurrency=1, timeout=5.0, keep=True, linger=0)
            ports = [client_port_of(r) for r in results]
            for r in results:
                r.close()
            if ns is not None and ns.created < done + n:
                raise RuntimeError("this nbconn's flow did not make its sockets in the lab namespace "
                                   "(nbconn.socketsource)")
            settle(cap, 0.005)
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
        error = cap.offset_error_ns + abs(cap.clock_drift_ns)
    columns = list(zip(*rows)) if rows else [()] * 5
    return Accuracy(label, *[list(c) for c in columns], skipped=skipped, clock_error_ns=error,
                    frames_dropped=cap.dropped)
