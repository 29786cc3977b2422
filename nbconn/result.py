"""What one connect left behind: its Result, and the trace of its steps.

This module owns the trace.  A step is recorded by exactly one path, the
callable :meth:`Result.recorder` returns, given one flat tuple ``(name, fmt, ret,
t_start_ns, t_end_ns, *args)``.  The recorder lays its items end to end in one
list per Result, so recording a step leaves no object behind for the cyclic
garbage collector (see :meth:`Result.recorder`), and the items become a
:class:`Step` the first time somebody reads :attr:`Result.steps`: a step's
``args`` are as many as its ``fmt`` has fields.  The strace-like text of a step is built only when somebody looks at it
(:attr:`Step.call`, via :mod:`nbconn.strace`).

Each step carries two clock reads, before and after its call, so a trace shows
how long each call took (like ``strace -T``) and where it started relative to
``socket()`` (like ``strace -r``, but from one origin).
"""

from __future__ import annotations

import socket
import string
from collections import namedtuple
from dataclasses import dataclass, field

from .errors import errno_name, errno_number
from .strace import call_text, format_ns, sockaddr_len, sockaddr_text
from .tcpinfo import parse_tcp_info


#: Which step of nginx's ngx_event_connect_peer (then ngx_http_upstream_test_connect) a call belongs to.
NgxStep = namedtuple("NgxStep", ["number", "name"])


#: recorded name -> the step of nginx's flow it belongs to (None: nbconn's own extras, e.g. TCP_INFO).
NGX_STEPS = {
    "socket": NgxStep(1, "socket"),
    "setsockopt": NgxStep(2, "socket options"),
    "getsockopt": NgxStep(2, "socket options"),
    "bind": NgxStep(3, "non-blocking, bind"),
    "nonblocking": NgxStep(3, "non-blocking, bind"),
    "epoll_ctl": NgxStep(4, "epoll add"),
    "connect": NgxStep(5, "connect"),
    "timer": NgxStep(5, "connect"),
    "epoll_wait": NgxStep(5, "connect"),
    "so_error": NgxStep(5, "connect"),
    "timeout": NgxStep(5, "connect"),
}

_FIELD_COUNT: dict[str, int] = {}  # fmt -> how many replacement fields it has; formats are a few literals


def _arg_count(fmt: str) -> int:
    """How many arguments follow ``(name, fmt, ret, t_start_ns, t_end_ns)`` in the recorded items: one per
    field of the step's format, since the format is what prints them."""
    fields = _FIELD_COUNT.get(fmt)
    if fields is None:
        fields = sum(1 for _, field_name, _, _ in string.Formatter().parse(fmt) if field_name is not None)
        if len(_FIELD_COUNT) < 4096:
            _FIELD_COUNT[fmt] = fields
    return fields


#: Steps that are events, not calls: no "= ret" after them.
_EVENTS = ("timer", "timeout")


class Step:
    """One recorded syscall (or timer event) of a connect.

    - ``name``: socket, setsockopt, getsockopt, nonblocking, bind, epoll_ctl, connect,
      timer, epoll_wait, so_error, timeout, tcp_info, unregister, close
    - ``ngx_handler``: for ``so_error``, the nginx handler whose test_connect reads it (see Result)
    - ``call``: the call as strace prints it, e.g.
      ``connect(5, {sa_family=AF_INET, ...}, 16) = -1 EINPROGRESS``
    - ``ret``: the return value, or the errno name when the call failed
    - ``t_start_ns``: time.monotonic_ns() right before the call
    - ``t_ns``: time.monotonic_ns() right after the call returned
    - ``duration_ns``: how long the call itself took (t_ns - t_start_ns)
    - ``ngx_step``: the step of nginx's flow it belongs to, an :class:`NgxStep` or None
    """

    __slots__ = ("name", "_fmt", "_args", "ret", "t_start_ns", "t_ns", "ngx_handler")

    def __init__(self, name: str, fmt: str, args: tuple, ret: object, t_start_ns: int, t_ns: int,
                 ngx_handler: str | None = None) -> None:
        self.name = name
        self._fmt = fmt
        self._args = args
        self.ret = ret
        self.t_start_ns = t_start_ns
        self.t_ns = t_ns
        self.ngx_handler = ngx_handler  # for so_error: the nginx handler whose test_connect makes this call

    @property
    def duration_ns(self) -> int:
        return self.t_ns - self.t_start_ns

    @property
    def ngx_step(self) -> NgxStep | None:
        return NGX_STEPS.get(self.name)

    @property
    def call(self) -> str:
        text = self._fmt.format(*self._args)
        return text if self.name in _EVENTS else call_text(text, self.ret)

    def to_dict(self, t0_ns: int = 0) -> dict:
        ngx = self.ngx_step
        return {"step": self.name, "ngx_step": ngx.number if ngx else None, "ngx_step_name": ngx.name if ngx else None,
                "call": self.call, "ret": self.ret, "t_start_ns": self.t_start_ns - t0_ns, "t_ns": self.t_ns - t0_ns,
                "duration_ns": self.duration_ns, "ngx_handler": self.ngx_handler}

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.call!r})"


