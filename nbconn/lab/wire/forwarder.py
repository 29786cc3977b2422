"""The forwarder: the impairment wire's cable, copying packets between two TUN devices through a delay heap.

This file is what the lab's helper process (:mod:`nbconn.lab.child`) loads into the
forked forwarder: the standard library only, nothing from nbconn.  The process holds
the two TUN descriptors (client side, server side) and a SOCK_SEQPACKET control
socket to the notebook's process, and nothing else: it drops every capability
(:func:`drop_privileges`) before it touches a packet.

A packet read from one TUN device gets its fate when it is read: with probability
``loss`` it is dropped (counted); otherwise it gets a due time ``now + delay (+
uniform jitter)`` and waits in a heap ordered by (due time, arrival number), to be
written unchanged into the other device when due.  The loop sleeps in ``ppoll()``
(through ctypes: nanosecond timeouts, where ``select.poll`` rounds up to whole
milliseconds) on both devices and the control socket, until a packet arrives, the
head of the heap is due, or the parent speaks (``stats``; ``stop`` or end of file
ends it, so it also ends if the notebook dies).  Timer slack is set to 1 ns
(``PR_SET_TIMERSLACK``), and the loop learns how late its timed wake-ups land and
asks to be woken that much early (at most ``MAX_WAKE_ALLOWANCE_S``), so the
*average* delay matches the requested one.  With zero jitter one direction's due
times never decrease and ties keep arrival order: packet order is preserved.  Every
random choice comes from a seeded RNG per direction (``seed``).

Why a process and not a thread: a thread shares the notebook's GIL, and a due packet
would wait up to ``sys.getswitchinterval()`` (5 ms) while a cell runs Python.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import heapq
import json
import os
import random
import signal
import socket
import time

QUEUE_LIMIT = 4096  # packets held in the delay heap at most
READ_BATCH = 256  # packets read per fd per wake-up, so one side cannot starve the other
MAX_PACKET = 65_536
LATENESS_WINDOW = 4096  # recent lateness samples kept for percentiles
MAX_WAKE_ALLOWANCE_S = 0.0005  # the forwarder never releases a packet more than this early

_PR_SET_TIMERSLACK = 29  # <linux/prctl.h>
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # <linux/capability.h>
_NOBODY = 65534

# <poll.h>
_POLLIN = 0x001
_POLLERR = 0x008
_POLLHUP = 0x010
_POLLNVAL = 0x020

_OUT, _BACK = 0, 1  # out: client -> server, back: server -> client
_DIRECTION_NAMES = ("out", "back")

_libc = ctypes.CDLL(None, use_errno=True)


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _ppoll_function():
    """libc ppoll with argument types set (ctypes releases the GIL while it waits)."""
    ppoll = _libc.ppoll
    ppoll.argtypes = [ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.POINTER(_Timespec), ctypes.c_void_p]
    ppoll.restype = ctypes.c_int
    return ppoll


def _set_thread_timer_slack(nanoseconds: int) -> None:
    """Ask the kernel not to defer this thread's timer wake-ups (best effort)."""
    with contextlib.suppress(Exception):
        _libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(nanoseconds), 0, 0, 0)


# --------------------------------------------------------------------------
# The forwarder: runs in a child process
# --------------------------------------------------------------------------


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

    def run(self, ppoll) -> None:
        """Forward until told to stop. Never spins: ppoll sleeps until a packet
        arrives, the head of the heap is due, or the parent speaks."""
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
        """A JSON-able snapshot of the counters.  The recent lateness samples go to the parent as whole
        nanoseconds (4096 of them fit one reply), which takes their percentiles by nbconn.stats's rule: this
        file imports nothing from nbconn, and a second copy of the rule here would be free to drift."""
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
            "recent_lateness_ns": [round(late * 1e9) for late in self._late_recent],
            "max_lateness_us": (self._late_max * 1e6) if count else 0.0,
            "wake_allowance_us": self._allowance * 1e6,
            "forwarder_error": self._error,
        }


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(to_nobody: bool) -> None:
    """Keep nothing but the descriptors: no capabilities, no way to regain any.

    The forwarder only reads and writes two TUN fds and one socket it already holds.
    As real root it first becomes nobody (65534); in a user namespace it is uid 0
    there with every capability over the lab's namespaces, which it gives up here.
    """
    if to_nobody:
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)  # drops the capabilities of root too
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: nothing effective, permitted or inheritable
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def run_child(client_tun: int, server_tun: int, control: socket.socket, params: dict, parent: int) -> None:
    """The forwarder process's whole life: drop privileges, say ready, forward until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # Everything that may load a module (the seeded RNGs load _sha2, ctypes' ppoll) happens first: as nobody,
    # an interpreter installed under /root (pyenv) can no longer read its own library directory.
    loop = _ForwarderLoop(client_tun, server_tun, control, params)
    ppoll = _ppoll_function()
    json.dumps(loop.stats())
    drop_privileges(params.get("to_nobody", False))
    # Die with the helper.  Set after the uid change, which clears it; if the helper already died, go now.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return
    _set_thread_timer_slack(1)
    control.setblocking(False)
    control.send(b"ready")
    loop.run(ppoll)
