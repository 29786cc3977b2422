"""One connect attempt, step by step, the way nginx connects to an upstream.

This is the heart of nbconn.  Read :meth:`Attempt.start` next to nginx 1.22.1's
``ngx_event_connect_peer`` (src/event/ngx_event_connect.c) and
:meth:`Attempt.on_ready` next to ``ngx_http_upstream_test_connect``
(src/http/ngx_http_upstream.c): the same steps, in the same order.  What each
result *means* -- outcome, nginx's code, its next-upstream kind, log level and
line -- is not decided here: every branch asks :func:`nbconn.errors.verdict`.

Why the steps are in this order
-------------------------------
1. ``socket()`` gives a descriptor.  If even that fails (EMFILE: the process is
   out of descriptors) there is nothing to clean up; nginx returns NGX_ERROR.
   Where the socket is made can be chosen (:mod:`nbconn.socketsource`: e.g. in a
   lab network namespace); the trace says where.
2. Options are set *before* ``connect()`` because some only matter then:
   SO_RCVBUF decides the window scale offered in the SYN; TCP_SYNCNT decides how
   often the SYN is resent.  nginx 1.22.1 sets at most SO_RCVBUF and SO_KEEPALIVE
   here (:mod:`nbconn.options` says exactly when); it fails the connect when
   SO_RCVBUF cannot be set and ignores a failing SO_KEEPALIVE (the table in
   :mod:`nbconn.errors` says which).  nbconn then reads every value back, because
   the kernel changes some (SO_RCVBUF is doubled) -- nginx does not, and
   nginx-exact mode does not.
3. The socket becomes non-blocking (nginx: ``ngx_nonblocking`` =
   ``ioctl(FIONBIO)`` on Linux).  Otherwise ``connect()`` would sleep for the
   whole handshake -- up to minutes against a host that drops SYNs -- and one
   slow upstream would freeze every other connection of the worker.
   Only then, if a local address is configured (``proxy_bind``):
   IP_BIND_ADDRESS_NO_PORT, which nginx sets *by itself* when the address has no
   port (so that ``bind()`` reserves no port and ``connect()`` picks one for the
   4-tuple: fewer EADDRINUSE under many connections), then ``bind()``.
4. The descriptor is registered with epoll for EPOLLIN|EPOLLOUT|EPOLLRDHUP|
   EPOLLET (``ngx_epoll_add_connection``) *before* ``connect()``.  Not for
   correctness: registering after ``connect()`` would lose nothing, edge-triggered
   or not, because ``epoll_ctl(EPOLL_CTL_ADD)`` polls the file as it inserts it
   and queues it at once if it is already ready (Linux fs/eventpoll.c
   ``ep_insert``; notebook 03 cell ``order`` measures both orders).  What the
   order buys: a failing ``epoll_ctl`` costs nothing outside -- no SYN has been
   sent -- and one registration serves the whole life of the connection (no
   later EPOLL_CTL_MOD).
5. ``connect()``:

   - 0: connected already (AF_UNIX with room in the backlog does this): NGX_OK.
     nginx still reads SO_ERROR once before its first write:
     ``ngx_http_upstream_connect`` calls ``ngx_http_upstream_send_request``, and
     its ``!u->request_sent`` check runs ``ngx_http_upstream_test_connect``.
     nbconn does the same in both modes; the trace shows it as the
     ``getsockopt(SO_ERROR)`` step "<- test_connect in
     ngx_http_upstream_send_request", and it is the decision (the handshake time
     ends there, as after EINPROGRESS).  A reused keepalive connection (NGX_DONE)
     takes the same road with no socket() and no connect(): :func:`reuse`.
   - -1/EINPROGRESS: the handshake runs in the kernel.  Arm the connect timer
     (``proxy_connect_timeout``), wait for epoll to report the descriptor, then
     ask ``getsockopt(SOL_SOCKET, SO_ERROR)``: 0 means connected, anything
     else is the errno the connect failed with.  Which nginx handler asks
     depends on the event (:func:`handler_reading_so_error`): a refusal's
     EPOLLERR|EPOLLHUP runs the read handler, ``ngx_http_upstream_process_header``;
     EPOLLOUT alone the write handler, ``ngx_http_upstream_send_request``.  The
     step and the Result name it (``ngx_handler``).  If the timer fires first,
     nginx closes the socket without reading SO_ERROR and tries the next peer.
   - -1/anything else: failed at once; nginx returns NGX_DECLINED and tries the
     next peer.


Every path that opened the descriptor closes it.  nbconn removes it from epoll
first (EPOLL_CTL_DEL); nginx lets ``close()`` do that, and so does nginx-exact
mode (``Plan.nginx_exact``), which makes exactly nginx's syscalls up to the
first write (``tests/test_nginx_exact.py`` compares them, call for call, with a
real nginx 1.22.1 worker under strace): no SOCK_CLOEXEC, no read-back, no
TCP_INFO, no EPOLL_CTL_DEL, and an AF_UNIX ``connect()`` given the whole
110-byte ``sockaddr_un``, as nginx passes it.  nginx-exact also keeps nginx's
clock: the connect timer is armed at the loop's cached clock (``ngx_current_msec``,
read when epoll_wait last returned), and a loop made for nginx-exact attempts
(``Loop(nginx_clock=True)``) reckons epoll_wait's timeout from it too.  An idle
loop then waits the whole timeout from its epoll_wait call; a loop woken by other
events in between fires the timer early measured from ``connect()``, by however
long the worker ran before it.  The default mode arms it at ``connect()``.  The
Result then holds ``ngx_start_ns`` (``u->start_time``, before socket()) and
``ngx_connect_time_ms`` (what ``$upstream_connect_time`` would log).

The attempt is a state machine, :class:`State`: INIT -> CONNECTING -> DONE, or
INIT -> DONE when it is decided inside ``start()``.  ``start()`` runs once, from
INIT; DONE is set at the decision.  The loop (:mod:`nbconn.loop`) only says
"ready" or "deadline passed", so tests can drive each transition by hand.

The handshake time is the clock read right before ``connect()`` and again right
after the call that decided it (``connect()`` itself, ``getsockopt(SO_ERROR)``,
or the timer's run): the C client of ``benchmarks/connect_storm.c`` measures
the same stretch.  Each traced step reads the clock before and after its call,
so the trace shows how long each call took.
"""

