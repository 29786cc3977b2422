"""Plumbing for notebook 15 (the second handshake): a TLS peer across the lab link, the capture cut per
connection, the trace and the records on one clock, a real nginx's strace cut per connect.  The
experiments themselves are on the notebook's page."""

from __future__ import annotations

import contextlib
import re

from ..lab import peers, tlspeers, tlsrecords


@contextlib.contextmanager
def tls_server_across(link, pki, *, tickets: bool = True):
    """The lab's TLS server (:mod:`nbconn.lab.tlspeers`: the test CA's certificate, TLS 1.2 and 1.3) listening
    in the link's server namespace, so every record crosses the 20 ms wire.  The listener is made there and
    passed here; the handshakes run in this process's threads, as for the loopback peers."""
    with peers._listener(link.server_addr, 4096, link.server_ns) as sock:
        target, port = peers._target_for(sock)
        peer = tlspeers._tls_peer(target, "tls_server", port, pki.cafile)
        server = tlspeers._Server(tlspeers.server_context(pki, tickets=tickets), peer)
        try:
            with peers._Acceptor(sock, peer, server.handle):
                yield peer
        finally:
            server.close()


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


def data_directions(packets, until_ns: int) -> list:
    """"out"/"in" for each segment carrying data, up to ``until_ns`` (the TCP handshake carries none)."""
    return [p.dir for p in packets if p.payload and p.t_ns <= until_ns]


def timeline(result, packets, *, until_ns: int | None = None) -> str:
    """The syscalls (connect, then TLS) and the segments with their TLS records, in ms since socket()."""
    t0 = result.connect.started_ns
    rows = [(s.t_start_ns, f"{(s.t_ns - t0) / 1e6:8.2f}  {s.call}") for s in result.connect.steps]
    rows += [(t1, f"{(t2 - t0) / 1e6:8.2f}  {call}" + (f" = {ret}" if ret is not None else ""))
             for _name, call, ret, t1, t2 in result._steps]
    records: dict = {}
    for packet, record in tlsrecords.records_of(packets):
        records.setdefault(id(packet), []).append(record)
    for p in packets:
        if until_ns is not None and p.t_ns > until_ns:
            continue
        arrow = "->" if p.dir == "out" else "<-"
        what = "; ".join(str(r) for r in records.get(id(p), [])) or (f"{p.payload} bytes" if p.payload else "")
        rows.append((p.t_ns, f"{'':8}      [wire {arrow}] {p.flags:<2} {what}"))
    rows.sort(key=lambda row: row[0])
    head = f"{'called':>8}  {'returned':>8}"
    return "\n".join([head] + [f"{(t - t0) / 1e6:8.2f}  {text}" for t, text in rows])


def connects_of(lines: list[str], port: int) -> list[list[str]]:
    """From an ``strace -f`` of nginx: per connect() to ``port``, the worker's calls on that descriptor and
    its epoll_waits, from connect() to close()."""
    found, current, fd, pid = [], None, None, None
    for raw in lines:
        m = re.match(r"^(\d+)\s+(?:\d\d:\d\d:\d\d\.\d+\s+)?(.*)$", raw)
        if not m:
            continue
        who, call = m.group(1), re.sub(r"\s+= ", " = ", m.group(2))
        opened = re.match(rf"connect\((\d+), .*htons\({port}\)", call)
        if opened:
            current, fd, pid = [], opened.group(1), who
            found.append(current)
        if current is not None and who == pid and (re.match(rf"\w+\({fd}[,)]", call)
                                                    or call.startswith("epoll_wait(")):
            current.append(call)
            if call.startswith(f"close({fd})"):
                current = None
    return found


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


def https_nginx(peer, cafile: str, *, reuse: bool, syscalls: str, connect_timeout: float = 1.0):
    """nbconn.nginx.Nginx with ``proxy_pass https://`` to ``peer``, proxy_ssl_verify on against the lab CA,
    the name "localhost", and ``proxy_ssl_session_reuse`` on or off; under strace."""
    from ..nginx import Nginx

    class HTTPSNginx(Nginx):
        def config(self):
            https = ("proxy_pass https://backend;\n"
                     "            proxy_ssl_verify on;\n"
                     f"            proxy_ssl_trusted_certificate {cafile};\n"
                     "            proxy_ssl_name localhost;\n"
                     f"            proxy_ssl_session_reuse {'on' if reuse else 'off'};")
            text = super().config()
            if "proxy_pass http://backend;" not in text:
                raise RuntimeError("nbconn.nginx's configuration no longer has the proxy_pass line to replace")
            return text.replace("proxy_pass http://backend;", https)

    return HTTPSNginx([str(peer)], connect_timeout=connect_timeout, read_timeout=1.0, next_upstream=(),
                      strace=True, strace_syscalls=syscalls)


def plot_cases(cases: dict, *, title: str):
    """One row per case: each connect's TCP handshake and TLS handshake (ms) as points, and their medians."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.55 * len(cases)))
    rng = np.random.default_rng(0)
    labels = list(cases)
    for row, label in enumerate(labels):
        tcp = np.array(cases[label]["tcp_ms"])
        tls_ms = np.array(cases[label]["tls_ms"]) if cases[label]["tls_ms"] else np.array([])
        y = len(labels) - 1 - row
        ax.scatter(tcp, y + 0.12 + rng.uniform(-0.06, 0.06, len(tcp)), s=10, color="tab:blue",
                   label="TCP handshake (connect)" if row == 0 else None)
        if len(tls_ms):
            ax.scatter(tls_ms, y - 0.12 + rng.uniform(-0.06, 0.06, len(tls_ms)), s=10, color="tab:orange",
                       label="TLS handshake (SSL_do_handshake)" if row == 0 else None)
            ax.plot([np.median(tls_ms)] * 2, [y - 0.3, y + 0.05], color="tab:orange", lw=2)
        ax.plot([np.median(tcp)] * 2, [y - 0.05, y + 0.3], color="tab:blue", lw=2)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(list(reversed(labels)))
    ax.set_xlabel("ms (bars: medians)")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
