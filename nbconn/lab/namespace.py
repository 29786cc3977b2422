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
import errno
import itertools
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from .. import socketsource, validate

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_START_S = 10.0  # the helper's interpreter start and namespace setup, on a loaded machine
_REPLY_S = 10.0
_STOP_S = 5.0
_SYSCTL_NAME = re.compile(r"net(\.[A-Za-z0-9_-]{1,64}){1,6}")
_SYSCTL_VALUE = re.compile(r"[0-9A-Za-z ._:-]{0,200}")
_ROUTE = re.compile(r"[0-9A-Za-z ./:-]{1,200}")


def ip_binary() -> str | None:
    """iproute2's ip by absolute path (never looked up through PATH when we are root)."""
    for candidate in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None if os.geteuid() == 0 else shutil.which("ip")


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


def _needs_userns() -> bool:
    """Real root (CAP_SYS_ADMIN here) unshares a network namespace alone; anyone else adds a user namespace."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return not int(line.split()[1], 16) & (1 << 21)
    except OSError:
        pass
    return True


def unavailable_reason() -> str | None:
    """None if a lab namespace can be made here, else one line: the cause and the command that fixes it."""
    from .probe import namespace_unavailable_reason

    return namespace_unavailable_reason()


class LabProcess:
    """The parent's handle on one helper process (:mod:`nbconn.lab.child`): start, ask, stop, reap.

    Requests are JSON on a SOCK_SEQPACKET socketpair, each with an id the reply
    echoes: a reply left over by an interrupted request (Ctrl-C between send and
    receive) is recognised and discarded, its descriptor closed.
    """

    def __init__(self, config: dict, extra_fds: tuple = ()) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopped = False
        self.stderr = ""
        self.info: dict = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        config = dict(config, userns=_needs_userns(), ip=ip_binary())
        self.userns = config["userns"]
        started = time.perf_counter()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", _CHILD, str(theirs.fileno()), json.dumps(config)],
                pass_fds=(theirs.fileno(), *extra_fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C in a terminal reaches only us; we decide when it stops
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            ready = self._receive(_START_S)
            if ready is None or not ready.get("ready"):
                self.stop()  # reaps it and collects its stderr for the message
                detail = (ready or {}).get("error") or self.stderr or "no message"
                raise OSError((ready or {}).get("errno") or errno.EIO, f"the lab helper could not start: {detail}")
        except BaseException:
            self.stop()
            raise
        self.info = ready
        self.pid: int = ready["pid"]
        self.setup_s = time.perf_counter() - started

    def _receive(self, timeout: float, want_fd: bool = False):
        """One message (dict) and, with ``want_fd``, the descriptor it carries; None on timeout or EOF."""
        if not select.select([self._control], [], [], timeout)[0]:
            return None
        if want_fd:
            data, fds, flags, _ = socket.recv_fds(self._control, 1 << 16, 1, socket.MSG_CMSG_CLOEXEC)
        else:
            data, fds, flags = self._control.recv(1 << 16), [], 0
        if not data:
            return None
        message = json.loads(data)
        if fds:
            message["_fd"] = fds[0]
        elif flags & socket.MSG_CTRUNC:
            message["_truncated"] = True  # the kernel could not install the descriptor here (EMFILE)
        return message

    def request(self, op: str, want_fd: bool = False, **fields):
        """Send one request and return its reply; OSError with the helper's errno on failure."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the lab namespace has been closed")
            ident = next(self._ids)
            self._control.send(json.dumps({"op": op, "id": ident, **fields}).encode())
            deadline = time.monotonic() + _REPLY_S
            while True:
                reply = self._receive(max(0.0, deadline - time.monotonic()), want_fd=True)
                if reply is None:
                    raise OSError(errno.EPIPE, "the lab helper did not answer (it has exited?)")
                fd = reply.pop("_fd", None)
                if reply.get("id") == ident:
                    break
                if fd is not None:
                    os.close(fd)  # the answer to a request someone stopped waiting for
        if "errno" in reply:
            if fd is not None:
                os.close(fd)
            raise OSError(reply["errno"], reply.get("error") or os.strerror(reply["errno"]))
        if want_fd:
            if fd is None:
                raise OSError(errno.EMFILE, "no descriptor arrived over SCM_RIGHTS (this process is out of fds?)")
            reply["fd"] = fd
        elif fd is not None:
            os.close(fd)
        return reply

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        """Close the control socket (the helper exits on end of file), then reap it. Idempotent.

        ``_stopped`` means "no more requests"; the reap below finishes even when a
        second Ctrl-C arrives while we wait, so no zombie and no descriptor stays.
        """
        with contextlib.suppress(OSError):
            self._control.close()
        self._stopped = True
        process = getattr(self, "_process", None)
        if process is None or process.returncode is not None:
            return
        interrupted: BaseException | None = None
        try:
            try:
                _, err = process.communicate(timeout=_STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            if err:
                self.stderr = err.decode(errors="replace").strip()
        except BaseException as exc:  # Ctrl-C (or SIGTERM made an exception) while waiting: still reap
            interrupted = exc
            process.kill()
            for _ in range(100):
                try:
                    process.wait()
                    break
                except BaseException:  # noqa: BLE001 - a third Ctrl-C: keep reaping, bounded
                    continue
            with contextlib.suppress(OSError):
                if process.stderr is not None:
                    process.stderr.close()
        if interrupted is not None:
            raise interrupted


class Namespace:
    """One side of a lab helper: makes sockets in its namespace, reads its counters and settings."""

    def __init__(self, process: LabProcess, side: str = "client", label: str = "the lab namespace") -> None:
        self.process = process
        self.side = side
        self.pid = process.pid
        kind = "user+network namespace, root inside" if process.userns else "network namespace"
        self.where = (f"made in {label} ({kind}) by helper pid {process.pid}, passed over SCM_RIGHTS")
        self.created = 0

    def __repr__(self) -> str:
        return f"<Namespace {self.side} of helper pid {self.pid}>"

    # -- the socket source -------------------------------------------------------------------------
    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A new socket made inside this namespace (raises OSError as socket() would)."""
        reply = self.process.request("socket", want_fd=True, ns=self.side, family=int(family), type=int(type),
                                     proto=int(proto))
        self.created += 1
        return socket.socket(fileno=reply["fd"])

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
    try:
        yield Namespace(process)
    finally:
        process.stop()