from __future__ import annotations

import enum
import errno as _errno
import fcntl
import os
import socket
import struct
import termios
import time
from dataclasses import dataclass

from . import socketsource, validate
from .errors import ERROR, errno_name, verdict
from .loop import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, NGINX_MASK, event_names
from .options import OPTIONS, Bind, fit_family
from .result import Result
from .settings import Settings
from .strace import format_ns, sockaddr_len, sockaddr_text
from .targets import Target, sockaddr_bytes
from .tcpinfo import read_tcp_info_raw, rtt_us, total_retrans

# The int 1 that ioctl(FIONBIO) reads, as a *mutable* buffer: fcntl.ioctl tries a writable buffer first, and for
# bytes that try fails and formats an error message it then discards (PyUnicode_FromFormatV under cachegrind, every
# call): 550 -> 200 ns per call measured on CPython 3.11.  The kernel only reads it, and nothing here writes it.
_FIONBIO, _FIONBIO_ON = termios.FIONBIO, bytearray(struct.pack("i", 1))
_monotonic_ns = time.monotonic_ns
_SOL_SOCKET, _SO_ERROR, _SOCK_STREAM, _AF_UNIX = socket.SOL_SOCKET, socket.SO_ERROR, socket.SOCK_STREAM, socket.AF_UNIX
_NONBLOCKING_CALL = {"ioctl": "ioctl(FIONBIO)", "setblocking": "ioctl(FIONBIO)", "fcntl": "fcntl(O_NONBLOCK)"}


#: The two nginx handlers that run ngx_http_upstream_test_connect (the getsockopt(SO_ERROR) of a connect).
SEND_REQUEST = "ngx_http_upstream_send_request"  # the write handler, and straight after NGX_OK / NGX_DONE
PROCESS_HEADER = "ngx_http_upstream_process_header"  # the read handler
_READ_FIRST = EPOLLIN | EPOLLERR | EPOLLHUP
_SO_ERROR_CALL = "getsockopt({}, SOL_SOCKET, SO_ERROR, [{}], [4])"


def handler_reading_so_error(events: int) -> str:
    """Which nginx 1.22.1 handler reads SO_ERROR for an epoll event mask: a pure rule, tested on real sockets.

    ``ngx_epoll_process_events`` (src/event/modules/ngx_epoll_module.c, lines 862-931) adds EPOLLIN|EPOLLOUT
    to any event carrying EPOLLERR or EPOLLHUP, then runs the *read* handler first when EPOLLIN is set:
    ``ngx_http_upstream_process_header``, whose ``!u->request_sent`` check calls test_connect (line 2371).
    A refusal's RST brings EPOLLERR|EPOLLHUP, so the read handler reads SO_ERROR, fails the try and closes
    the connection; the write half of the same event is then stale (``c->fd == -1``) and skipped.  Only
    EPOLLOUT alone (a handshake that completed) goes to ``ngx_http_upstream_send_request_handler`` ->
    ``ngx_http_upstream_send_request`` (line 2076), which also sets $upstream_connect_time first.
    """
    return PROCESS_HEADER if events & _READ_FIRST else SEND_REQUEST


