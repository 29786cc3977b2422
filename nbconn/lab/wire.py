"""An impaired network link built in userspace: delay, jitter and loss.

Why this module exists
----------------------
To watch nginx's non-blocking ``connect()`` flow behave the way it does on a
real network (``EINPROGRESS``, a writable event one round trip later, SYN
retransmissions after loss, ``connect_timeout`` firing) we need a network
with a *round-trip time* and *packet loss*.  Loopback has neither: a TCP
handshake on ``127.0.0.1`` finishes in tens of microseconds, before the
event loop even gets to wait.

The usual tool is ``tc qdisc add ... netem delay 10ms loss 30%``.  The kernel
this tutorial runs on is built without the netem qdisc (``sch_netem``), and
we cannot load modules, so we build the same thing in userspace instead.

The pieces
~~~~~~~~~~
*TUN device.*  ``/dev/net/tun`` lets a process create a network interface
whose "wire" is a file descriptor.  With ``IFF_TUN | IFF_NO_PI`` every IP
packet the kernel routes *out of* the interface can be ``read()`` from the
fd as one whole packet (no Ethernet header, no extra prefix), and every
packet ``write()``-n to the fd is received *by* the kernel as if it had just
arrived on that interface.  Whoever holds the fd is the cable.

*Two network namespaces.*  If both ends of the connection lived in one
namespace the kernel would notice that the destination address is local and
short-circuit the packet through loopback, never touching our interface.  So
we make two fresh namespaces, ``client`` and ``server``, each with its own
TUN device, address and route to the other side (198.18.0.1 <-> 198.18.0.2,
from the RFC 2544 benchmarking range, so nothing here can collide with or
leak to a real network).  A packet from a client socket to the server address
can then only leave through the client's TUN device.

*The forwarder.*  One small child process holds both TUN fds.  It reads a
packet from one, decides its fate, and later writes it, unchanged, into the
other.  The fate is decided when the packet is read:

* with probability ``loss`` it is dropped (counted, never written);
* otherwise it gets a *due time*: ``now + delay (+ uniform jitter)``.

Packets wait in a heap ordered by ``(due time, arrival sequence number)``.
The forwarder sleeps in ``ppoll()`` on both TUN fds and a control socket,
with a timeout equal to the time until the earliest due packet, so it wakes
either because a new packet arrived or because the head of the heap is due;
it never spins.  With zero jitter the due times in one direction are
non-decreasing and ties are broken by sequence number, so packet order is
preserved; with jitter, packets may be reordered, as on a real path.  Every
random choice comes from a seeded RNG per direction, so ``seed=`` makes the
drop pattern reproducible.

Why a process and not a thread?  A thread would share the GIL with the
notebook: while a cell runs pure Python, a woken forwarder thread waits up
to ``sys.getswitchinterval()`` (5 ms) for the GIL, and every packet due in
that window arrives late.  A separate interpreter has its own GIL.  It is a
fresh ``python -I -S`` that loads only this file and ``netns.py`` and talks
to us over a ``SOCK_SEQPACKET`` socketpair (``stats``/``stop``); if the
notebook dies, the socket closes and the forwarder exits on its own.

Timing details.  ``ppoll`` is called through :mod:`ctypes` because Python's
``select.poll``/``select.epoll`` only take millisecond timeouts, and rounding
every wake-up up to the next millisecond would add ~0.5 ms per packet.  The
forwarder sets its timer slack to 1 ns (``prctl(PR_SET_TIMERSLACK)``),
otherwise the kernel may defer its wake-ups by up to 50 us to batch them.
Even so a timed wake-up lands tens of microseconds late, so the forwarder
keeps a moving average of that overshoot and asks to be woken that much
early, releasing packets due within the allowance (never more than
``MAX_WAKE_ALLOWANCE_S``, 0.5 ms, early).  The *average* delay then matches
the requested one instead of being biased late.

Entering a namespace from Python
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``link.client()`` / ``link.server()`` move only the *current thread* into a
namespace (see :mod:`nbconn.lab.netns`); sockets created there stay there.
So one notebook cell can create a listener in the server namespace and a
non-blocking client socket in the client namespace and drive both.

Overhead and limits
~~~~~~~~~~~~~~~~~~~
Measured on the tutorial machine (2 vCPUs in a Firecracker VM, Linux 6.18,
Python 3.11), idle apart from the measurement:

* Accuracy: with ``delay_ms=10`` the median handshake (``connect()`` until
  writable, timed from Python with epoll) is 20.15-20.25 ms and
  ``tcpi_rtt`` 20.05-20.15 ms, i.e. about 1 % high.  Still within 1 % with both
  cores saturated by other busy processes.
* Lateness (write time minus due time) at light load: mean 30-50 us,
  median 10-30 us, p99 200-400 us.  Two sources: wake-up jitter of the VM's
  timers (40-100 us), and the kernel processing each written packet inside
  ``write()`` (TCP input, waking the receiver), which delays the next packet
  of the same burst by ~5-50 us.
* Overhead of the wire itself: with ``delay_ms=0`` a handshake takes a
  median ~60 us versus ~14 us over loopback inside one namespace, so the
  wire adds ~25 us per packet (a read, a heap push/pop, a write, two
  wake-ups).
* Rate: ~6,000-7,000 sequential connects/s at ``delay_ms=0`` (the Python
  client loop is the limit).  Paced 64-byte UDP at ``delay_ms=10``: mean
  lateness 55 us at 20 k packets/s, 150 us at 50 k/s, 400 us (p99 2.7 ms)
  at 100 k/s.  The forwarder saturates one core at roughly 80-160 k
  packets/s; beyond that the TUN queue (500 packets) overflows and the
  kernel drops before the wire sees the packets.
* Setup and teardown take ~60 ms each (``ip`` invocations and the
  forwarder interpreter's start-up).
* At most ``QUEUE_LIMIT`` packets wait in the heap; more are dropped and
  counted as ``overflow_dropped``.  Delay is capped at ``MAX_DELAY_MS``.
* ``stats()`` keys: ``out_forwarded``/``back_forwarded``, ``out_dropped``/
  ``back_dropped`` (out = client -> server), ``overflow_dropped``,
  ``write_errors``, ``queued``, ``mean_lateness_us``, ``p50_lateness_us``,
  ``p99_lateness_us`` (last ``LATENESS_WINDOW`` packets), ``max_lateness_us``,
  ``wake_allowance_us``, ``forwarder_error``, ``forwarder_alive``,
  ``listener_accepted``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import errno
import fcntl
import heapq
import json
import math
import numbers
import os
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import netns

__all__ = [
    "impaired",
    "wire_unavailable_reason",
    "Link",
    "QUEUE_LIMIT",
    "MAX_DELAY_MS",
    "CLIENT_ADDR",
    "SERVER_ADDR",
]

CLIENT_ADDR = "198.18.0.1"  # RFC 2544 benchmarking range, never routed
SERVER_ADDR = "198.18.0.2"
CLIENT_IFNAME = "nbwire-c"
SERVER_IFNAME = "nbwire-s"

QUEUE_LIMIT = 4096  # packets held in the delay heap at most
MAX_DELAY_MS = 60_000.0  # one way; keeps every timer finite and small
READ_BATCH = 256  # packets read per fd per wake-up, so one side cannot starve the other
HOLD_LIMIT = 4096  # accepted connections a listener keeps open at most
MAX_PACKET = 65_536
LATENESS_WINDOW = 4096  # recent lateness samples kept for percentiles
_STOP_JOIN_S = 5.0
_CHILD_START_S = 10.0
_CHILD_REPLY_S = 2.0
MAX_WAKE_ALLOWANCE_S = 0.0005  # the forwarder never releases a packet more than this early
_MAX_SYN_LINEAR_TIMEOUTS = 127  # kernel's MAX_TCP_SYNCNT
_SYN_LINEAR_SYSCTL = "/proc/sys/net/ipv4/tcp_syn_linear_timeouts"

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000

# <linux/prctl.h>
_PR_SET_TIMERSLACK = 29

# <poll.h>
_POLLIN = 0x001
_POLLERR = 0x008
_POLLHUP = 0x010
_POLLNVAL = 0x020

_OUT, _BACK = 0, 1  # out: client -> server, back: server -> client
_DIRECTION_NAMES = ("out", "back")


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    """Validated link parameters (delays in seconds, per direction)."""

    delay_s: tuple[float, float]
    jitter_s: float
    loss: tuple[float, float]
    seed: int | None
    syn_linear_timeouts: int | None


def _as_number(name: str, value: object) -> float:
    """Return ``value`` as a finite float or raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _as_pair(name: str, value: object) -> tuple[float, float]:
    """A number applies to both directions; a 2-tuple/list is (out, back)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or an (out, back) pair, got {value!r}")
        return (_as_number(f"{name}[0]", value[0]), _as_number(f"{name}[1]", value[1]))
    number = _as_number(name, value)
    return (number, number)


def _validate(
    delay_ms: object,
    jitter_ms: object,
    loss: object,
    seed: object,
    syn_linear_timeouts: object,
) -> _Params:
    """Check every argument before anything is created; ValueError on bad input."""
    delays = _as_pair("delay_ms", delay_ms)
    for d in delays:
        if d < 0 or d > MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be in [0, {MAX_DELAY_MS:g}], got {delay_ms!r}")
    jitter = _as_number("jitter_ms", jitter_ms)
    if jitter < 0:
        raise ValueError(f"jitter_ms must be >= 0, got {jitter_ms!r}")
    if jitter > min(delays):
        raise ValueError(
            f"jitter_ms={jitter_ms!r} exceeds delay_ms={delay_ms!r}: "
            "a packet cannot be delivered before it was sent"
        )
    losses = _as_pair("loss", loss)
    for p in losses:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"loss must be a probability in [0, 1], got {loss!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if syn_linear_timeouts is not None:
        if isinstance(syn_linear_timeouts, bool) or not isinstance(syn_linear_timeouts, int):
            raise ValueError(f"syn_linear_timeouts must be an int or None, got {syn_linear_timeouts!r}")
        if not 0 <= syn_linear_timeouts <= _MAX_SYN_LINEAR_TIMEOUTS:
            raise ValueError(
                f"syn_linear_timeouts must be in [0, {_MAX_SYN_LINEAR_TIMEOUTS}], "
                f"got {syn_linear_timeouts!r}"
            )
    return _Params(
        delay_s=(delays[0] / 1000.0, delays[1] / 1000.0),
        jitter_s=jitter / 1000.0,
        loss=losses,
        seed=seed,  # type: ignore[arg-type]
        syn_linear_timeouts=syn_linear_timeouts,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------
# Can the wire run here?
# --------------------------------------------------------------------------


def _effective_caps() -> int:
    """The process's effective capability bitmask from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _probe_netns() -> str | None:
    """Create and delete one namespace; None if that works, else why not."""
    name = f"{netns.NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-c"
    try:
        netns.add_netns(name)
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        netns.delete_netns(name)
    except RuntimeError as exc:
        return f"cannot delete network namespace {name}: {exc}"
    return None


