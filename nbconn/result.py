"""What one connect left behind: its steps (a trace) and its Result.

Recording has to be cheap, because the same flow runs 20,000 times a second in
the benchmarks.  So the flow appends one flat tuple per step -- ``(name, fmt,
ret, t_ns, *args)`` -- while it runs; they become Step objects the first time
somebody reads :attr:`Result.steps` (:meth:`Step.from_record`), and the
strace-like text of a step is only built when somebody looks at it
(:attr:`Step.call`).  (A tuple costs a fraction of an object, and the garbage
collector forgets it after one look; 20,000 Results carry 240,000 steps.)
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from .errors import errno_name

#: Which of the seed's five steps each recorded syscall belongs to.
SEED_STEP = {
    "socket": 1,
    "setsockopt": 2,
    "getsockopt": 2,
    "bind": 2,
    "nonblocking": 3,
    "epoll_ctl": 4,
    "connect": 5,
    "timer": 5,
    "epoll_wait": 5,
    "so_error": 5,
    "timeout": 5,
    "tcp_info": None,
    "unregister": None,
    "close": None,
}


class Step:
    """One recorded syscall (or timer event) of a connect.

    ``name``   what happened: socket, setsockopt, getsockopt, nonblocking, bind,
               epoll_ctl, connect, timer, epoll_wait, so_error, timeout,
               tcp_info, unregister, close
    ``call``   the call as strace would print it, e.g.
               ``connect(5, {sa_family=AF_INET, sin_port=htons(80), ...}, 16) = -1 EINPROGRESS``
    ``ret``    the return value, or the errno name when the call failed
    ``t_ns``   time.monotonic_ns() right after the call returned
    """

    __slots__ = ("name", "_fmt", "_args", "ret", "t_ns")

    def __init__(self, name: str, fmt: str, args: tuple, ret: object, t_ns: int) -> None:
        self.name = name
        self._fmt = fmt
        self._args = args
        self.ret = ret
        self.t_ns = t_ns

    @classmethod
    def from_record(cls, record: tuple) -> "Step":
        """A Step from the flat tuple the flow records: ``(name, fmt, ret, t_ns, *args)``."""
        return cls(record[0], record[1], record[4:], record[2], record[3])

    @property
    def seed_step(self) -> int | None:
        return SEED_STEP.get(self.name)

    @property
    def ok(self) -> bool:
        return not (isinstance(self.ret, str) and self.ret.startswith("E"))

    @property
    def call(self) -> str:
        text = self._fmt.format(*self._args)
        if self.name in ("timer", "timeout"):
            return text
        ret = self.ret
        if isinstance(ret, str) and ret.startswith("E"):
            return f"{text} = -1 {ret}"
        return f"{text} = {ret}"

    def to_dict(self, t0_ns: int = 0) -> dict:
        return {"step": self.name, "seed_step": self.seed_step, "call": self.call,
                "ret": self.ret, "t_ns": self.t_ns - t0_ns}

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.call!r})"


def sockaddr_text(family: int, address: object) -> str:
    """A sockaddr as strace prints it (close enough to read side by side)."""
    if family == socket.AF_INET:
        host, port = address[:2]
        return f'{{sa_family=AF_INET, sin_port=htons({port}), sin_addr=inet_addr("{host}")}}'
    if family == socket.AF_INET6:
        host, port = address[:2]
        return f'{{sa_family=AF_INET6, sin6_port=htons({port}), inet_pton(AF_INET6, "{host}", &sin6_addr)}}'
    path = address.decode(errors="replace").replace("\x00", "@") if isinstance(address, bytes) else address
    return f'{{sa_family=AF_UNIX, sun_path="{path}"}}'


def sockaddr_len(family: int, address: object) -> int:
    if family == socket.AF_INET:
        return 16
    if family == socket.AF_INET6:
        return 28
    raw = address if isinstance(address, bytes) else address.encode()
    return 2 + len(raw) + (0 if raw.startswith(b"\x00") else 1)


@dataclass
class Result:
    """Everything one connect attempt found out.  A context manager: closes a kept socket.

    Field by field (the nginx names come from ``ngx_event_connect_peer`` and
    ``ngx_http_upstream_test_connect``; see :mod:`nbconn.errors`):

    - ``outcome``: connected, refused, timed_out, reset, unreachable or error
    - ``errno``: the errno name that decided it (None when connected)
    - ``connect_returned``: 0, or the errno name connect() failed with (EINPROGRESS...)
    - ``ngx_connect``: what ngx_event_connect_peer would return (NGX_OK, NGX_AGAIN,
      NGX_DECLINED, NGX_ERROR)
    - ``ngx_decision``: how nginx ends the attempt: NGX_OK (usable), NGX_DECLINED
      (connect() failed at once: next peer), NGX_ERROR (SO_ERROR reported a
      failure, or a step before connect() failed), TIMEDOUT (the connect timer fired)
    - ``ngx_log``: the error-log line nginx would write for a failure, else None
    - ``ngx_level``: the level of that line: "error" (the peer's fault, e.g.
      ECONNREFUSED), "crit" (an unexpected connect() errno), "alert" (a step
      before connect() failed)
    - ``handshake_ns``: from the connect() call to the decision
    - ``requested`` / ``effective``: socket options asked for, and read back
    - ``tcp_info``: rtt_us, rttvar_us, total_retrans of a connected TCP socket
    - ``events``: the epoll event mask that woke the decision, e.g. "EPOLLOUT"
    - ``sock``: the connected socket when kept, else None
    """

    target: str
    family: str
    outcome: str = "error"
    errno: str | None = None
    connect_returned: int | str | None = None
    ngx_connect: str | None = None
    ngx_decision: str | None = None
    ngx_log: str | None = None
    ngx_level: str | None = None
    handshake_ns: int | None = None
    started_ns: int = 0
    finished_ns: int = 0
    fd: int | None = None
    requested: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)
    tcp_info: dict | None = None
    events: str | None = None
    timer_fired: bool = False
    sock: socket.socket | None = field(default=None, repr=False)
    _steps: list = field(default_factory=list, repr=False)

    @property
    def steps(self) -> list[Step]:
        steps = self._steps
        for i, step in enumerate(steps):
            if type(step) is tuple:  # as the flow recorded it
                steps[i] = Step.from_record(step)
        return steps

    @property
    def connected(self) -> bool:
        return self.outcome == "connected"

    @property
    def handshake_ms(self) -> float | None:
        return None if self.handshake_ns is None else self.handshake_ns / 1e6

    @property
    def errno_number(self) -> int | None:
        from .errors import errno_number

        return None if self.errno is None else errno_number(self.errno)

    def trace(self) -> str:
        """The steps as a strace-like excerpt with times relative to socket()."""
        t0 = self.started_ns
        lines = [f"{(s.t_ns - t0) / 1e3:10.1f} µs  {s.call}" for s in self.steps]
        lines.append(f"-> {self.summary()}")
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [self.outcome]
        if self.errno:
            parts.append(self.errno)
        if self.handshake_ns is not None:
            parts.append(f"in {self.handshake_ns / 1e3:.1f} µs")
        parts.append(f"(nginx: {self.ngx_connect} -> {self.ngx_decision})")
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
            "ngx_log": self.ngx_log,
            "ngx_level": self.ngx_level,
            "handshake_ns": self.handshake_ns,
            "timer_fired": self.timer_fired,
            "events": self.events,
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


__all__ = ["Result", "Step", "errno_name", "sockaddr_text", "sockaddr_len"]
