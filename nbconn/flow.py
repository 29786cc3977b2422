"""One connect attempt, step by step, the way nginx connects to an upstream.

This is the heart of nbconn.  Read it next to nginx's ``ngx_event_connect_peer``
(``src/event/ngx_event_connect.c``) and ``ngx_http_upstream_test_connect``
(``src/http/ngx_http_upstream.c``): the same steps, in the same order, with the
same decisions.

Why the steps are in this order
-------------------------------
1. ``socket()`` gives a descriptor.  If even that fails (EMFILE: the process is
   out of descriptors) there is nothing to clean up; nginx returns NGX_ERROR.
2. Options are set *before* ``connect()`` because some only matter then:
   SO_RCVBUF decides the window scale offered in the SYN; TCP_SYNCNT decides how
   often the SYN is resent.  nginx ignores a failing setsockopt ("failed,
   ignored"); so do we, but every value is read back, because the kernel
   changes some (SO_RCVBUF is doubled).
3. The socket becomes non-blocking (nginx: ``ngx_nonblocking`` =
   ``ioctl(FIONBIO)`` on Linux).  Otherwise ``connect()`` would sleep for the
   whole handshake -- up to minutes against a host that drops SYNs -- and one
   slow upstream would freeze every other connection of the worker.
   If a local address is configured (``proxy_bind``), ``bind()`` comes next.
4. The descriptor is registered with epoll for EPOLLIN|EPOLLOUT|EPOLLRDHUP|
   EPOLLET (``ngx_epoll_add_connection``) *before* ``connect()``.  With
   edge-triggered epoll, registering first means no readiness change can slip
   by unseen between ``connect()`` and registration, and one registration
   serves the whole life of the connection (no later EPOLL_CTL_MOD).
5. ``connect()``:
   - 0: connected already (AF_UNIX with room in the backlog does this).
   - -1/EINPROGRESS: the handshake runs in the kernel.  Arm the connect timer
     (``proxy_connect_timeout``), wait for the descriptor to become writable,
     then ask ``getsockopt(SOL_SOCKET, SO_ERROR)``: 0 means connected, anything
     else is the errno the connect failed with.  (The seed says *setsockopt*
     here: a slip -- it is getsockopt, see connect(2), EINPROGRESS.)
     If the timer fires first, nginx closes the socket without reading SO_ERROR
     and tries the next peer ("upstream timed out").
   - -1/anything else: failed at once; nginx returns NGX_DECLINED and tries the
     next peer.  On Linux even a refused loopback connect usually takes the
     EINPROGRESS road; measure it (notebook 04) rather than believe it.

Every path that opened the descriptor closes it, unregistering it from epoll
first, and records what it did.

The attempt is a small state machine -- INIT -> CONNECTING -> DONE -- whose
transitions (:meth:`Attempt.start`, :meth:`Attempt.on_ready`,
:meth:`Attempt.on_timer`) do the syscalls.  The loop (:mod:`nbconn.loop`) only
says "ready" or "deadline passed", so tests can drive each transition directly.

What it costs to watch
----------------------
Each step is recorded as it happens (:meth:`Attempt._step`), and the handshake
time is the clock read before ``connect()`` and again right after
``getsockopt(SO_ERROR)`` returns -- the moment the decision is known, as in
the C client of ``benchmarks/connect_storm.c``.  Everything this module does
between those two reads lands in the number it reports, so the path from
``connect()`` to the decision does as little as it can: values that only
depend on the Plan (family name, event mask text) are computed once per Plan,
a step is a plain tuple, and with ``trace=False`` nothing is recorded and no
clock is read for it.  ``benchmarks/`` measures the result against the same
flow in C.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import functools
import math
import os
import socket
import struct
import termios
import time
from dataclasses import dataclass

from . import errors
from .errors import errno_name
from .loop import EPOLLET, NGINX_MASK, event_names
from .options import Bind, OptionSpec, plan_options
from .result import Result, sockaddr_len, sockaddr_text
from .targets import Target
from .tcpinfo import read_tcp_info

NONBLOCKING_METHODS = ("ioctl", "fcntl", "setblocking")
TRIGGERS = ("edge", "level")
MAX_TIMEOUT = 24 * 3600.0

_FIONBIO_ON = struct.pack("i", 1)
_monotonic_ns = time.monotonic_ns

INIT, CONNECTING, DONE = "INIT", "CONNECTING", "DONE"

_EINPROGRESS = _errno.EINPROGRESS
_SOL_SOCKET, _SO_ERROR, _SOCK_STREAM, _AF_UNIX = socket.SOL_SOCKET, socket.SO_ERROR, socket.SOCK_STREAM, socket.AF_UNIX


@functools.lru_cache(maxsize=None)  # a handful of errnos ever occur
def _connect_answer(err: int) -> tuple[object, str]:
    """What connect() returned as the trace shows it (0 or the errno name), and nginx's code for it."""
    return (0 if err == 0 else errno_name(err)), errors.ngx_connect_code(err)


