"""Plumbing for notebook 15 (the second handshake): a TLS peer across the lab link, the capture cut per
connection, the trace and the records on one clock, a real nginx's strace cut per connect.  The
experiments themselves are on the notebook's page."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from ..lab import peers, tlspeers, tlsrecords


@contextlib.contextmanager
def tls_server_in(host: str, source, pki, *, tickets: bool = True):
    """The lab's TLS server (:mod:`nbconn.lab.tlspeers`: the test CA's certificate, TLS 1.2 and 1.3) listening on
    ``host`` in the namespace ``source`` (the link's server side, or a lab namespace).  The listener is made there
    and passed here; the handshakes run in this process's threads, as for the loopback peers."""
    with peers._listener(host, 4096, source) as sock:
        target, port = peers._target_for(sock)
        peer = tlspeers._tls_peer(target, "tls_server", port, pki.cafile)
        server = tlspeers._Server(tlspeers.server_context(pki, tickets=tickets), peer)
        try:
            with peers._Acceptor(sock, peer, server.handle):
                yield peer
        finally:
            server.close()


def tls_server_across(link, pki, *, tickets: bool = True):
    """:func:`tls_server_in` the link's server namespace: every record crosses the impaired wire."""
    return tls_server_in(link.server_addr, link.server_ns, pki, tickets=tickets)


@dataclass
class Bench:
    """Where the notebook measures: the TLS ``peer``, ``client()`` (a context: the connects' sockets are made on
    the client side), ``capture()`` (a Capture with payload, not yet open, on the client side), the round trip
    ``rtt_ms`` the path adds, and ``where`` in words."""

    peer: object
    client: object
    capture: object
    rtt_ms: float
    where: str


@contextlib.contextmanager
def bench(pki, delay_ms: float):
    """The lab link with ``delay_ms`` each way when it can run here; else, said in ``where``, a lab namespace's own
    loopback (no delay: the round trips are still counted from the packets, and each takes microseconds)."""
    from ..lab import wire
    from ..lab.capture import Capture

    why = wire.wire_unavailable_reason()
    with contextlib.ExitStack() as stack:
        if why is None:
            link = stack.enter_context(wire.impaired(delay_ms=delay_ms))
            peer = stack.enter_context(tls_server_across(link, pki))
            yield Bench(peer, link.client,
                        lambda: Capture(peer.port, interface=None, source=link.client_ns, payload=True),
                        2 * delay_ms, f"the lab link, {delay_ms:g} ms each way")
            return
        from ..lab.namespace import namespace

        ns = stack.enter_context(namespace())
        peer = stack.enter_context(tls_server_in("127.0.0.1", ns, pki))
        yield Bench(peer, ns.using, lambda: Capture(peer.port, interface="lo", source=ns, payload=True), 0.0,
                    f"a lab namespace's loopback, no delay (the link cannot run here: {why})")


def connections(packets) -> list:
    """The captured segments cut per connection (by the client's port), in the order their SYNs left.  Only
    connections whose SYN was captured: the tail of one that began before (its FIN, a late ticket) is left out."""
    by_port: dict = {}
    for p in packets:
        by_port.setdefault(p.sport if p.dir == "out" else p.dport, []).append(p)
    return sorted((segs for segs in by_port.values() if segs[0].dir == "out" and segs[0].flags == "S"),
                  key=lambda segs: segs[0].t_ns)


def handshake_done_ns(result) -> int | None:
    """When SSL_do_handshake() returned 1 (CLOCK_MONOTONIC, the capture's clock), or None."""
    return next((t2 for name, _call, ret, _t1, t2 in result._steps if name == "ssl_handshake" and ret == 1), None)


def timeline(result, packets, *, until_ns: int | None = None) -> str:
    """The syscalls (connect, then TLS) and the segments with their TLS records, in ms since socket().  Pure ACKs
    after the TCP handshake are left out."""
    t0 = result.connect.started_ns
    rows = [(s.t_start_ns, f"{(s.t_ns - t0) / 1e6:8.2f} ms  {s.call}") for s in result.connect.steps]
    ended = False
    for name, call, ret, t1, t2 in result._steps:
        if until_ns is not None and t1 > until_ns and name in ("ssl_shutdown", "close", "unregister"):
            # nbconn ending its measurement, not nginx's step: nginx sends the request next
            if not ended:
                rows.append((t1, f"{'':11}  (nbconn stops here; nginx goes on to ngx_http_upstream_send_request: "
                                 "getsockopt(SO_ERROR), then the request's write)"))
                ended = True
            continue
        rows.append((t1, f"{(t2 - t0) / 1e6:8.2f} ms  {call}" + (f" = {ret}" if ret is not None else "")))
    records: dict = {}
    for packet, record in tlsrecords.records_of(packets):
        records.setdefault(id(packet), []).append(record)
    handshake_ack = next((p for p in packets if p.dir == "out" and p.flags == "A"), None)
    for p in packets:
        if until_ns is not None and p.t_ns > until_ns:
            continue
        if p.flags == "A" and not p.payload and p is not handshake_ack:
            continue  # a pure ACK after the TCP handshake: sent or not as the delayed-ACK timer decides
        arrow = "->" if p.dir == "out" else "<-"
        what = "; ".join(str(r) for r in records.get(id(p), [])) or (f"{p.payload} bytes" if p.payload else "")
        rows.append((p.t_ns, f"{'':11}  [wire {arrow}] {p.flags:<2} {what}"))
    rows.sort(key=lambda row: row[0])
    head = f"{'called':>11}  {'returned':>11}"
    return "\n".join([head] + [f"{(t - t0) / 1e6:8.2f} ms  {text}" for t, text in rows])


def connects_of(lines: list[str], port: int) -> list[list[str]]:
    """From an ``strace -f`` of nginx: per connect() to ``port``, the worker's calls on that descriptor and
    its epoll_waits, from connect() to close().  nginx registers the descriptor (EPOLL_CTL_ADD, before
    connect()) with its connection's address as the epoll data (``ee.data.ptr``, ngx_epoll_add_connection),
    and epoll_wait reports that data back: of each epoll_wait only this connection's events are kept (the
    client's connection, for one, reports on the same loop), and a wait that reported only others' events is
    left out.  Without the registration in the trace every epoll_wait line is kept."""
    found, current, fd, pid, data = [], None, None, None, None
    registered: dict = {}  # (pid, fd) -> the u64 of its last EPOLL_CTL_ADD
    for raw in lines:
        m = re.match(r"^(\d+)\s+(?:\d\d:\d\d:\d\d\.\d+\s+)?(.*)$", raw)
        if not m:
            continue
        who, call = m.group(1), re.sub(r"\s+= ", " = ", m.group(2))
        added = re.match(r"epoll_ctl\(\d+, EPOLL_CTL_ADD, (\d+), .*u64=(\d+)", call)
        if added:
            registered[(who, added.group(1))] = added.group(2)
        opened = re.match(rf"connect\((\d+), .*htons\({port}\)", call)
        if opened:
            current, fd, pid = [], opened.group(1), who
            data = registered.get((who, fd))
            found.append(current)
        if current is None or who != pid:
            continue
        if call.startswith("epoll_wait("):
            call = _events_of(call, data)
            if call is not None:
                current.append(call)
        elif re.match(rf"\w+\({fd}[,)]", call):
            current.append(call)
            if call.startswith(f"close({fd})"):
                current = None
    return found


def _events_of(call: str, data: str | None) -> str | None:
    """An epoll_wait line with only the events whose data is ``data`` (None: all); None when it reported
    events and none of them were these.  A wait that reported nothing (the timer's) is kept."""
    if data is None:
        return call
    m = re.match(r"(epoll_wait\(\d+, \[)(.*)(\], .*)$", call)
    if not m or not m.group(2):
        return call
    entries = re.findall(r"\{events=[^{}]*\{[^{}]*\}\}", m.group(2))
    mine = [e for e in entries if f"u64={data}}}" in e]
    if not mine:
        return None
    rest = re.sub(r" = \d+", f" = {len(mine)}", m.group(3))
    return m.group(1) + ", ".join(mine) + rest


def record_io(calls: list[str]) -> list[str]:
    """The TLS record I/O in one connect's calls, up to the request: "write: handshake", "read: handshake",
    "write: change_cipher_spec"... (each read() or write() that moved data, named by its first record's
    content type); the request itself, the first write of application data, ends the list."""
    found = []
    for call in calls:
        if call.startswith(("writev(", "close(")):
            break
        m = re.match(r'(read|write)\(\d+, "\\(\d+)', call)
        if m:
            kind = tlsrecords.CONTENT_TYPES.get(int(m.group(2), 8), "?")
            if m.group(1) == "write" and kind == "application_data":
                break
            found.append(f"{m.group(1)}: {kind}")
    return found


def condensed(call: str) -> str:
    """One strace line of nginx's worker, short: the data and addresses left out (they change every run)."""
    name = call.split("(", 1)[0]
    ret = call.rsplit(" = ", 1)[1] if " = " in call else "?"
    if name == "epoll_wait":
        events = re.findall(r"events=([A-Z|]+)", call)
        return f"epoll_wait() -> {', '.join(events) or 'nothing'}"
    if name in ("read", "write"):
        m = re.match(r'\w+\(\d+, "\\(\d+)', call)
        kind = tlsrecords.CONTENT_TYPES.get(int(m.group(1), 8), "?") if m else None
        if ret.startswith("-1"):
            return f"{name}() = {ret.split(' (')[0].replace('-1 ', '')}"
        return f"{name}() = {ret} bytes" + (f", first record: {kind}" if kind else "")
    if name == "setsockopt":
        return "setsockopt(TCP_NODELAY)" if "TCP_NODELAY" in call else "setsockopt()"
    if name == "getsockopt":
        return "getsockopt(SO_ERROR) = 0" if "[0]" in call else f"getsockopt(SO_ERROR) {call.split('SO_ERROR, ')[1]}"
    if name == "connect":
        return "connect() = " + ret.split(" (")[0]
    return f"{name}()"


def https_nginx(peer, cafile: str, *, reuse: bool, syscalls: str, connect_timeout: float = 1.0):
    """A real nginx with ``proxy_pass https://`` to ``peer`` (:func:`nbconn.nginx.oracle.https_nginx`: verify
    against the lab CA, the name "localhost"), ``proxy_ssl_session_reuse`` on or off; under strace."""
    from ..nginx.oracle import https_nginx as make

    return make([str(peer)], cafile=cafile, session_reuse=reuse, connect_timeout=connect_timeout, read_timeout=1.0,
                next_upstream=(), strace=True, strace_syscalls=syscalls)


def plot_cases(cases: dict, *, rtt_ms: float, title: str, width: float = 3.6):
    """One row per case: each connect's TCP handshake (connect() to SO_ERROR) and, for the TLS cases, connect()
    to SSL_do_handshake() = 1 (ms), as points; bars at the medians; dashed lines at whole round trips.
    ``width`` (inches): narrow enough that a phone showing the book 390 px wide shows the whole figure (about
    360 px at the inline backend's 100 dpi); each case is named above its row, the legend is under the axes."""
    import textwrap

    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(cases)
    fig, ax = plt.subplots(figsize=(width, 1.9 + 0.55 * len(cases)))
    rng = np.random.default_rng(0)
    shown = set()
    for row, label in enumerate(labels):
        y = len(labels) - 1 - row
        for key, color, name, dy in (("tcp_ms", "tab:blue", "TCP: connect() to SO_ERROR", 0.1),
                                     ("total_ms", "tab:orange", "+ TLS: connect() to\nSSL_do_handshake() = 1",
                                      -0.14)):
            values = np.array(cases[label].get(key) or [])
            if not len(values):
                continue
            ax.scatter(values, y + dy + rng.uniform(-0.05, 0.05, len(values)), s=7, color=color,
                       label=None if name in shown else name)
            shown.add(name)
            ax.plot([np.median(values)] * 2, [y + dy - 0.13, y + dy + 0.13], color="black", lw=1.3)
        ax.text(0.01, y + 0.3, label, transform=ax.get_yaxis_transform(), fontsize=7.5, va="center", ha="left")
    top = max(max(c.get("total_ms") or c["tcp_ms"]) for c in cases.values())
    rounds = int(top // rtt_ms) + 1 if rtt_ms > 0 else 0  # no delay (the fallback): no round-trip lines
    for k in range(1, rounds + 1):
        ax.axvline(k * rtt_ms, color="grey", ls="--", lw=0.8)
        ax.text(k * rtt_ms, len(labels) - 0.45, f" {k} RTT", fontsize=7, color="grey", va="bottom", ha="left")
    ax.set_yticks([])
    ax.set_ylim(-0.5, len(labels) - 0.2)
    ax.set_xlabel("ms since connect() (black bars: medians)", fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.set_xlim(0, (rounds + 0.45) * rtt_ms if rounds else top * 1.1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, fontsize=7.5, frameon=False)
    ax.set_title(textwrap.fill(title, 44), fontsize=8.5)
    fig.tight_layout()
    return fig