_SOCKADDR_UN_SIZE = 110  # sizeof(struct sockaddr_un) on Linux: sa_family (2) + sun_path[108]


def nginx_sockaddr(target: Target) -> bytes:
    """The sockaddr nginx's connect() passes: for an AF_UNIX path the whole ``struct sockaddr_un``.

    ngx_parse_unix_domain_url (src/core/ngx_inet.c) sets socklen = sizeof(struct sockaddr_un): 110 bytes,
    the path NUL-padded, where Python passes the used length.  An abstract name (``unix:@name``) keeps its
    length: nginx 1.22.1 has no way to name one, and padding would change the name (unix(7)).
    """
    raw = target.c_sockaddr
    if target.family == _AF_UNIX and raw[2:3] != b"\x00":
        return raw.ljust(_SOCKADDR_UN_SIZE, b"\x00")
    return raw


class State(enum.Enum):
    """Where an :class:`Attempt` is.  INIT -> CONNECTING -> DONE, or INIT -> DONE."""

    INIT = "INIT"  # made, nothing opened yet
    CONNECTING = "CONNECTING"  # connect() returned EINPROGRESS: a timer and an epoll registration are live
    DONE = "DONE"  # decided: result is final


INIT, CONNECTING, DONE = State.INIT, State.CONNECTING, State.DONE


@dataclass(frozen=True)
class Plan:
    """A :class:`~nbconn.settings.Settings` compiled for one address family (:func:`make_plan`): what its
    attempts read, precomputed (the trace's texts, the encoded option values), shared by all of them."""

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
    nginx_exact: bool = False  # exactly nginx's syscalls (see the module docstring)
    family_name: str = ""  # "AF_INET": what socket() shows in the trace
    mask_names: str = ""  # the epoll mask as strace prints it
    setsockopt_args: tuple = ()  # per option: (spec, bytes or int for setsockopt, value as strace shows it, size)
    timeout_ms: int = 0  # timeout_ns in whole ms, as the trace shows it
    socket_call: tuple = ("", ())  # step 1 as the trace shows it: (format, arguments)
    local_args: tuple = ()  # IP_BIND_ADDRESS_NO_PORT, set after ioctl(FIONBIO) and before bind(): as setsockopt_args


def make_plan(family: int, settings: Settings) -> Plan:
    """Compile ``settings`` for a target of ``family``: the Plan its attempts share.

    The Settings was validated when it was made; only what needs the family is checked here (an option
    that does not apply to it, a bind address of the other family): ValueError naming it, before any socket.
    """
    planned, bind = fit_family([(OPTIONS[name], value) for name, value in settings.options.items()],
                               settings.local, family)
    local = local_address_options(planned, bind)
    planned = [(spec, value) for spec, value in planned if spec.name not in LOCAL_ADDRESS_OPTIONS]
    nginx_exact = settings.nginx_exact
    mask = NGINX_MASK if settings.trigger == "edge" else NGINX_MASK & ~EPOLLET
    timeout_ns = int(settings.timeout * 1e9)
    if nginx_exact:
        _load_libc()
    family_name = socket.AddressFamily(family).name
    return Plan(
        family=family, options=tuple(planned), bind=bind, nonblocking=settings.nonblocking, mask=mask,
        timeout_ns=timeout_ns, keep=settings.keep, trace=settings.trace,
        tcp_info=settings.tcp_info and not nginx_exact, requested=settings.requested(), nginx_exact=nginx_exact,
        family_name=family_name, mask_names=event_names(mask),
        setsockopt_args=tuple((spec, spec.encode(value), spec.show(value), spec.size) for spec, value in planned),
        timeout_ms=timeout_ns // 1_000_000,
        # strace names protocol 0 IPPROTO_IP for AF_INET/AF_INET6, and prints 0 for AF_UNIX
        socket_call=("socket({}, SOCK_STREAM, {})" if nginx_exact else "socket({}, SOCK_STREAM|SOCK_CLOEXEC, {})",
                     (family_name, "0" if family == _AF_UNIX else "IPPROTO_IP")),
        local_args=tuple((spec, spec.encode(value), spec.show(value), spec.size) for spec, value in local))


def plans_by_family(targets, settings: Settings) -> dict:
    """One Plan per address family among ``targets`` (parsed Targets): what connect_many and a race share."""
    plans: dict[int, Plan] = {}
    for target in targets:
        if target.family not in plans:
            plans[target.family] = make_plan(target.family, settings)
    return plans


#: Options nginx sets in the local-address block of ngx_event_connect_peer, after ngx_nonblocking and before
#: bind() (src/event/ngx_event_connect.c, lines 95-157), not with SO_RCVBUF/SO_KEEPALIVE right after socket().
LOCAL_ADDRESS_OPTIONS = ("transparent", "bind_address_no_port")