@functools.lru_cache(maxsize=1024)
def _sockaddr_shown(family: int, address: object) -> tuple[str, int]:
    """A target's sockaddr as strace shows it, and its length (connect_many repeats targets)."""
    return sockaddr_text(family, address), sockaddr_len(family, address)


@dataclass(frozen=True)
class Plan:
    """Everything about *how* to connect, validated once, shared by many attempts."""

    family: int
    options: tuple  # ((OptionSpec, value), ...) in application order
    bind: Bind | None
    nonblocking: str
    mask: int
    timeout_ns: int
    keep: bool
    trace: bool
    tcp_info: bool
    requested: dict
    family_name: str = ""  # "AF_INET": what socket() shows in the trace
    mask_names: str = ""  # the epoll mask as strace prints it
    setsockopt_args: tuple = ()  # per option: (spec, bytes or int for setsockopt, value as strace shows it, size)
    timeout_ms: int = 0  # timeout_ns in whole ms, as the trace shows it


def check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout={timeout!r} must be > 0 and at most {MAX_TIMEOUT:.0f} s")
    return float(timeout)


def check_settings(*, timeout: object, nonblocking: object, trigger: object, options: dict) -> None:
    """The checks that do not depend on the target's family: run them before resolving anything."""
    check_timeout(timeout)
    if nonblocking not in NONBLOCKING_METHODS:
        raise ValueError(f"nonblocking={nonblocking!r} must be one of {', '.join(NONBLOCKING_METHODS)}")
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger={trigger!r} must be 'edge' or 'level'")
    plan_options({k: v for k, v in options.items() if k != "bind"}, None)


