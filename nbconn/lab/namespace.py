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
once with ENETUNREACH).  Everything is validated before the helper starts.  The
namespace has no name and no file: it lives exactly as long as the helper, which exits
when the block ends or this process dies (its control socket reaches end of file).

Where it cannot run, :func:`unavailable_reason` names the cause and the fix
(:mod:`nbconn.lab.wire.probe`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator

from .. import socketsource, validate
from .control import MAX_BATCH, LabProcess, ip_binary

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


def check_routes(routes) -> list:
    if routes is None:
        return []
    if isinstance(routes, str) or not isinstance(routes, (list, tuple)):
        raise TypeError(f"routes must be a list of `ip route add` argument strings, got {validate.shown(routes)}")
    for route in routes:
        if not isinstance(route, str) or not _ROUTE.fullmatch(route):
            raise ValueError(f"routes: {validate.shown(route)} is not an `ip route add` argument string")
    if routes and ip_binary() is None:
        raise ValueError("routes need iproute2's ip, which is not installed (apt-get install iproute2)")
    return list(routes)


def unavailable_reason() -> str | None:
    """None if a lab namespace can be made here, else one line: the cause and the command that fixes it."""
    from .probe import namespace_unavailable_reason

    return namespace_unavailable_reason()


class Namespace:
    """One side of a lab helper: makes sockets in its namespace, reads its counters and settings."""

    def __init__(self, process: LabProcess, side: str = "client", label: str = "the lab namespace") -> None:
        self.process = process
        self.side = side
        self.pid = process.pid
        kind = "user+network namespace, root inside" if process.userns else "network namespace"
        self.where = (f"made in {label} ({kind}) by helper pid {process.pid}, passed over SCM_RIGHTS")
        self.created = 0
        # Sockets made ahead, per (family, type, proto).  One request per socket costs two context switches
        # (~60 us idle, milliseconds on a loaded machine); while step 1 of connect #k waits for it, connects
        # already in flight cannot be decided, and their handshake times grow.  A burst of demand is served
        # from a batch made in one request (a socket made ahead is the same socket: same namespace, defaults).
        self._pool: dict = {}
        self._batch: dict = {}
        self._last_refill: dict = {}
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Namespace {self.side} of helper pid {self.pid}>"

    # -- the socket source -------------------------------------------------------------------------
    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A new socket made inside this namespace (raises OSError as socket() would)."""
        key = (int(family), int(type), int(proto))
        with self._pool_lock:
            pool = self._pool.setdefault(key, [])
            if not pool:
                # Demand within 50 ms of the last batch doubles the next one (up to MAX_BATCH); a pause resets it.
                now = time.monotonic()
                busy = now - self._last_refill.get(key, -1.0) < 0.05
                batch = min(MAX_BATCH, self._batch.get(key, 1) * 2) if busy else 1
                self._batch[key], self._last_refill[key] = batch, now
                reply = self.process.request("socket", want_fd=True, ns=self.side, family=key[0], type=key[1],
                                             proto=key[2], count=batch)
                pool.extend(reversed(reply["fds"]))
            fd = pool.pop()
        self.created += 1
        return socket.socket(fileno=fd)

    def close(self) -> None:
        """Close the sockets made ahead and not handed out."""
        with self._pool_lock:
            for pool in self._pool.values():
                while pool:
                    os.close(pool.pop())

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
    finally:
        try:
            if ns is not None:
                ns.close()
        finally:
            process.stop()


class _CallableModule(type(contextlib)):
    """``nbconn.lab.namespace`` is this module *and* the call ``nbconn.lab.namespace(...)``.

    Importing a submodule sets it as an attribute of its package (``nbconn.lab.namespace``
    becomes this module as soon as anything imports it, e.g. the wire), which would hide the
    function of the same name that ``nbconn.lab`` offers.  Calling the module calls the function.
    """

    def __call__(self, *args, **kwargs):
        return namespace(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