def local_address_options(planned: list, bind: Bind | None) -> list:
    """The (spec, value) pairs set between ioctl(FIONBIO) and bind(), as nginx 1.22.1 sets them.

    First IP_TRANSPARENT when asked (``transparent=True``; nginx: ``proxy_bind ... transparent``, lines
    97-103).  Then IP_BIND_ADDRESS_NO_PORT: nginx sets it to 1 *by itself* whenever proxy_bind has no port
    (port 0) and the peer is not AF_UNIX (lines 109-131; Debian's build has NGX_HAVE_IP_BIND_ADDRESS_NO_PORT).
    A value the caller gave (``bind_address_no_port=``) replaces nginx's own.  Without ``bind`` a given
    option is still set at this place, where nginx would set it.
    """
    given = {spec.name: (spec, value) for spec, value in planned if spec.name in LOCAL_ADDRESS_OPTIONS}
    # a Bind is only ever AF_INET/AF_INET6 (options.parse_bind), so a portless one always gets nginx's own
    if "bind_address_no_port" not in given and bind is not None and bind.address[1] == 0:
        given["bind_address_no_port"] = (OPTIONS["bind_address_no_port"], True)
    return [given[name] for name in LOCAL_ADDRESS_OPTIONS if name in given]


_libc = None


def _load_libc():
    """The C library through ctypes, for nginx-exact mode; loaded by make_plan, so ``import nbconn`` stays light
    and the first traced socket() does not include loading it."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True), ctypes
    return _libc


class _CSocket:
    """A socket made and used through the C library's calls: nginx-exact mode's socket.

    Python's ``socket.socket`` always asks for SOCK_CLOEXEC, and wrapping a descriptor
    made elsewhere (``socket.socket(fileno=fd)``) costs a getsockname() of its own
    (measured with strace on CPython 3.11).  nginx makes neither call, so in this mode
    socket(), setsockopt(), bind(), connect() and getsockopt(SO_ERROR) are the C
    library's own; ioctl and epoll_ctl take the descriptor number as they are.
    """

    __slots__ = ("_fd", "family", "_so_error", "_so_error_len", "_so_error_refs")

    def __init__(self, family: int) -> None:
        libc, ctypes = _libc or _load_libc()
        self._fd = -1
        self.family = family
        fd = libc.socket(family, _SOCK_STREAM, 0)
        if fd < 0:
            self._raise()
        self._fd = fd
        # getsockopt(SO_ERROR)'s int and length, made here and not in so_error(): that call sits inside the
        # handshake time reported, and making two ctypes objects and their pointers there took ~0.6 µs of it
        self._so_error, self._so_error_len = ctypes.c_int(), ctypes.c_uint(4)
        self._so_error_refs = ctypes.byref(self._so_error), ctypes.byref(self._so_error_len)

    @staticmethod
    def _raise():
        err = _libc[1].get_errno()
        raise OSError(err, os.strerror(err))

    def fileno(self) -> int:
        return self._fd

    def setsockopt(self, level: int, optname: int, value) -> None:
        if isinstance(value, int):
            value = struct.pack("i", value)
        if _libc[0].setsockopt(self._fd, level, optname, value, len(value)):
            self._raise()

    def bind(self, address) -> None:
        raw = sockaddr_bytes(self.family, address)
        if _libc[0].bind(self._fd, raw, len(raw)):
            self._raise()

    def connect_ex(self, c_sockaddr: bytes) -> int:
        return _libc[1].get_errno() if _libc[0].connect(self._fd, c_sockaddr, len(c_sockaddr)) else 0

    def so_error(self) -> int:
        libc, ctypes = _libc
        self._so_error_len.value = 4
        if libc.getsockopt(self._fd, _SOL_SOCKET, _SO_ERROR, *self._so_error_refs):
            return ctypes.get_errno()
        return self._so_error.value

    def detach_to_socket(self) -> socket.socket:
        """A Python socket for a kept connection (this wrapping costs one getsockname, after the decision)."""
        fd, self._fd = self._fd, -1
        return socket.socket(self.family, _SOCK_STREAM, 0, fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:  # never leave a descriptor behind, even on a path that forgot it
        self.close()



def _take_verdict(result: Result, answer, err: int) -> None:
    """The verdict table's answer for a decided attempt, written into its Result (one place for both the
    fresh connect and a reused keepalive connection)."""
    result.outcome = answer.outcome
    result.errno = err and errno_name(err) or None
    result.ngx_decision = answer.ngx_code
    result.ngx_next = answer.ngx_next
    result.ngx_log = answer.log
    result.ngx_level = answer.level

class Attempt:
    """One connect, from socket() to a decision.  Drive it with a :class:`nbconn.loop.Loop`.

    ``start()`` runs steps 1-5 up to connect(); if the handshake is pending it
    leaves a timer and an epoll registration behind, and the loop later calls
    ``on_ready(events)`` or ``on_timer()``.  When the attempt is decided,
    ``self.state`` is DONE, ``self.result`` is final and ``on_done(self)`` runs.
    """

    __slots__ = ("target", "plan", "loop", "on_done", "state", "result", "sock", "fd", "timer",
                 "_t_connect", "_t_returned", "_t_armed", "_record", "_clock")

    #: The nginx handler whose test_connect reads SO_ERROR when the socket is writable (EPOLLOUT alone, or
    #: connect() returned 0): ngx_http_upstream_send_request for plain HTTP.  For an https upstream
    #: nbconn.nginx.tls's attempt names ngx_http_upstream_ssl_init_connection, which runs it there instead.
    WRITE_HANDLER = SEND_REQUEST

    def __init__(self, target: Target, plan: Plan, loop, on_done=None) -> None:
        self.target = target
        self.plan = plan
        self.loop = loop
        self.on_done = on_done
        self.state = INIT
        self.sock: socket.socket | None = None
        self.fd = -1
        self.timer = None
        self._t_connect = self._t_returned = self._t_armed = 0
        self.result = Result(target=target.text, family=plan.family_name, requested=plan.requested)
        # Tracing off: nothing recorded, and the per-step clock reads cost a call to int() (which returns 0).
        self._record = self.result.recorder() if plan.trace else None
        self._clock = _monotonic_ns if plan.trace else int

    # -- INIT -> CONNECTING or DONE -------------------------------------------
    def start(self) -> None:
        """Steps 1 to 5, up to and including connect(), as ngx_event_connect_peer runs them."""
        if self.state is not INIT:
            raise RuntimeError(f"Attempt.start() runs once, from INIT; this attempt is {self.state.name}")
        plan, target, result, record, clock = self.plan, self.target, self.result, self._record, self._clock
        if plan.nginx_exact:
            # u->start_time = ngx_current_msec, in ngx_http_upstream_connect before ngx_event_connect_peer:
            # $upstream_connect_time counts from here, the cached clock, not from connect()
            result.ngx_start_ns = self.loop.cached_msec * 1_000_000
        # Step 1: socket().
        source = socketsource.current()
        fmt, args = plan.socket_call
        if source is not None:
            fmt, args = "socket({}, SOCK_STREAM, {} /* {} */)", (*args, source.where)
        t = result.started_ns = _monotonic_ns()
        try:
            if source is not None:
                # A lab helper answers over a socket: its wait is bounded by this connect's own timer
                sock = source.socket(target.family, _SOCK_STREAM, timeout_s=plan.timeout_ns / 1e9)
            elif plan.nginx_exact:
                sock = _CSocket(target.family)
            else:
                sock = socket.socket(target.family, _SOCK_STREAM)
        except OSError as exc:
            if record:
                record(("socket", fmt, errno_name(exc.errno), t, clock(), *args))
            return self._fail_before_connect("socket", exc.errno)
        fd = self.fd = result.fd = sock.fileno()
        self.sock = sock
        if record:
            record(("socket", fmt, fd, t, clock(), *args))

        # Step 2: options (nginx: SO_RCVBUF fails the connect, SO_KEEPALIVE is ignored), then read back.
        if plan.setsockopt_args and not self._set_options(plan.setsockopt_args):
            return

        # Step 3: non-blocking; then, if a local address is configured (nginx: proxy_bind),
        # IP_BIND_ADDRESS_NO_PORT and bind() -- in this order, as ngx_event_connect_peer runs them.
        t = clock()
        try:
            if plan.nonblocking == "ioctl":  # ngx_nonblocking on Linux
                fcntl.ioctl(fd, _FIONBIO, _FIONBIO_ON)
                if record:
                    record(("nonblocking", "ioctl({}, FIONBIO, [1])", 0, t, clock(), fd))
            else:
                self._make_nonblocking(sock, fd, t)
        except OSError as exc:
            if record:
                record(("nonblocking", "{}",
                        errno_name(exc.errno), t, clock(), _NONBLOCKING_CALL[plan.nonblocking]))
            return self._fail_before_connect("nonblocking", exc.errno, _NONBLOCKING_CALL[plan.nonblocking])
        if plan.local_args and not self._set_options(plan.local_args):
            return
        if plan.bind is not None:
            bind = plan.bind
            t = clock()
            try:
                sock.bind(bind.address)
                err = 0
            except OSError as exc:
                err = exc.errno
            if record:
                record(("bind", "bind({}, {}, {})",
                        err and errno_name(err), t, clock(), fd, sockaddr_text(bind.family, bind.address),
                        sockaddr_len(bind.family, bind.address)))
            if err:
                return self._fail_before_connect("bind", err, bind.text)

        # Step 4: register with epoll before connect(), as ngx_epoll_add_connection does.
        loop = self.loop
        t = clock()
        try:
            loop.register(fd, plan.mask, self)
            err = 0
        except OSError as exc:
            err = exc.errno
        if record:
            record(("epoll_ctl", "epoll_ctl({}, EPOLL_CTL_ADD, {}, {{events={}, data={{u32={}}}}})",
                    err and errno_name(err), t, clock(), loop.epoll_fd, fd, plan.mask_names, fd))
        if err:
            return self._fail_before_connect("epoll_ctl", err, fd)

        # Step 5: connect().  From the clock read before it to the decision is the handshake time.
        # nginx-exact: the C library's connect() with nginx's sockaddr (a whole sockaddr_un for AF_UNIX).
        address = nginx_sockaddr(target) if type(sock) is _CSocket else target.address
        t_connect = self._t_connect = _monotonic_ns()
        err = sock.connect_ex(address)
        t_returned = _monotonic_ns()
        self._t_returned = t_returned
        answer = verdict("connect", err, detail=target.text)
        result.connect_returned = err and errno_name(err)
        result.ngx_connect = answer.ngx_code
        if err == 0:
            # NGX_OK (AF_UNIX with room in the backlog): ngx_http_upstream_connect calls
            # ngx_http_upstream_send_request at once, and its `!u->request_sent` check runs
            # ngx_http_upstream_test_connect: SO_ERROR is read after connect() = 0 too (ngx_http_upstream.c,
            # lines 1662 and 2076).  The decision is that read, as after EINPROGRESS.
            t = clock()
            err = self._so_error()
            decided = _monotonic_ns()
            if record:
                self._record_connect()
                record(("so_error", _SO_ERROR_CALL, 0, t, decided, fd, err))
            result.ngx_handler = self.WRITE_HANDLER
            if plan.nginx_exact:
                result.ngx_connect_time_ms = 0  # same cached clock as u->start_time: no epoll_wait in between
            return self._decide(verdict("so_error", err), err, decided)
        if answer.outcome is not None:  # failed at once (NGX_DECLINED)
            if record:
                self._record_connect()
            return self._decide(answer, err, t_returned)

        # EINPROGRESS: arm the connect timer (ngx_add_timer(c->write, connect_timeout)) and wait.
        # The connect() and timer steps are recorded when the wait ends (_record_connect): on loopback the
        # handshake is already complete here, and whatever runs now lands in the handshake time reported.
        self.state = CONNECTING
        if plan.nginx_exact:
            # nginx arms it at its cached clock, ngx_current_msec (whole ms, set when epoll_wait last
            # returned: ngx_event_timer.h ngx_event_add_timer, line 56), not at connect(): it can fire early by
            # however long the worker ran since that epoll_wait returned.
            self._t_armed = loop.cached_msec * 1_000_000
        else:
            self._t_armed = t_connect
        self.timer = loop.call_at(self._t_armed + plan.timeout_ns, self)

    def _set_options(self, args: tuple) -> bool:
        """setsockopt each option of ``args``; nbconn (not nginx-exact) then reads each back.

        A failure nginx treats as fatal (SO_RCVBUF) ends the attempt (False); others are logged and ignored.
        """
        sock, fd, result, record, clock = self.sock, self.fd, self.result, self._record, self._clock
        for spec, encoded, shown, size in args:
            t = clock()
            try:
                sock.setsockopt(spec.level, spec.optname, encoded)
                err = 0
            except OSError as exc:
                err = exc.errno
            if record:
                record(("setsockopt", "setsockopt({}, {}, {}, {}, {})",
                        err and errno_name(err), t, clock(), fd, spec.level_name, spec.opt_name, shown, size))
            if err:
                answer = verdict("setsockopt", err, detail=spec.name)
                if answer.ngx_code is not None:
                    self._fail_before_connect("setsockopt", err, spec.name)
                    return False
                if answer.log:
                    result.ngx_log_ignored += (f"[{answer.level}] {answer.log}",)
        if not self.plan.nginx_exact:
            for spec, _, _, size in args:
                t = clock()
                effective = result.effective[spec.name] = spec.read(sock)
                if record:
                    record(("getsockopt", "getsockopt({}, {}, {}, {}, [{}])",
                            0, t, clock(), fd, spec.level_name, spec.opt_name, spec.show(effective), size))
        return True

    def _record_connect(self) -> None:
        """Record step 5's connect() (and the timer armed right after it), from the times start() kept."""
        record, t_returned, target = self._record, self._t_returned, self.target
        text, length = target.sockaddr
        if type(self.sock) is _CSocket:  # nginx-exact (a socket from a source is connected the Python way)
            length = len(nginx_sockaddr(target))
        record(("connect", "connect({}, {}, {})", self.result.connect_returned, self._t_connect, t_returned,
                self.fd, text, length))
        if self.state is CONNECTING:
            if self.plan.nginx_exact:
                record(("timer", "timer armed: {} ms (proxy_connect_timeout) at the cached clock, {} before "
                        "connect()", 0, t_returned, t_returned, self.plan.timeout_ms,
                        format_ns(self._t_connect - self._t_armed)))
            else:
                record(("timer", "timer armed: {} ms (proxy_connect_timeout)",
                        0, t_returned, t_returned, self.plan.timeout_ms))

    def _so_error(self) -> int:
        """getsockopt(SOL_SOCKET, SO_ERROR): the one call of ngx_http_upstream_test_connect on Linux."""
        sock = self.sock
        return sock.so_error() if type(sock) is _CSocket else sock.getsockopt(_SOL_SOCKET, _SO_ERROR)

    def _make_nonblocking(self, sock: socket.socket, fd: int, t: int) -> None:
        """The alternatives to ioctl(FIONBIO) that nbconn lets you compare (start() does the ioctl itself)."""
        method, record = self.plan.nonblocking, self._record
        if method == "fcntl":
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if record:
                t2 = self._clock()
                record(("nonblocking", "fcntl({}, F_GETFL)", f"{flags:#x}", t, t2, fd))
                t = t2
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            if record:
                record(("nonblocking", "fcntl({}, F_SETFL, {:#x}|O_NONBLOCK)", 0, t, self._clock(), fd, flags))
        else:  # CPython's sock.setblocking(False) is ioctl(FIONBIO) on Linux (socketmodule.c, internal_setblocking)
            sock.setblocking(False)
            if record:
                record(("nonblocking", "sock.setblocking(False) -> ioctl({}, FIONBIO, [1])",
                        0, t, self._clock(), fd))

    # -- CONNECTING -> DONE ----------------------------------------------------
    def on_ready(self, events: int) -> None:
        """epoll reported the descriptor: ask SO_ERROR (ngx_http_upstream_test_connect)."""
        if self.state is not CONNECTING:
            return  # a late event for an attempt already decided (e.g. by its timer in the same turn)
        # SO_ERROR first, bookkeeping after: whatever runs before the clock is read lands in handshake_ns.
        t = self._clock()
        err = self._so_error()
        decided = _monotonic_ns()
        loop, fd, result, record = self.loop, self.fd, self.result, self._record
        result.events = event_names(events)
        handler = handler_reading_so_error(events)
        if handler is SEND_REQUEST:
            handler = self.WRITE_HANDLER
        result.ngx_handler = handler
        if record:
            self._record_connect()
            record(("epoll_wait", "epoll_wait({}, [{{events={}, data={{u32={}}}}}], {}, {})",
                    1, loop.last_wait_started_ns, loop.last_wait_returned_ns, loop.epoll_fd, result.events, fd,
                    loop.max_events, loop.last_wait_ms))
            record(("so_error", _SO_ERROR_CALL, 0, t, decided, fd, err))
        if self.plan.nginx_exact and handler is not PROCESS_HEADER:
            # $upstream_connect_time: ngx_http_upstream_send_request sets it (before test_connect) from the
            # cached clock of this epoll_wait's return; process_header never does, so a try decided there
            # logs "-" (ngx_http_upstream.c, line 2073)
            result.ngx_connect_time_ms = loop.cached_msec - result.ngx_start_ns // 1_000_000
        self._decide(verdict("so_error", err), err, decided)

    def on_timer(self) -> None:
        """The connect timer fired first: nginx closes without reading SO_ERROR ("upstream timed out")."""
        if self.state is not CONNECTING:
            return
        decided = _monotonic_ns()
        if self._record:
            self._record_connect()
            self._record(("timeout", "timer expired after {} ms: close without SO_ERROR",
                          0, decided, decided, self.plan.timeout_ms))
        self.result.timer_fired = True
        self._decide(verdict("timeout", None), _errno.ETIMEDOUT, decided)

    # -- -> DONE ---------------------------------------------------------------
    def _decide(self, answer, err: int, decided_ns: int) -> None:
        """Take the verdict; ``decided_ns`` is when it became known (connect(), SO_ERROR returned, timer ran)."""
        self.state = DONE
        if self.timer is not None:
            self.loop.cancel(self.timer)  # ngx_del_timer; a no-op when the loop already took it off to run it
            self.timer = None  # the timer refers to this attempt: drop the cycle so memory frees at once
        result = self.result
        result.handshake_ns = decided_ns - self._t_connect
        _take_verdict(result, answer, err)
        plan = self.plan
        if plan.tcp_info and self.target.family != _AF_UNIX and (err == 0 or result.timer_fired):
            # connected: the kernel's RTT estimate; ended by the timer: how many SYNs went out before it fired
            # (tcpi_total_retrans counts the resent ones) -- TCP_SYNCNT counts retransmissions, not SYNs
            t = self._clock()
            raw = result._tcp_info = read_tcp_info_raw(self.sock)  # parsed when somebody reads Result.tcp_info
            if self._record:
                if err == 0:
                    self._record(("tcp_info", "getsockopt({}, SOL_TCP, TCP_INFO, {{tcpi_rtt={}}}, [232])",
                                  0, t, self._clock(), self.fd, rtt_us(raw)))
                else:
                    self._record(("tcp_info", "getsockopt({}, SOL_TCP, TCP_INFO, {{tcpi_total_retrans={}}}, [232])",
                                  0, t, self._clock(), self.fd, total_retrans(raw)))
        self._release(keep=err == 0 and plan.keep)

    def _fail_before_connect(self, stage: str, err: int, detail: object = "") -> None:
        """A step before connect() failed: nginx's ``goto failed`` -> NGX_ERROR (no next peer; HTTP answers 500)."""
        answer = verdict(stage, err, detail=detail)
        self.state = DONE
        result = self.result
        result.outcome = answer.outcome
        result.errno = errno_name(err)
        result.ngx_connect = result.ngx_decision = answer.ngx_code
        result.ngx_next = answer.ngx_next
        result.ngx_log = answer.log
        result.ngx_level = answer.level
        self._release(keep=False)

    def _release(self, *, keep: bool) -> None:
        """Unregister from epoll (nginx-exact: leave that to close()), then close or hand the socket over.

        Runs once per attempt, after the state is DONE.
        """
        sock, fd, loop, record = self.sock, self.fd, self.loop, self._record
        if sock is not None:
            if loop.handler_of(fd) is self:
                if self.plan.nginx_exact:
                    loop.forget(fd)  # close() removes it from the epoll set, as nginx relies on
                else:
                    t = self._clock()
                    loop.unregister(fd)
                    if record:
                        record(("unregister", "epoll_ctl({}, EPOLL_CTL_DEL, {}, NULL)",
                                0, t, self._clock(), loop.epoll_fd, fd))
            if keep:
                self.result.sock = sock.detach_to_socket() if type(sock) is _CSocket else sock
            else:
                t = self._clock()
                sock.close()
                if record:
                    record(("close", "close({})", 0, t, self._clock(), fd))
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
            self.timer = None
        if self.state is CONNECTING and self._record:
            self._record_connect()
        if self.state is not DONE:
            self.state = DONE
            self.result.outcome = ERROR
            self.result.errno = "ECANCELED"
        self.on_done = None
        self._release(keep=False)


