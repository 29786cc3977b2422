"""The impaired link: two namespaces joined by the forwarder, as a normal user or as root (one path for both).

The lab's helper (:mod:`nbconn.lab.child`) builds everything inside namespaces it
owns: the client namespace, then the server namespace, one TUN device in each with a
point-to-point address (198.18.0.1 <-> 198.18.0.2, RFC 2544's benchmarking range),
and forks the forwarder (:mod:`.forwarder`) holding both devices.  The notebook's
process enters neither namespace: ``with link.client():`` makes step 1 of every
nbconn connect in this thread ask the helper for a socket made in the client
namespace (:mod:`nbconn.socketsource`; the descriptor comes back over SCM_RIGHTS),
so the connect leaves through the client's TUN device and crosses the wire.

Why one path for root too: the old root path (``ip netns add``, a thread switching
namespaces with setns) left named namespaces in /var/run/netns when the process was
killed, could strand a thread in a namespace when interrupted mid-switch, and was a
second way of doing the same thing.  Here nothing has a name: the namespaces live as
long as the helper and the sockets made in them; the helper exits when this process
closes its control socket or dies (:mod:`nbconn.lab.control`), the forwarder with it.
As real root the helper simply skips the user namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import socket
import threading
from collections.abc import Iterator

from ... import socketsource, validate
from ...stats import percentile
from ..control import LabHelperError, LabProcess, needs_userns
from ..namespace import Namespace
from . import params as _params
from .forwarder import QUEUE_LIMIT

CLIENT_ADDR = "198.18.0.1"  # RFC 2544 benchmarking range, never routed
SERVER_ADDR = "198.18.0.2"
# With router=: a prefix beyond the server namespace, still inside RFC 2544's 198.18.0.0/15.  The client
# routes it via SERVER_ADDR; the server namespace forwards (ip_forward=1) and holds a route of the
# chosen type for it, so no host answers there: only the router does, or nobody.
FAR_PREFIX = "198.19.0.0/24"
FAR_ADDR = "198.19.0.1"
CLIENT_IFNAME = "nbwire-c"
SERVER_IFNAME = "nbwire-s"
HOLD_LIMIT = 4096
_FORWARDER_START_S = 10.0
_FORWARDER_REPLY_S = 2.0
_FORWARDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forwarder.py")

__all__ = ["Link", "impaired", "CLIENT_ADDR", "SERVER_ADDR", "FAR_ADDR", "FAR_PREFIX", "QUEUE_LIMIT"]


def _summarize_lateness(stats: dict) -> dict:
    """The forwarder's reply with ``recent_lateness_ns`` turned into ``p50_lateness_us`` and ``p99_lateness_us``
    (nbconn.stats's nearest rank; 0.0 before any packet was forwarded)."""
    out = {}
    for key, value in stats.items():  # the percentiles take the samples' place: the keys keep their order
        if key == "recent_lateness_ns":
            recent = sorted(value)
            for p in (50, 99):
                out[f"p{p}_lateness_us"] = percentile(recent, p) / 1e3 if recent else 0.0
        else:
            out[key] = value
    return out


class Link:
    """Two namespaces joined by the impairment wire; created by :func:`impaired`.

    Attributes: ``client_addr``, ``server_addr``; ``client_ns``, ``server_ns``
    (:class:`nbconn.lab.namespace.Namespace`: ``socket()``, ``sysctl()``,
    ``read_netstat()``); ``delay_ms`` (out, back), ``jitter_ms``, ``loss`` (out, back),
    ``seed``, ``syn_linear_timeouts``; ``router`` (the route type the server namespace holds for
    ``far_prefix``, or None) and ``far_addr`` (an address there, None without a router); ``pid`` (the
    helper), ``setup_s``.  If the helper or the
    forwarder dies or is stopped, the next socket asked for, or the end of the ``with`` block, raises
    :class:`nbconn.lab.control.LabHelperError` naming it.
    """

    def __init__(self, params: _params.Params) -> None:
        self._params = params
        self.client_addr = CLIENT_ADDR
        self.server_addr = SERVER_ADDR
        self.delay_ms = (params.delay_s[0] * 1000.0, params.delay_s[1] * 1000.0)
        self.jitter_ms = params.jitter_s * 1000.0
        self.loss = params.loss
        self.seed = params.seed
        self.syn_linear_timeouts = params.syn_linear_timeouts
        self.router = params.router
        self.far_prefix = FAR_PREFIX if params.router else None
        self.far_addr = FAR_ADDR if params.router else None
        self.process: LabProcess | None = None
        self.client_ns: Namespace | None = None
        self.server_ns: Namespace | None = None
        self.pid = 0
        self.forwarder_pid = 0
        self.setup_s = 0.0
        self._fwd: socket.socket | None = None
        self._fwd_lock = threading.Lock()
        self._last_stats: dict = {}
        self._peers = contextlib.ExitStack()
        self._listeners: list = []
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<Link {self.client_addr}<->{self.server_addr} delay_ms={self.delay_ms} "
                f"jitter_ms={self.jitter_ms} loss={self.loss} {state}>")

    # -- construction ------------------------------------------------------------------------
    def _config(self, control_fd: int, userns: bool) -> dict:
        common = {}
        if os.path.isdir("/proc/sys/net/ipv6"):  # no IPv6 chatter on the wire
            common = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
        client = dict(common)
        if self.syn_linear_timeouts is not None:
            client[_params.SYN_LINEAR_SYSCTL] = str(self.syn_linear_timeouts)
        server = dict(common)
        client_routes, server_routes = [], []
        if self.router is not None:
            # The server namespace becomes the client's next hop for FAR_PREFIX.  ip_forward=1 matters twice:
            # the SYN is routed, not delivered; and net/ipv4/route.c ip_error sends ICMP for an unreachable or
            # prohibit route only when the input device forwards (without it: counted, dropped, silent).
            server["net.ipv4.ip_forward"] = "1"
            client_routes = [f"{FAR_PREFIX} via {SERVER_ADDR} dev {CLIENT_IFNAME}"]
            server_routes = [f"{self.router} {FAR_PREFIX}"]
        return {"sysctls": client, "routes": [], "wire": {
            "client_ifname": CLIENT_IFNAME, "server_ifname": SERVER_IFNAME,
            "client_addr": CLIENT_ADDR, "server_addr": SERVER_ADDR, "server": {"sysctls": server},
            "client_routes": client_routes, "server_routes": server_routes,
            "forwarder_path": _FORWARDER, "control_fd": control_fd,
            "params": self._params.forwarder(to_nobody=not userns)}}

    def _open(self) -> None:
        """Start the helper (namespaces, devices, forwarder); on failure the caller closes."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._fwd = ours
        try:
            # ``ours`` is a companion: if the start is interrupted, it is closed before the wait for the helper,
            # so the forwarder sees end of file and the helper does not wait for it (issue 24.4: 2.1 s).
            self.process = LabProcess(self._config(theirs.fileno(), needs_userns()), extra_fds=(theirs.fileno(),),
                                      companions={ours: "the lab's forwarder"})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the helper's copy went to the forwarder
        self.pid = self.process.pid
        self.forwarder_pid = self.process.info.get("forwarder_pid", 0)
        self.process.companions[ours] = f"the lab's forwarder (pid {self.forwarder_pid})"
        if not select.select([ours], [], [], _FORWARDER_START_S)[0] or ours.recv(64) != b"ready":
            self.process.stop()
            raise RuntimeError(f"the forwarder did not start: {self.process.stderr or 'no message'}")
        self.setup_s = self.process.setup_s
        self.client_ns = Namespace(self.process, "client", "the lab's client namespace")
        self.server_ns = Namespace(self.process, "server", "the lab's server namespace")

    # -- public API ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed or self.client_ns is None:
            raise RuntimeError("this link has been closed")

    def client(self):
        """Within the block, step 1 of every nbconn connect in this thread makes its socket in the client namespace."""
        self._check_open()
        return socketsource.using(self.client_ns)

    def server(self):
        """Within the block, step 1 makes its sockets in the server namespace."""
        self._check_open()
        return socketsource.using(self.server_ns)

    def serve_listener(self, backlog: int = 128, hold: bool = False) -> int:
        """Listen on ``server_addr`` in the server namespace; return the port.

        The listener is made in the server namespace and passed here; the lab peers'
        acceptor (:func:`nbconn.lab.peers.listening`) accepts on it in this process and
        closes each connection, or with ``hold=True`` keeps them open.  Closed with the link.
        """
        backlog = validate.integer("backlog", backlog, 0, 65535)
        hold = validate.flag("hold", hold)
        self._check_open()
        from .. import peers

        peer = self._peers.enter_context(peers.listening(self.server_addr, backlog=backlog, hold=hold,
                                                         source=self.server_ns))
        self._listeners.append(peer)
        return peer.port

    def stats(self) -> dict:
        """The forwarder's counters (see :mod:`nbconn.lab.wire`) plus ``listener_accepted``."""
        with self._fwd_lock:
            if self._fwd is not None and not self._closed:
                try:
                    self._fwd.send(b"stats")
                    if select.select([self._fwd], [], [], _FORWARDER_REPLY_S)[0]:
                        reply = self._fwd.recv(1 << 18)  # 4096 lateness samples fit with room to spare
                        if reply:
                            self._last_stats = _summarize_lateness(json.loads(reply))
                except OSError:
                    pass
            result = dict(self._last_stats)
        result["forwarder_alive"] = self.forwarder_alive()
        result["listener_accepted"] = sum(peer.accepted for peer in self._listeners)
        return result

    def forwarder_alive(self) -> bool:
        try:
            with open(f"/proc/{self.forwarder_pid}/stat") as f:
                return self.forwarder_pid > 0 and f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the acceptors, close the listeners, stop the forwarder and the helper, reap it. Idempotent.

        Every step runs even if an earlier one fails or Ctrl-C arrives; the first error is
        re-raised at the end.  The link counts as closed only once all of them ran, so a
        close() interrupted by a second Ctrl-C is finished by the next call (or at exit).
        """
        self._close()

    def _close(self, report: bool = False) -> None:
        """close(); with ``report``, a helper or forwarder that died or stopped while in use is a LabHelperError
        once everything is torn down (the block's results may be wrong: say so rather than pass them on)."""
        if self._closed:
            return
        problem = self.process.problem() if report and self.process is not None else None
        steps = [self._peers.close, self._close_forwarder_control]
        steps += [ns.close for ns in (self.client_ns, self.server_ns) if ns is not None]
        if self.process is not None:
            steps.append(self.process.stop)
        first_error: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - finish every step, then re-raise the first
                first_error = first_error or exc
        if first_error is None:
            self._closed = True
            _live_links.discard(self)
        else:
            raise first_error
        if problem is not None:
            raise LabHelperError(problem)

    def _close_forwarder_control(self) -> None:
        with self._fwd_lock:
            if self._fwd is not None:
                self._fwd.close()  # end of file: the forwarder stops
                self._fwd = None

    @property
    def closed(self) -> bool:
        return self._closed

    def workers_alive(self) -> bool:
        """True while the helper or the forwarder is still running."""
        helper = self.process is not None and self.process.alive
        return helper or self.forwarder_alive()


_live_links: set = set()


def _close_live_links() -> None:
    """atexit: tear down any link a crashed cell or notebook left open."""
    for link in list(_live_links):
        with contextlib.suppress(BaseException):
            link.close()


atexit.register(_close_live_links)


@contextlib.contextmanager
def impaired(delay_ms: float | tuple = 10.0, jitter_ms: float = 0.0, loss: float | tuple = 0.0,
             seed: int | None = None, syn_linear_timeouts: int | None = None,
             router: str | None = None) -> Iterator[Link]:
    """A client/server namespace pair joined by an impaired wire (as a normal user too).

    ``delay_ms`` is the one-way delay (or an ``(out, back)`` pair, out being client ->
    server), ``jitter_ms`` a uniform +-jitter added per packet (at most the delay),
    ``loss`` the independent drop probability per packet per direction (or a pair),
    ``seed`` seeds the drop/jitter RNG and ``syn_linear_timeouts`` sets
    ``net.ipv4.tcp_syn_linear_timeouts`` in the client namespace.  ``router`` ("unreachable",
    "prohibit" or "blackhole") makes the server namespace a router for ``link.far_prefix``
    (198.19.0.0/24): the client routes it across the wire, the server namespace forwards and holds a
    route of that type for it -- a SYN to ``link.far_addr`` gets ICMP host unreachable (unreachable),
    ICMP administratively prohibited (prohibit), or nothing at all (blackhole).  The router sends
    those ICMP errors at the kernel's rate: ``ip_error`` (net/ipv4/route.c) spends a per-source token
    bucket (``net.ipv4.route.error_burst`` / ``error_cost``: by default 5 at once, then one a second).
    Everything is checked before anything is built, and torn down when the block exits, however it exits.
    """
    params = _params.check(delay_ms, jitter_ms, loss, seed, syn_linear_timeouts, router)
    from ..probe import wire_unavailable_reason

    reason = wire_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the impairment wire cannot run here: {reason}")
    link = Link(params)
    _live_links.add(link)
    try:
        link._open()
        yield link
    except BaseException:
        link.close()
        raise
    link._close(report=True)