def wire_unavailable_reason() -> str | None:
    """None if :func:`impaired` can run here, else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return f"the impairment wire needs Linux (this is {sys.platform})"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "this kernel has no network namespaces (/proc/thread-self/ns/net missing)"
    cap_net_admin, cap_sys_admin = 1 << 12, 1 << 21
    try:
        caps = _effective_caps()
    except OSError as exc:
        return f"cannot read capabilities from /proc/self/status: {exc}"
    if not caps & cap_net_admin or not caps & cap_sys_admin:
        return (
            "the impairment wire needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); "
            f"running as uid {os.geteuid()} without them"
        )
    if netns.ip_binary() is None:
        return "iproute2's `ip` binary is not installed (apt-get install iproute2)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"cannot open /dev/net/tun: {exc.strerror}"
    try:
        if not hasattr(netns._load_libc(), "setns"):
            return "libc has no setns()"
    except OSError as exc:
        return f"cannot load libc: {exc}"
    return _probe_netns()


# --------------------------------------------------------------------------
# Low-level: TUN devices, ppoll, timer slack
# --------------------------------------------------------------------------


def _create_tun(ifname: str) -> int:
    """Open /dev/net/tun and attach a new IFF_TUN|IFF_NO_PI device ``ifname``.

    Must run in the thread that is inside the target namespace: the kernel
    records the namespace when /dev/net/tun is *opened*.  Returns a
    non-blocking fd; closing it destroys the device.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", ifname.encode(), _IFF_TUN | _IFF_NO_PI)
        fcntl.ioctl(fd, _TUNSETIFF, ifreq)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _ppoll_function():
    """libc ppoll with argument types set (ctypes releases the GIL while it waits)."""
    libc = netns._load_libc()
    ppoll = libc.ppoll
    ppoll.argtypes = [ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.POINTER(_Timespec), ctypes.c_void_p]
    ppoll.restype = ctypes.c_int
    return ppoll


