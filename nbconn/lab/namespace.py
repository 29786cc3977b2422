"""A network namespace of the lab's own, without root: sockets made inside it, handed out over SCM_RIGHTS.

Some lessons need settings that belong to a whole network namespace
(``net.ipv4.tcp_syncookies``, ``tcp_abort_on_overflow``, ``ip_local_port_range``,
the routing table) or counters that count a whole namespace (``/proc/net/netstat``).
Changing them on the reader's machine is out of the question; a namespace of our own
is the kernel's sandbox for exactly that.  A normal user gets one the way
``unshare -Urn`` does: a helper process (:mod:`nbconn.lab.child`) unshares a new user
namespace together with a new network namespace and is "root" inside them -- full
capabilities over those namespaces, none anywhere else.  As real root the helper
unshares the network namespace alone.

The notebook's process never enters the namespace.  It asks the helper for sockets:
the helper calls ``socket()`` inside the namespace and passes the descriptor back over
an AF_UNIX socket (``SCM_RIGHTS``).  A socket stays in the namespace it was created in
for its whole life, whoever holds it, so ``bind()``, ``listen()`` and ``connect()`` on
it happen inside the namespace while the notebook drives them with its own epoll loop.

API::

    with nbconn.lab.namespace(sysctls={"net.ipv4.tcp_syncookies": "0"}, routes=()) as ns:
        ns.socket(family, type, proto=0)  # a socket made inside (a socketsource for step 1)
        ns.where                          # "made in the lab namespace by helper pid ..., passed over SCM_RIGHTS"
        with ns.using():                  # step 1 of every nbconn connect in this thread asks ns
            nbconn.connect_many(...)
        with ns.listening() / ns.slow_accept(backlog=8, interval_s=0.005) / ns.blackhole() as peer:
            ...                           # lab peers whose listener lives inside (acceptor thread here)
        ns.read_netstat()                 # {"ListenOverflows": .., ..., "Tcp": {"ActiveOpens": ..}} TcpExt + Tcp
        ns.sysctl("net.ipv4.tcp_syncookies"); ns.set_sysctl(name, value)   # read live / change
        ns.pid                            # the helper; /proc/<pid>/ns/net is the namespace

``sysctls``: ``{name: value}`` written inside before the block starts (only ``net.*``
names: they are per namespace).  ``routes``: ``ip route add`` arguments, e.g.
``["unreachable 198.18.0.0/15"]`` (needs iproute2); a fresh namespace has only ``lo``,
so by default there is no route to anything else (``connect()`` to 198.18.0.1 fails at
once with ENETUNREACH).  Everything is validated before the helper starts (a route
is checked against ``ip route add``'s grammar: ``[TYPE] PREFIX [via|src ADDR] [dev
NAME] [metric|mtu|table N] [scope|proto WORD] [onlink]``).  The namespace has no name
and no file.  The helper exits when the block ends or this process dies (its control
socket reaches end of file); the namespace itself lives as long as anything refers to
it -- the helper *or any socket made in it*: a socket kept after the block keeps its
namespace (its ``lo``, its sysctls) working until it is closed.  If the helper died or
was stopped during the block, the block ends with :class:`~nbconn.lab.control.LabHelperError`.

Where it cannot run, :func:`unavailable_reason` names the cause and the fix
(:mod:`nbconn.lab.wire.probe`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator

from .. import socketsource, validate
from .control import MAX_BATCH, LabHelperError, LabProcess, deferred_ctrl_c, ip_binary

_SYSCTL_NAME = re.compile(r"net(\.[A-Za-z0-9_-]{1,64}){1,6}")
_SYSCTL_VALUE = re.compile(r"[0-9A-Za-z ._:-]{0,200}")
_ROUTE = re.compile(r"[0-9A-Za-z ./:-]{1,200}")


def check_sysctls(sysctls, name: str = "sysctls") -> dict:
    """``{net.name: value}`` -> validated ``{name: str(value)}``; the setting must exist in this kernel."""
    if sysctls is None:
        return {}
    if not isinstance(sysctls, dict):
        raise TypeError(f"{name} must be a dict of {{sysctl name: value}}, got {validate.shown(sysctls)}")
    checked = {}
    for key, value in sysctls.items():
        if not isinstance(key, str) or not _SYSCTL_NAME.fullmatch(key):
            raise ValueError(f"{name}: {validate.shown(key)} is not a net.* sysctl name (per-namespace settings only)")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{name}[{key!r}] must be a str or int, got {validate.shown(value)}")
        text = str(value)
        if not _SYSCTL_VALUE.fullmatch(text):
            raise ValueError(f"{name}[{key!r}]={validate.shown(value)} is not a sysctl value")
        if not os.path.exists("/proc/sys/" + key.replace(".", "/")):
            raise ValueError(f"{name}: this kernel has no sysctl {key}")
        checked[key] = text
    return checked


_ROUTE_TYPES = ("unicast", "unreachable", "blackhole", "prohibit", "throw", "local")
_ROUTE_ADDRESS_KEYS = ("via", "src")
_ROUTE_NUMBER_KEYS = ("metric", "mtu", "table")
_ROUTE_WORD_KEYS = ("scope", "proto")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ - 1
_WORD = re.compile(r"[a-z0-9]{1,16}")


def _route_problem(route: str) -> str | None:
    """Why ``route`` is not something ``ip route add`` takes (the subset the lab needs), or None."""
    words = route.split()
    if words and words[0] in _ROUTE_TYPES:
        words = words[1:]
    if not words:
        return "no destination prefix"
    prefix, rest = words[0], words[1:]
    if prefix != "default":
        try:
            ipaddress.ip_network(prefix, strict=True)
        except ValueError as exc:
            return f"{prefix!r} is not a destination prefix ({exc})"
    while rest:
        key = rest.pop(0)
        if key == "onlink":
            continue
        if key not in (*_ROUTE_ADDRESS_KEYS, "dev", *_ROUTE_NUMBER_KEYS, *_ROUTE_WORD_KEYS):
            return f"{key!r} is not a route keyword the lab knows"
        if not rest:
            return f"{key!r} needs a value"
        value = rest.pop(0)
        if key in _ROUTE_ADDRESS_KEYS:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                return f"{key} {value!r} is not an IP address"
        elif key == "dev" and not _IFNAME.fullmatch(value):
            return f"dev {value!r} is not an interface name"
        elif key in _ROUTE_NUMBER_KEYS and not (value.isdigit() and value.isascii() and int(value) < 2 ** 32):
            return f"{key} {value!r} is not a number 0..{2 ** 32 - 1}"
        elif key in _ROUTE_WORD_KEYS and not _WORD.fullmatch(value):
            return f"{key} {value!r} is not a {key} name or number"
    return None


def check_routes(routes) -> list:
    """``ip route add`` argument strings, each checked against its grammar here, before any helper starts."""
    if routes is None:
        return []
    if isinstance(routes, str) or not isinstance(routes, (list, tuple)):
        raise TypeError(f"routes must be a list of `ip route add` argument strings, got {validate.shown(routes)}")
    for route in routes:
        if not isinstance(route, str):
            raise TypeError(f"routes: each route must be a str, got {validate.shown(route)}")
        problem = None if _ROUTE.fullmatch(route) else "characters ip does not take"
        problem = problem or _route_problem(route)
        if problem:
            raise ValueError(f"routes: {validate.shown(route)} is not an `ip route add` argument string: {problem}")
    if routes and ip_binary() is None:
        raise ValueError("routes need iproute2's ip, which is not installed (apt-get install iproute2)")
    return list(routes)


def unavailable_reason() -> str | None:
    """None if a lab namespace can be made here, else one line: the cause and the command that fixes it."""
    from .probe import namespace_unavailable_reason

    return namespace_unavailable_reason()


_live: weakref.WeakSet = weakref.WeakSet()  # every Namespace with sockets made ahead, for the fork handler


def _after_fork_in_child() -> None:
    # Sockets made ahead are the lab's, not the caller's: a forked child must not keep the namespace alive with them.
    for ns in list(_live):
        ns._forked_away()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Namespace:
    """One side of a lab helper: makes sockets in its namespace, reads its counters and settings."""

    def __init__(self, process: LabProcess, side: str = "client", label: str = "the lab namespace") -> None:
        self.process = process
        self.side = side
        self.pid = process.pid
        kind = "user+network namespace, root inside" if process.userns else "network namespace"
        self.where = f"made in {label} ({kind}) by helper pid {process.pid} ahead of use, passed over SCM_RIGHTS"
        self.created = 0
        # Sockets made ahead, per (family, type, proto).  One request per socket costs two context switches
        # (~60 us idle, milliseconds on a loaded machine); while step 1 of connect #k waits for it, connects
        # already in flight cannot be decided, and their handshake times grow.  A burst of demand is served
        # from a batch made in one request (a socket made ahead is the same socket: same namespace, defaults).
        self._pool: dict = {}
        self._batch: dict = {}
        self._last_refill: dict = {}
        self._pool_lock = threading.Lock()
        _live.add(self)

    def __repr__(self) -> str:
        return f"<Namespace {self.side} of helper pid {self.pid}>"

    # -- the socket source -------------------------------------------------------------------------
    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0, *,
               timeout_s: float | None = None) -> socket.socket:
        """A new socket made inside this namespace (raises OSError as socket() would).

        LabHelperError (naming the process) if the helper or its forwarder died or is stopped: a dead lab is
        an error at once, not a run of failed connects.  ``timeout_s`` bounds the wait for the helper (the
        caller's own deadline; default 10 s)."""
        key = (int(family), int(type), int(proto))
        with self._pool_lock:
            self.process.check()  # one poll(): has the helper or the forwarder hung up?
            pool = self._pool.setdefault(key, [])
            if not pool:
                # Demand within 50 ms of the last batch doubles the next one (up to MAX_BATCH); a pause resets it.
                now = time.monotonic()
                busy = now - self._last_refill.get(key, -1.0) < 0.05
                batch = min(MAX_BATCH, self._batch.get(key, 1) * 2) if busy else 1
                self._batch[key], self._last_refill[key] = batch, now
                # The descriptors go straight into the pool, Ctrl-C held while they move (issue 24.2).
                self.process.request("socket", want_fd=True, into=pool, timeout=timeout_s, ns=self.side,
                                     family=key[0], type=key[1], proto=key[2], count=batch)
            with deferred_ctrl_c():  # between pop() and the socket object a Ctrl-C would leak the descriptor
                sock = socket.socket(fileno=pool.pop())
        self.created += 1
        return sock

    def close(self) -> None:
        """Close the sockets made ahead and not handed out."""
        with self._pool_lock:
            self._close_pool()

    def _close_pool(self) -> None:
        for pool in self._pool.values():
            while pool:
                with contextlib.suppress(OSError):
                    os.close(pool.pop())

    def _forked_away(self) -> None:
        self._pool_lock = threading.Lock()  # another thread may have held the parent's at the fork
        self._close_pool()

    def using(self):
        """``with ns.using():`` step 1 of every nbconn connect in this thread makes its socket here."""
        return socketsource.using(self)

    # -- settings and counters ---------------------------------------------------------------------
    def sysctl(self, name: str) -> str:
        """The live value of a per-namespace sysctl, read inside."""
        check_sysctls({name: "0"}, name="sysctl")
        return self.process.request("sysctl_get", ns=self.side, name=name)["value"]

    def set_sysctl(self, name: str, value) -> str:
        """Write a per-namespace sysctl inside; returns the value read back."""
        checked = check_sysctls({name: value}, name="sysctl")
        self.close()  # sockets made ahead took their defaults (buffer sizes, ...) from the old settings
        return self.process.request("sysctl_set", ns=self.side, name=name, value=checked[name])["value"]

    def read_netstat(self) -> dict:
        """TcpExt counters (/proc/net/netstat) by name, with the Tcp counters of /proc/net/snmp under "Tcp"."""
        counters = self.process.request("netstat", ns=self.side)["counters"]
        flat = dict(counters.get("TcpExt", {}))
        flat["Tcp"] = counters.get("Tcp", {})
        return flat

    # -- lab peers whose listener lives in here ----------------------------------------------------
    def listening(self, host: str = "127.0.0.1", **kwargs):
        from . import peers

        return peers.listening(host, source=self, **kwargs)

    def slow_accept(self, host: str = "127.0.0.1", **kwargs):
        from . import peers

        return peers.slow_accept(host, source=self, **kwargs)

    def blackhole(self, host: str = "127.0.0.1"):
        from . import peers

        return peers.blackhole(host, source=self)

    def refused(self, host: str = "127.0.0.1"):
        from . import peers

        return peers.refused(host, source=self)


@contextlib.contextmanager
def namespace(sysctls: dict | None = None, routes=None) -> Iterator[Namespace]:
    """A fresh network namespace (rootless: with a user namespace) with ``lo`` up and ``sysctls`` applied."""
    config = {"sysctls": check_sysctls(sysctls), "routes": check_routes(routes)}
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"a lab namespace cannot be made here: {reason}")
    process = LabProcess(config)
    ns = None
    try:
        ns = Namespace(process)
        yield ns
    except BaseException:
        close_lab(process, ns)
        raise
    close_lab(process, ns, report=True)


def _close_each(namespaces) -> None:
    for ns in namespaces:
        if ns is not None:
            ns.close()


def close_lab(process: LabProcess, *namespaces, report: bool = False) -> None:
    """Close the sockets made ahead, stop the helper.  With ``report`` (the block ended normally), a helper or
    forwarder that died or was stopped while in use is a LabHelperError after the teardown: what the block
    measured may be wrong, and saying nothing would pass it on as true."""
    problem = process.problem() if report else None
    try:
        _close_each(namespaces)  # (a call, not the loop itself: tests/test_interrupt_coverage.py says why)
    finally:
        process.stop()
    if problem is not None:
        raise LabHelperError(problem)