def make_plan(family: int, *, timeout: object = 5.0, nonblocking: str = "ioctl", trigger: str = "edge",
              keep: bool = False, trace: bool = True, tcp_info: bool = True, options: dict | None = None) -> Plan:
    """Validate the settings of a connect for a target of ``family``; raise before any socket exists."""
    options = dict(options or {})
    check_settings(timeout=timeout, nonblocking=nonblocking, trigger=trigger, options=options)
    timeout = check_timeout(timeout)
    planned, bind = plan_options(options, family)
    mask = NGINX_MASK if trigger == "edge" else NGINX_MASK & ~EPOLLET
    return Plan(family, tuple(planned), bind, nonblocking, mask, int(timeout * 1e9), bool(keep), bool(trace),
                bool(tcp_info), {k: v for k, v in options.items() if v is not None},
                socket.AddressFamily(family).name, event_names(mask),
                tuple((spec, spec.encode(value), spec.show(value), spec.size) for spec, value in planned),
                int(timeout * 1e9) // 1_000_000)


class Attempt:
    """One connect, from socket() to a decision.  Drive it with a :class:`nbconn.loop.Loop`.

    ``start()`` runs seed steps 1-5 up to connect(); if the handshake is pending
    it leaves a timer and an epoll registration behind, and the loop later calls
    ``on_ready(events)`` or ``on_timer()``.  When the attempt is decided,
    ``self.state`` is DONE, ``self.result`` is final and ``on_done(self)`` runs.
    """

    __slots__ = ("target", "plan", "loop", "on_done", "state", "result", "sock", "fd", "timer",
                 "_t_connect", "_trace")

    def __init__(self, target: Target, plan: Plan, loop, on_done=None) -> None:
        self.target = target
        self.plan = plan
        self.loop = loop
        self.on_done = on_done
        self.state = INIT
        self.sock: socket.socket | None = None
        self.fd = -1
        self.timer = None
        self._t_connect = 0
        self.result = Result(target=target.text, family=plan.family_name, requested=plan.requested)
        self._trace = self.result._steps if plan.trace else None

    # -- recording -----------------------------------------------------------
    def _step(self, name: str, fmt: str, args: tuple, ret: object, t_ns: int = 0) -> None:
        """Record one step as a flat tuple, ``(name, fmt, ret, t_ns, *args)`` (a Step when read).

        ``t_ns`` is when the call returned; 0 means now.  With tracing off this
        does nothing (like nginx's ngx_log_debug when debug logging is off).
        """
        trace = self._trace
        if trace is not None:
            trace.append((name, fmt, ret, t_ns or _monotonic_ns()) + args)  # see nbconn.result.Step.from_record

    # -- INIT -> CONNECTING or DONE -------------------------------------------
    def start(self) -> None:
        """Seed steps 1 to 5, up to and including connect()."""
        plan, target, result = self.plan, self.target, self.result
        fam = plan.family_name
        result.started_ns = _monotonic_ns()

        # Step 1: socket().
        try:
            sock = socket.socket(target.family, _SOCK_STREAM)
        except OSError as exc:
            self._step("socket", "socket({}, SOCK_STREAM|SOCK_CLOEXEC, 0)", (fam,), errno_name(exc.errno))
            return self._fail_before_connect(exc.errno, "socket")
        fd = sock.fileno()
        self.sock = sock
        self.fd = result.fd = fd
        self._step("socket", "socket({}, SOCK_STREAM|SOCK_CLOEXEC, 0)", (fam,), fd)

        stage = "setsockopt"
        try:
            # Step 2: options, then read back what the kernel kept.
            if plan.options:
                self._set_options(sock, plan.setsockopt_args)

            # Step 3: non-blocking (and bind, which nginx does right after).
            stage = "nonblocking"
            self._make_nonblocking(sock)
            if plan.bind is not None:
                stage = "bind"
                sock.bind(plan.bind.address)
                self._step("bind", "bind({}, {}, {})",
                           (fd, sockaddr_text(plan.bind.family, plan.bind.address),
                            sockaddr_len(plan.bind.family, plan.bind.address)), 0)

            # Step 4: register with epoll before connect(), as ngx_epoll_add_connection does.
            stage = "epoll_ctl"
            self.loop.register(fd, plan.mask, self)
            self._step("epoll_ctl", "epoll_ctl({}, EPOLL_CTL_ADD, {}, {{events={}, data={{u32={}}}}})",
                       (self.loop.epoll_fd, fd, plan.mask_names, fd), 0)
        except OSError as exc:
            # nginx: "goto failed" -> ngx_close_connection -> NGX_ERROR.
            self._step(stage, "{} failed", (stage,), errno_name(exc.errno))
            return self._fail_before_connect(exc.errno, stage)

        # Step 5: connect().  Everything from here to the clock read after SO_ERROR is part of
        # the handshake time nbconn reports, so the two steps of this stretch are appended
        # directly -- the tuple _step would build -- instead of through a method call.
        trace = self._trace
        self._t_connect = _monotonic_ns()
        err = sock.connect_ex(target.address)
        t_returned = _monotonic_ns()
        result.connect_returned, result.ngx_connect = _connect_answer(err)
        if trace is not None:
            trace.append(("connect", "connect({}, {}, {})", result.connect_returned, t_returned, fd)
                         + _sockaddr_shown(target.family, target.address))

        if err == 0:
            return self._decide(0, errors.NGX_OK, t_returned)
        if err != _EINPROGRESS:
            result.ngx_log = errors.ngx_error_log_line(stage="connect", err=err, peer=target.text)
            result.ngx_level = errors.ngx_log_level(err)
            return self._decide(err, errors.NGX_DECLINED, t_returned)

        # EINPROGRESS: arm the connect timer (ngx_add_timer(c->write, connect_timeout)) and wait.
        self.state = CONNECTING
        self.timer = self.loop.call_at(self._t_connect + plan.timeout_ns, self)
        if trace is not None:
            trace.append(("timer", "timer armed: {} ms (proxy_connect_timeout)", 0, _monotonic_ns(), plan.timeout_ms))

    def _set_options(self, sock: socket.socket, options: tuple) -> None:
        """``options``: the Plan's ``setsockopt_args`` (encoded and shown once per Plan)."""
        fd, result, tracing = self.fd, self.result, self._trace is not None
        for spec, encoded, shown, size in options:
            try:
                sock.setsockopt(spec.level, spec.optname, encoded)
                ret: object = 0
            except OSError as exc:  # nginx: "setsockopt(...) failed, ignored"
                ret = errno_name(exc.errno)
            if tracing:
                self._step("setsockopt", "setsockopt({}, {}, {}, {}, {})",
                           (fd, spec.level_name, spec.opt_name, shown, size), ret)
        for spec, _, _, size in options:
            effective = spec.read(sock)
            result.effective[spec.name] = effective
            if tracing:
                self._step("getsockopt", "getsockopt({}, {}, {}, {}, [{}])",
                           (fd, spec.level_name, spec.opt_name, spec.show(effective), size), 0)

    def _make_nonblocking(self, sock: socket.socket) -> None:
        fd, method = self.fd, self.plan.nonblocking
        if method == "ioctl":
            fcntl.ioctl(fd, termios.FIONBIO, _FIONBIO_ON)
            self._step("nonblocking", "ioctl({}, FIONBIO, [1])", (fd,), 0)
        elif method == "fcntl":
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            self._step("nonblocking", "fcntl({}, F_GETFL)", (fd,), f"{flags:#x}")
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            self._step("nonblocking", "fcntl({}, F_SETFL, {:#x}|O_NONBLOCK)", (fd, flags), 0)
        else:  # CPython's sock.setblocking(False) is ioctl(FIONBIO) on Linux (socketmodule.c, internal_setblocking)
            sock.setblocking(False)
            self._step("nonblocking", "sock.setblocking(False) -> ioctl({}, FIONBIO, [1])", (fd,), 0)

    # -- CONNECTING -> DONE ----------------------------------------------------
    def on_ready(self, events: int) -> None:
        """epoll reported the descriptor: ask SO_ERROR (ngx_http_upstream_test_connect)."""
        if self.state is not CONNECTING:
            return
        # SO_ERROR first, bookkeeping after: whatever runs before the clock is read lands in handshake_ns.
        err = self.sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
        decided = _monotonic_ns()
        loop, fd, result = self.loop, self.fd, self.result
        result.events = event_names(events)
        self._step("epoll_wait", "epoll_wait({}, [{{events={}, data={{u32={}}}}}], {}, {})",
                   (loop.epoll_fd, result.events, fd, loop.max_events, loop.last_wait_ms), 1,
                   loop.last_wait_returned_ns)
        self._step("so_error", "getsockopt({}, SOL_SOCKET, SO_ERROR, [{}], [4])", (fd, err), 0, decided)
        loop.cancel(self.timer)
        if err:
            result.ngx_log = errors.ngx_error_log_line(stage="so_error", err=err)
            result.ngx_level = "error"
            return self._decide(err, errors.NGX_ERROR, decided)
        self._decide(0, errors.NGX_OK, decided)

    def on_timer(self) -> None:
        """The connect timer fired first: nginx closes without reading SO_ERROR ("upstream timed out")."""
        if self.state is not CONNECTING:
            return
        decided = _monotonic_ns()
        self._step("timeout", "timer expired after {} ms: close without SO_ERROR", (self.plan.timeout_ms,), 0, decided)
        self.result.timer_fired = True
        self.result.ngx_log = errors.ngx_error_log_line(stage="timer", err=_errno.ETIMEDOUT)
        self.result.ngx_level = "error"
        self._decide(_errno.ETIMEDOUT, "TIMEDOUT", decided)

    # -- DONE ----------------------------------------------------------------
    def _decide(self, err: int, decision: str, decided_ns: int) -> None:
        """Record the verdict; ``decided_ns`` is when it became known (connect() or SO_ERROR returned)."""
        result = self.result
        result.handshake_ns = decided_ns - self._t_connect
        result.outcome = errors.outcome_for(err)
        result.errno = errno_name(err) if err else None
        result.ngx_decision = decision
        if err == 0 and self.plan.tcp_info and self.target.family != _AF_UNIX:
            result.tcp_info = read_tcp_info(self.sock)
            self._step("tcp_info", "getsockopt({}, SOL_TCP, TCP_INFO, {{tcpi_rtt={}}}, [232])",
                       (self.fd, result.tcp_info["rtt_us"]), 0)
        self._release(keep=err == 0 and self.plan.keep)

    def _fail_before_connect(self, err: int, stage: str) -> None:
        """A step before connect() failed: nginx's NGX_ERROR (no next peer; HTTP answers 500)."""
        result = self.result
        result.outcome = errors.ERROR
        result.errno = errno_name(err)
        result.ngx_connect = errors.NGX_ERROR
        result.ngx_decision = errors.NGX_ERROR
        result.ngx_log = errors.ngx_error_log_line(stage=stage, err=err)
        result.ngx_level = "crit" if stage == "bind" else "alert"
        self._release(keep=False)

    def _release(self, *, keep: bool) -> None:
        """Unregister from epoll, then close (or hand the socket over). Runs exactly once."""
        self.state = DONE
        self.timer = None  # the timer refers to this attempt: drop the cycle so memory frees at once
        sock, fd, loop = self.sock, self.fd, self.loop
        if sock is not None:
            if loop.handler_of(fd) is self:
                loop.unregister(fd)
                self._step("unregister", "epoll_ctl({}, EPOLL_CTL_DEL, {}, NULL)", (loop.epoll_fd, fd), 0)
            if keep:
                self.result.sock = sock
            else:
                sock.close()
                self._step("close", "close({})", (fd,), 0)
            self.sock = None
        self.result.finished_ns = _monotonic_ns()
        if self.on_done is not None:
            self.on_done(self)

    def abort(self) -> None:
        """Tear down an attempt that will never be decided (KeyboardInterrupt, loop shutdown).

        Also finishes a _release that an interrupt cut short (state DONE, socket still here).
        """
        if self.state is DONE and self.sock is None:
            return
        if self.timer is not None:
            self.loop.cancel(self.timer)
        if self.state is not DONE:
            self.result.outcome = errors.ERROR
            self.result.errno = "ECANCELED"
        self.on_done = None
        self._release(keep=False)