def _set_thread_timer_slack(nanoseconds: int) -> None:
    """Ask the kernel not to defer this thread's timer wake-ups (best effort)."""
    with contextlib.suppress(Exception):
        netns._load_libc().prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(nanoseconds), 0, 0, 0)


# --------------------------------------------------------------------------
# The forwarder: runs in a child process
# --------------------------------------------------------------------------


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 if empty)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _ForwarderLoop:
    """Copies packets between two TUN fds through a due-time heap.

    Runs in the forwarder child process.  ``fds[_OUT]`` is the client-side
    TUN (packets read there travel *out* to the server), ``fds[_BACK]`` the
    server-side one.  ``control`` is a SOCK_SEQPACKET socket to the parent:
    ``b"stats"`` asks for a JSON snapshot, ``b"stop"`` or end-of-file ends
    the loop (so the child also ends if the parent dies).
    """

    def __init__(self, client_tun: int, server_tun: int, control: socket.socket, params: dict) -> None:
        self._fds = (client_tun, server_tun)
        self._control = control
        self._delay_s = tuple(params["delay_s"])
        self._jitter_s = params["jitter_s"]
        self._loss = tuple(params["loss"])
        seed = params["seed"]
        # One RNG per direction, so the drop pattern seen by one direction
        # does not depend on how much traffic flowed the other way.
        self._rngs = (
            random.Random(None if seed is None else f"{seed}-out"),
            random.Random(None if seed is None else f"{seed}-back"),
        )
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._seq = 0
        self._forwarded = [0, 0]
        self._dropped = [0, 0]
        self._overflow = [0, 0]
        self._write_errors = 0
        self._late_sum = 0.0
        self._late_max = float("-inf")
        self._late_count = 0
        self._late_recent: collections.deque[float] = collections.deque(maxlen=LATENESS_WINDOW)
        self._error: str | None = None
        # Timed wake-ups arrive some tens of microseconds after the requested
        # time.  We learn that overshoot and ask to be woken that much early,
        # releasing packets due within the allowance, so the *average*
        # delay equals the requested one instead of being biased late.
        self._allowance = 0.0

    def run(self) -> None:
        """Forward until told to stop. Never spins: ppoll sleeps until a packet
        arrives, the head of the heap is due, or the parent speaks."""
        ppoll = _ppoll_function()
        pollfds = (_PollFd * 3)()
        for slot, fd in enumerate((*self._fds, self._control.fileno())):
            pollfds[slot].fd = fd
            pollfds[slot].events = _POLLIN
        timeout = _Timespec()
        while True:
            wake_at = self._wake_time()
            if wake_at is None:
                timeout_ptr = None
            else:
                wait = max(0.0, wake_at - time.monotonic())
                timeout.tv_sec = int(wait)
                timeout.tv_nsec = int((wait - int(wait)) * 1e9)
                timeout_ptr = ctypes.byref(timeout)
            ready = ppoll(pollfds, 3, timeout_ptr, None)
            now = time.monotonic()
            if ready < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, f"ppoll: {os.strerror(err)}")
            if ready == 0 and wake_at is not None:
                self._learn_wake_overshoot(now - wake_at)
            for direction in (_OUT, _BACK):
                revents = pollfds[direction].revents
                if revents & (_POLLERR | _POLLHUP | _POLLNVAL):
                    self._fail(f"TUN device for direction {_DIRECTION_NAMES[direction]!r} failed")
                    pollfds[_OUT].fd = pollfds[_BACK].fd = -1  # ppoll ignores negative fds
                elif revents & _POLLIN:
                    self._ingest(direction, now)
            self._release_due()
            if pollfds[2].revents and not self._answer_parent():
                return

    def _wake_time(self) -> float | None:
        """When to wake for the head of the heap: its due time minus the allowance."""
        if not self._heap:
            return None
        return self._heap[0][0] - self._allowance

    def _learn_wake_overshoot(self, overshoot: float) -> None:
        """Track how late timed wake-ups are (moving average, bounded)."""
        estimate = self._allowance + (overshoot - self._allowance) / 16.0
        self._allowance = min(max(estimate, 0.0), MAX_WAKE_ALLOWANCE_S)

    def _fail(self, message: str) -> None:
        self._error = message
        self._heap.clear()

    def _ingest(self, direction: int, now: float) -> None:
        """Read up to READ_BATCH packets from one TUN fd and schedule them."""
        fd = self._fds[direction]
        loss = self._loss[direction]
        delay = self._delay_s[direction]
        jitter = self._jitter_s
        rng = self._rngs[direction]
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(f"reading TUN ({_DIRECTION_NAMES[direction]}): {exc}")
                return
            if loss and rng.random() < loss:
                self._dropped[direction] += 1
                continue
            if len(self._heap) >= QUEUE_LIMIT:
                self._overflow[direction] += 1
                continue
            due = now + delay
            if jitter:
                due += rng.uniform(-jitter, jitter)
            heapq.heappush(self._heap, (due, self._seq, direction, packet))
            self._seq += 1

    def _release_due(self) -> None:
        """Write every packet whose due time has passed to the opposite TUN."""
        heap = self._heap
        cutoff = time.monotonic() + self._allowance
        while heap and heap[0][0] <= cutoff:
            due, _, direction, packet = heapq.heappop(heap)
            sent_at = time.monotonic()
            try:
                os.write(self._fds[1 - direction], packet)
            except OSError:
                self._write_errors += 1
                continue
            self._forwarded[direction] += 1
            late = sent_at - due
            self._late_sum += late
            self._late_count += 1
            self._late_recent.append(late)
            if late > self._late_max:
                self._late_max = late

    def _answer_parent(self) -> bool:
        """Handle one control message; False means stop."""
        try:
            message = self._control.recv(64)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if message == b"stats":
            with contextlib.suppress(OSError):
                self._control.send(json.dumps(self.stats()).encode())
            return True
        return False  # b"stop", end-of-file or anything unexpected

    def stats(self) -> dict:
        """A JSON-able snapshot of the counters."""
        recent = sorted(self._late_recent)
        count = self._late_count
        return {
            "out_forwarded": self._forwarded[_OUT],
            "back_forwarded": self._forwarded[_BACK],
            "out_dropped": self._dropped[_OUT],
            "back_dropped": self._dropped[_BACK],
            "overflow_dropped": self._overflow[_OUT] + self._overflow[_BACK],
            "write_errors": self._write_errors,
            "queued": len(self._heap),
            "mean_lateness_us": (self._late_sum / count * 1e6) if count else 0.0,
            "p50_lateness_us": _percentile(recent, 0.50) * 1e6,
            "p99_lateness_us": _percentile(recent, 0.99) * 1e6,
            "max_lateness_us": (self._late_max * 1e6) if count else 0.0,
            "wake_allowance_us": self._allowance * 1e6,
            "forwarder_error": self._error,
        }