@dataclass
class Result:
    """Everything one connect attempt found out.  A context manager: closes a kept socket.

    Field by field (the nginx names and rules come from :mod:`nbconn.errors`, which
    cites ``ngx_event_connect_peer`` and ``ngx_http_upstream_test_connect``):

    - ``outcome``: connected, refused, timed_out, reset, unreachable or error
    - ``errno``: the errno name that decided it (None when connected)
    - ``connect_returned``: 0, or the errno name connect() failed with (EINPROGRESS...)
    - ``ngx_connect``: what ngx_event_connect_peer would return (NGX_OK, NGX_AGAIN,
      NGX_DECLINED, NGX_ERROR)
    - ``ngx_decision``: how nginx ends the attempt: NGX_OK (usable), NGX_DECLINED
      (connect() failed at once), NGX_ERROR (SO_ERROR reported a failure, or a
      step before connect() failed), NGX_HTTP_UPSTREAM_FT_TIMEOUT (the connect
      timer fired: nginx's name for that end, no function returns a code there)
    - ``ngx_next``: the next-upstream kind nginx retries another peer with:
      NGX_HTTP_UPSTREAM_FT_ERROR, NGX_HTTP_UPSTREAM_FT_TIMEOUT, or None (connected;
      or a step before connect() failed, where nginx answers 500 instead)
    - ``ngx_log``: the error-log line nginx would write for the failure, else None
    - ``ngx_level``: its level: "error" (the peer's fault, e.g. ECONNREFUSED),
      "crit" (an unexpected connect() errno, or bind()), "alert" (socket(),
      ioctl(FIONBIO), epoll_ctl, setsockopt(SO_RCVBUF), or an SO_ERROR errno outside
      ngx_connection_error's list)
    - ``ngx_log_ignored``: lines nginx logs for failures it ignores and goes on
      ("setsockopt(SO_KEEPALIVE) failed, ignored"), as "[level] line"
    - ``handshake_ns``: from right before the connect() call to the decision (connect()
      returned, or SO_ERROR returned, or the timer ran)
    - ``started_ns`` / ``finished_ns``: right before socket(), and after the close
    - ``requested`` / ``effective``: socket options asked for, and read back
      (``effective`` stays empty in nginx-exact mode: nginx reads nothing back)
    - ``tcp_info``: rtt_us, rttvar_us, total_retrans of a TCP socket that connected, or that the timer
      ended (``syns_sent`` = 1 + total_retrans)
    - ``events``: the epoll event mask that woke the decision, e.g. "EPOLLOUT"
    - ``ngx_handler``: the nginx handler that would run ngx_http_upstream_test_connect (read SO_ERROR):
      "ngx_http_upstream_process_header" (the read handler: the event carried EPOLLIN, EPOLLERR or EPOLLHUP,
      as a refusal's does) or "ngx_http_upstream_send_request" (EPOLLOUT alone; and straight after connect()
      returned 0 or a keepalive connection was reused); None when SO_ERROR was not read (timer, failed at once)
    - ``ngx_start_ns`` (nginx-exact only, else None): nginx's ``u->start_time``, the cached clock
      (``ngx_current_msec``, whole ms, as ns) when the try began -- before socket()
    - ``ngx_connect_time_ms`` (nginx-exact only): what ``$upstream_connect_time`` would log for this try, in
      ms: set by ngx_http_upstream_send_request from the cached clock, so None ("-") when the read handler
      decided (a refusal) or the timer fired
    - ``sock``: the connected socket when kept (``keep=True``), else None
    """

    target: str
    family: str
    outcome: str = "error"
    errno: str | None = None
    connect_returned: int | str | None = None
    ngx_connect: str | None = None
    ngx_decision: str | None = None
    ngx_next: str | None = None
    ngx_log: str | None = None
    ngx_level: str | None = None
    ngx_log_ignored: tuple = ()
    handshake_ns: int | None = None
    started_ns: int = 0
    finished_ns: int = 0
    fd: int | None = None
    requested: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)
    # TCP_INFO as read (bytes) until somebody looks: parsing it per connect measured ~2k CPU instructions
    _tcp_info: bytes | dict | None = field(default=None, repr=False)
    events: str | None = None
    ngx_handler: str | None = None
    ngx_start_ns: int | None = None
    ngx_connect_time_ms: int | None = None
    timer_fired: bool = False
    sock: socket.socket | None = field(default=None, repr=False)
    _steps: list = field(default_factory=list, repr=False)

    def recorder(self):
        """The one append path of the trace: a callable taking one record, the flat tuple
        ``(name, fmt, ret, t_start_ns, t_end_ns, *args)`` that :meth:`steps` turns into :class:`Step` objects.

        It is the list's own ``extend`` (a C call): the record's items go end to end into one list, and the
        tuple itself is freed at once.  Why not keep the tuple: the flow records about a dozen steps per
        connect, and every container kept per step is work for the cyclic garbage collector -- a dozen
        tuples per connect made it run ~4x as often, and cost 2.5-3.3 µs per connect of a 20,000-connect
        storm (its own time, measured with gc.callbacks; benchmarks/README.md "Where the time goes").
        """
        return self._steps.extend

    @property
    def steps(self) -> list[Step]:
        items = self._steps
        if not items or type(items[-1]) is Step:
            return items  # nothing recorded since the last read
        steps, i, n = [], 0, len(items)
        while i < n:
            item = items[i]
            if type(item) is Step:  # read before
                steps.append(item)
                i += 1
                continue
            name, fmt, ret, t_start_ns, t_ns = items[i:i + 5]
            end = i + 5 + _arg_count(fmt)
            # a connect reads SO_ERROR once, and the Result names the handler that did (ngx_handler)
            handler = self.ngx_handler if name == "so_error" else None
            steps.append(Step(name, fmt, tuple(items[i + 5:end]), ret, t_start_ns, t_ns, handler))
            i = end
        items[:] = steps
        return items

    @property
    def tcp_info(self) -> dict | None:
        """rtt_us, rttvar_us, retransmits, total_retrans, state of a TCP socket that connected or that the connect
        timer ended (None otherwise; never in nginx-exact mode)."""
        info = self._tcp_info
        if type(info) is bytes:
            info = self._tcp_info = parse_tcp_info(info)
        return info

    @property
    def syns_sent(self) -> int | None:
        """How many SYNs this attempt sent (1 + the kernel's tcpi_total_retrans), where TCP_INFO was read."""
        info = self.tcp_info
        return None if info is None else 1 + info["total_retrans"]

    @property
    def connected(self) -> bool:
        return self.outcome == "connected"

    @property
    def handshake_ms(self) -> float | None:
        return None if self.handshake_ns is None else self.handshake_ns / 1e6

    @property
    def errno_number(self) -> int | None:
        return None if self.errno is None else errno_number(self.errno)

    def trace(self) -> str:
        """The steps as strace -r -T would show them: start time after socket()'s start, duration, call.

        The last line says how the attempt ended; its handshake time is the
        difference of two times shown above it (connect() called -> decided).
        """
        t0 = self.started_ns
        lines = []
        t_connect = t_decided = None
        for s in self.steps:
            if s.name in _EVENTS:
                duration = "" if s.name == "timer" else "(timer)"
            else:
                duration = f"<{format_ns(s.duration_ns)}>"
            line = f"{format_ns(s.t_start_ns - t0):>10} {duration:>11}  {s.call}"
            if s.name == "so_error" and s.ngx_handler:
                line += f"  <- test_connect in {s.ngx_handler}"
            lines.append(line)
            if s.name == "connect":
                t_connect = t_decided = s.t_start_ns
                if self.connect_returned != "EINPROGRESS":
                    t_decided = s.t_ns
            elif s.name in ("so_error", "timeout"):
                t_decided = s.t_ns
        if t_connect is not None and t_decided is not None and self.handshake_ns is not None:
            lines.append(f"   connect() called at {format_ns(t_connect - t0)}, decided at {format_ns(t_decided - t0)}:")
        lines.append(f"-> {self.summary()}")
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [self.outcome]
        if self.errno:
            parts.append(self.errno)
        if self.handshake_ns is not None:
            parts.append(f"in {format_ns(self.handshake_ns)}")
        # connect() decided at once (NGX_OK / NGX_DECLINED, or a step before it failed): one code, shown once;
        # a pending handshake shows both: NGX_AGAIN, then what the write event or the timer decided
        same = self.ngx_decision is None or self.ngx_decision == self.ngx_connect
        nginx = f"{self.ngx_connect}" if same else f"{self.ngx_connect} -> {self.ngx_decision}"
        if self.ngx_decision is not None and self.ngx_decision == self.ngx_next:
            # the timer: no function returns a code there, the next-upstream kind is the whole decision
            nginx = f"{self.ngx_connect} -> the connect timer: next upstream {self.ngx_next}"
        elif self.ngx_next:
            nginx += f", next upstream: {self.ngx_next}"
        parts.append(f"(nginx: {nginx})")
        return " ".join(parts)

    def to_dict(self) -> dict:
        """Everything but the socket, JSON-serialisable; step times relative to socket()."""
        return {
            "target": self.target,
            "family": self.family,
            "outcome": self.outcome,
            "errno": self.errno,
            "connect_returned": self.connect_returned,
            "ngx_connect": self.ngx_connect,
            "ngx_decision": self.ngx_decision,
            "ngx_next": self.ngx_next,
            "ngx_log": self.ngx_log,
            "ngx_log_ignored": list(self.ngx_log_ignored),
            "ngx_level": self.ngx_level,
            "handshake_ns": self.handshake_ns,
            "timer_fired": self.timer_fired,
            "events": self.events,
            "ngx_handler": self.ngx_handler,
            "ngx_connect_time_ms": self.ngx_connect_time_ms,
            "requested": dict(self.requested),
            "effective": dict(self.effective),
            "tcp_info": self.tcp_info,
            "steps": [s.to_dict(self.started_ns) for s in self.steps],
        }

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Result":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Result", "Step", "NgxStep", "NGX_STEPS", "errno_name", "format_ns", "sockaddr_text", "sockaddr_len"]