def reuse(kept: Result, *, trace: bool = True) -> Result:
    """A cached keepalive connection taken again (nginx: NGX_DONE): what nginx does before its first write.

    ``ngx_http_upstream_get_keepalive_peer`` hands back a cached connection, so ngx_event_connect_peer
    returns NGX_DONE before socket(): no socket(), no options, no epoll_ctl (it is still registered), no
    connect(), no timer.  ngx_http_upstream_connect then calls ngx_http_upstream_send_request, whose
    ``!u->request_sent`` check runs ngx_http_upstream_test_connect on it (ngx_http_upstream.c, lines 1662,
    2076): one getsockopt(SO_ERROR), then the request's writev().  This makes that one call on the socket
    ``kept`` holds (a Result of ``connect(..., keep=True)``; the socket stays there) and returns a new
    Result for the reuse.  The same call in either mode: there is nothing nbconn adds here.
    """
    sock = kept.sock if isinstance(kept, Result) else None
    if sock is None:
        raise ValueError(f"reuse() needs a Result holding a connected socket (connect(..., keep=True)), "
                         f"got {validate.shown(kept)}")
    validate.flag("trace", trace)
    result = Result(target=kept.target, family=kept.family)
    result.fd = fd = sock.fileno()
    result.ngx_connect = "NGX_DONE"
    result.ngx_handler = SEND_REQUEST
    t = result.started_ns = _monotonic_ns()
    err = sock.so_error() if type(sock) is _CSocket else sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
    decided = result.finished_ns = _monotonic_ns()
    if trace:
        result.recorder()(("so_error", _SO_ERROR_CALL, 0, t, decided, fd, err))
    answer = verdict("so_error", err)
    _take_verdict(result, answer, err)
    return result