def _forwarder_child_main(argv: list[str]) -> None:
    """Entry point of the forwarder process: ``CLIENT_FD SERVER_FD CONTROL_FD PARAMS_JSON``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    client_tun, server_tun, control_fd = (int(a) for a in argv[:3])
    params = json.loads(argv[3])
    _set_thread_timer_slack(1)
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    loop = _ForwarderLoop(client_tun, server_tun, control, params)
    control.send(b"ready")
    loop.run()


# The child is a fresh interpreter (-I -S: no site-packages, no user paths).
# It loads this file and netns.py straight from their directory under a
# private package name, so it never imports nbconn/__init__ (or whatever a
# notebook's sys.path would drag in).
_CHILD_BOOT = """\
import importlib.util, sys, types
here = sys.argv[1]
package = types.ModuleType("_nbconn_wire_child")
package.__path__ = [here]
sys.modules[package.__name__] = package
spec = importlib.util.spec_from_file_location(package.__name__ + ".wire", here + "/wire.py")
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module._forwarder_child_main(sys.argv[2:])
"""


class _Forwarder:
    """Parent-side handle on the forwarder child process."""

    def __init__(self, client_tun: int, server_tun: int, params: _Params) -> None:
        self._params = params
        self._last_stats: dict = {}
        self._lock = threading.Lock()
        self._stopped = False
        self.child_stderr = ""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD_BOOT, os.path.dirname(os.path.abspath(__file__)),
                 str(client_tun), str(server_tun), str(theirs.fileno()), self._params_json()],
                pass_fds=(client_tun, server_tun, theirs.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C in a terminal reaches only us
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            self._await_ready()
        except BaseException:
            self.stop()
            raise

    def _params_json(self) -> str:
        p = self._params
        return json.dumps({"delay_s": p.delay_s, "jitter_s": p.jitter_s, "loss": p.loss, "seed": p.seed})

    def _recv(self, timeout: float) -> bytes:
        """One message from the child, or b"" on EOF/timeout."""
        poller = select.poll()
        poller.register(self._control.fileno(), select.POLLIN)
        if not poller.poll(timeout * 1000.0):
            return b""
        try:
            return self._control.recv(1 << 16)
        except OSError:
            return b""

    def _await_ready(self) -> None:
        if self._recv(_CHILD_START_S) != b"ready":
            self.stop()  # reaps the child and collects its stderr for the message
            raise RuntimeError(f"forwarder process did not start: {self.child_stderr or 'no message'}")

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def stats(self) -> dict:
        """Ask the child for its counters (last known ones if it is gone)."""
        with self._lock:
            if not self._stopped and self.alive:
                try:
                    self._control.send(b"stats")
                    reply = self._recv(_CHILD_REPLY_S)
                    if reply:
                        self._last_stats = json.loads(reply)
                except OSError:
                    pass
            result = dict(self._last_stats)
        result["forwarder_alive"] = self.alive
        return result

    def stop(self) -> None:
        """Tell the child to stop, reap it (killing it if it will not go). Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            with contextlib.suppress(OSError):
                self._control.send(b"stop")
            self._control.close()
            try:
                _, err = self._process.communicate(timeout=_STOP_JOIN_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                _, err = self._process.communicate()
            if err:
                self.child_stderr = err.decode(errors="replace").strip()


# --------------------------------------------------------------------------
# A listener in the server namespace
# --------------------------------------------------------------------------


class _Listener:
    """A listening socket plus a thread that accepts and closes (or holds)."""

    def __init__(self, sock: socket.socket, hold: bool) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.accepted = 0
        self._hold = hold
        self._held: list[socket.socket] = []
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name=f"nbconn-wire-accept-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_fd in events or events.get(self.sock.fileno(), 0) & select.POLLNVAL:
                return
            for _ in range(64):
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    break
                except OSError:
                    return
                self.accepted += 1
                if self._hold and len(self._held) < HOLD_LIMIT:
                    self._held.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        """Stop the accept thread, then close the listener and held connections."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._stop_fd, 1)
        self._thread.join(_STOP_JOIN_S)
        os.close(self._stop_fd)
        self.sock.close()
        for conn in self._held:
            conn.close()
        self._held.clear()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


# --------------------------------------------------------------------------
# The link
# --------------------------------------------------------------------------


class Link:
    """Two namespaces joined by the impairment wire; created by :func:`impaired`.

    Attributes: ``client_addr``, ``server_addr`` (IPv4 strings),
    ``client_netns``, ``server_netns`` (``ip netns`` names), ``delay_ms``
    (out, back), ``jitter_ms``, ``loss`` (out, back), ``seed``,
    ``syn_linear_timeouts``.
    """

    def __init__(self, params: _Params) -> None:
        self._params = params
        self.client_addr = CLIENT_ADDR
        self.server_addr = SERVER_ADDR
        base = f"{netns.NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.client_netns = f"{base}-c"
        self.server_netns = f"{base}-s"
        self.delay_ms = (params.delay_s[0] * 1000.0, params.delay_s[1] * 1000.0)
        self.jitter_ms = params.jitter_s * 1000.0
        self.loss = params.loss
        self.seed = params.seed
        self.syn_linear_timeouts = params.syn_linear_timeouts
        self._created_namespaces: list[str] = []
        self._ns_fds: dict[str, int] = {}
        self._tun_fds: list[int] = []
        self._forwarder: _Forwarder | None = None
        self._listeners: list[_Listener] = []
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Link {self.client_addr}<->{self.server_addr} delay_ms={self.delay_ms} "
            f"jitter_ms={self.jitter_ms} loss={self.loss} {state}>"
        )

    # -- construction ------------------------------------------------------

    def _open(self) -> None:
        """Build namespaces, devices and forwarder. On failure the caller closes."""
        for name in (self.client_netns, self.server_netns):
            netns.add_netns(name)
            self._created_namespaces.append(name)
            self._ns_fds[name] = netns.open_netns(name)
        self._apply_sysctls()
        client_tun = self._make_tun(self.client_netns, CLIENT_IFNAME)
        server_tun = self._make_tun(self.server_netns, SERVER_IFNAME)
        self._configure(self.client_netns, CLIENT_IFNAME, CLIENT_ADDR, SERVER_ADDR)
        self._configure(self.server_netns, SERVER_IFNAME, SERVER_ADDR, CLIENT_ADDR)
        self._forwarder = _Forwarder(client_tun, server_tun, self._params)

    def _apply_sysctls(self) -> None:
        """No IPv6 chatter on the wire; optional SYN linear timeouts on the client."""
        common = []
        if os.path.isdir("/proc/sys/net/ipv6"):
            common = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        for name in (self.client_netns, self.server_netns):
            settings = list(common)
            if name == self.client_netns and self.syn_linear_timeouts is not None:
                settings.append(f"net.ipv4.tcp_syn_linear_timeouts={self.syn_linear_timeouts}")
            if settings:
                netns.run_ip(["netns", "exec", name, "sysctl", "-q", "-w", *settings])

    def _make_tun(self, ns_name: str, ifname: str) -> int:
        fd = netns.run_in_netns(self._ns_fds[ns_name], lambda: _create_tun(ifname), cleanup=os.close)
        self._tun_fds.append(fd)
        return fd

    @staticmethod
    def _configure(ns_name: str, ifname: str, local: str, peer: str) -> None:
        """lo up, tun up, point-to-point /32 address whose peer route reaches the other side."""
        commands = (
            "link set lo up\n"
            f"link set {ifname} up\n"
            f"addr add {local}/32 peer {peer}/32 dev {ifname}\n"
        )
        netns.run_ip(["-n", ns_name, "-batch", "-"], stdin=commands)

    # -- public API --------------------------------------------------------

    def _ns_fd(self, name: str) -> int:
        if self._closed:
            raise RuntimeError("this link has been closed")
        return self._ns_fds[name]

    @contextlib.contextmanager
    def client(self) -> Iterator[None]:
        """The current thread runs in the client namespace inside this block."""
        with netns.entered(self._ns_fd(self.client_netns)):
            yield

    @contextlib.contextmanager
    def server(self) -> Iterator[None]:
        """The current thread runs in the server namespace inside this block."""
        with netns.entered(self._ns_fd(self.server_netns)):
            yield

    def serve_listener(self, backlog: int = 128, hold: bool = False) -> int:
        """Listen on ``server_addr`` in the server namespace; return the port.

        A background thread accepts connections and closes them at once, or,
        with ``hold=True``, keeps up to ``HOLD_LIMIT`` of them open. The
        listener and everything it accepted are closed when the link closes.
        """
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0:
            raise ValueError(f"backlog must be a non-negative int, got {backlog!r}")
        with self.server():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.server_addr, 0))
            sock.listen(backlog)
            sock.setblocking(False)
            listener = _Listener(sock, hold)
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)
        return listener.port

    def stats(self) -> dict:
        """Counters of the forwarder (see module docstring) plus accepted connections."""
        result = self._forwarder.stats() if self._forwarder else {}
        result["listener_accepted"] = sum(lst.accepted for lst in self._listeners)
        return result

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        """Stop threads, close every fd, delete the namespaces. Idempotent.

        Every step runs even if an earlier one fails (or Ctrl-C arrives);
        the first error is re-raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        steps = [listener.close for listener in self._listeners]
        if self._forwarder is not None:
            steps.append(self._forwarder.stop)
        steps += [lambda fd=fd: os.close(fd) for fd in self._tun_fds]
        steps += [lambda fd=fd: os.close(fd) for fd in self._ns_fds.values()]
        steps += [lambda n=n: netns.delete_netns(n) for n in self._created_namespaces]
        first_error: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as exc:
                first_error = first_error or exc
        self._tun_fds.clear()
        self._ns_fds.clear()
        _live_links.discard(self)
        if first_error is not None:
            raise first_error

    @property
    def closed(self) -> bool:
        return self._closed

    def workers_alive(self) -> bool:
        """True if the forwarder process or any accept thread is still running."""
        running = self._forwarder is not None and self._forwarder.alive
        return running or any(lst.alive for lst in self._listeners)


_live_links: set[Link] = set()


def _close_live_links() -> None:
    """atexit: tear down any link a crashed cell or notebook left open."""
    for link in list(_live_links):
        with contextlib.suppress(BaseException):
            link.close()


atexit.register(_close_live_links)


@contextlib.contextmanager
def impaired(
    delay_ms: float | tuple[float, float] = 10.0,
    jitter_ms: float = 0.0,
    loss: float | tuple[float, float] = 0.0,
    seed: int | None = None,
    syn_linear_timeouts: int | None = None,
) -> Iterator[Link]:
    """Create a client/server namespace pair joined by an impaired wire.

    ``delay_ms`` is the one-way delay (or an ``(out, back)`` pair, out being
    client -> server), ``jitter_ms`` a uniform +-jitter added per packet
    (at most the delay), ``loss`` the independent drop probability per
    packet per direction (or a pair), ``seed`` seeds the drop/jitter RNG and
    ``syn_linear_timeouts`` sets ``net.ipv4.tcp_syn_linear_timeouts`` in
    the client namespace.  Everything is torn down when the block exits,
    however it exits.
    """
    params = _validate(delay_ms, jitter_ms, loss, seed, syn_linear_timeouts)
    if syn_linear_timeouts is not None and not os.path.exists(_SYN_LINEAR_SYSCTL):
        raise RuntimeError("this kernel has no net.ipv4.tcp_syn_linear_timeouts sysctl")
    netns.remove_stale_namespaces()
    link = Link(params)
    _live_links.add(link)
    try:
        link._open()
        yield link
    finally:
        link.close()
