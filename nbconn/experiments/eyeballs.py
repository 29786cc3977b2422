"""One name, several addresses: nginx's walk from peer to peer, and RFC 8305's happy eyeballs.

A name often has several addresses (an AAAA and an A record, a pool of
servers).  Which one to connect to, and when to give up on it?

nginx answers at configuration time.  ``server backend:8080;`` in an
``upstream`` block goes through ``ngx_http_upstream_server`` ->
``ngx_parse_url`` -> ``ngx_inet_resolve_host`` (``getaddrinfo``, in the order
the resolver returns), and ``ngx_http_upstream_init_round_robin`` makes one
peer per address.  A request then connects to one peer at a time; when the
connect fails (``error``) or its timer fires (``timeout``) and
``proxy_next_upstream`` allows it, it moves on to the next peer.  A path that
silently drops SYNs therefore costs a whole ``proxy_connect_timeout`` before
the next address is even tried.  :func:`sequential` is that walk.

RFC 8305 ("Happy Eyeballs Version 2", section 5) does not wait for a failure:
start the first address; if it has not connected after the *connection attempt
delay* (250 ms recommended), start the next one *in parallel*; start the next
one at once whenever an attempt fails; the first attempt to connect wins and
every other one is cancelled.  trio's ``open_tcp_stream`` and asyncio's
``happy_eyeballs_delay=`` do this with tasks.  :func:`happy_eyeballs` does it
on nbconn's own loop, with nginx's connect for every attempt: each attempt is
an ordinary :class:`nbconn.flow.Attempt` (its own connect timer, its own
trace) registered on one :class:`nbconn.loop.Loop`; the stagger is one more
timer on the same heap.

Both return a :class:`Race`: the winner, the time to it, every attempt's
Result (losers included: a cancelled attempt ends with errno ECANCELED after
``epoll_ctl(EPOLL_CTL_DEL)`` and ``close()``), and the race's own events.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

from .. import validate
from ..flow import Attempt, plans_by_family
from ..loop import Loop
from ..result import Result
from ..settings import Settings, given
from ..strace import c_escape
from ..targets import Target, parse_target

_monotonic_ns = time.monotonic_ns

#: RFC 8305 section 8: "a Connection Attempt Delay ... default ... 250 milliseconds" (trio and asyncio use it too).
DEFAULT_DELAY = 0.25
#: Most addresses one race walks through (a DNS answer rarely holds more than a handful).
MAX_TARGETS = 64

SEQUENTIAL, HAPPY_EYEBALLS = "sequential", "happy_eyeballs"


@dataclass
class Race:
    """What connecting to one of several addresses found out.  A context manager: closes a kept socket.

    ``mode``       "sequential" (nginx's walk) or "happy_eyeballs"
    ``delay_s``    the connection attempt delay (None when sequential)
    ``winner``     the address that connected first ("HOST:PORT"), or None
    ``elapsed_ns`` from the start of the race to the winner's decision (or to the last failure)
    ``attempts``   one Result per attempt started, in the order they started
    ``started_ns`` when each attempt started, relative to the start of the race
    ``events``     ``(t_ns relative to the start, text)``: why each attempt started, the winner, each cancel
    ``sock``       the winner's connected socket when ``keep=True``
    """

    mode: str
    delay_s: float | None
    targets: list[str]
    winner: str | None = None
    elapsed_ns: int = 0
    attempts: list[Result] = field(default_factory=list)
    started_ns: list[int] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def elapsed_ms(self) -> float:
        return self.elapsed_ns / 1e6

    @property
    def connected(self) -> bool:
        return self.winner is not None

    def summary(self) -> str:
        tried = ", ".join(f"{c_escape(r.target)} {r.outcome}" + (f" ({r.errno})" if r.errno else "")
                          for r in self.attempts)
        head = f"{self.mode}: " + (f"{self.winner} won" if self.winner else "no address connected")
        return f"{head} after {self.elapsed_ms:.1f} ms; attempts: {tried}"

    def timeline(self) -> str:
        """The race's events, one per line, in ms since it started."""
        return "\n".join(f"{t / 1e6:9.3f} ms  {text}" for t, text in self.events)

    def to_dict(self) -> dict:
        """What ``python -m nbconn connect T1 T2 ... --json`` prints: winner, elapsed_ms, attempts."""
        attempts = []
        for result, started in zip(self.attempts, self.started_ns):
            entry = result.to_dict()
            entry["started_ms"] = started / 1e6
            attempts.append(entry)
        return {"winner": self.winner, "elapsed_ms": self.elapsed_ms, "mode": self.mode,
                "delay_ms": None if self.delay_s is None else self.delay_s * 1e3, "attempts": attempts}

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            for result in self.attempts:
                result.sock = None

    def __enter__(self) -> "Race":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sequential(targets, settings: Settings | None = None, **keywords) -> Race:
    """nginx's walk: connect to each address in turn, the next only after the previous failed or timed out.

    Each attempt is nginx's connect with the settings' ``timeout`` as its proxy_connect_timeout, so an
    address that drops SYNs costs the whole timeout before the next one starts.  ``settings``: a
    :class:`~nbconn.settings.Settings` or its keywords, as for :func:`nbconn.connect`.
    """
    return _race(targets, None, given(settings, keywords, "sequential"))


def happy_eyeballs(targets, settings: Settings | None = None, *, delay: float = DEFAULT_DELAY, **keywords) -> Race:
    """RFC 8305 section 5: stagger the attempts by ``delay`` seconds; the first to connect wins.

    The next address starts ``delay`` after the previous one started, or at once when an
    attempt fails, whichever comes first.  Every attempt still has its own connect timer
    (the settings' ``timeout``).  The losers are cancelled (unregistered and closed) as soon as one wins.
    ``settings``: a :class:`~nbconn.settings.Settings` or its keywords, as for :func:`nbconn.connect`;
    with ``nginx_exact=True`` every attempt makes exactly nginx's syscalls (a loser is then closed without
    EPOLL_CTL_DEL, as nginx closes).
    """
    settings = given(settings, keywords, "happy_eyeballs")
    delay = validate.number("delay", delay, 0, validate.MAX_TIMEOUT_S)
    return _race(targets, delay, settings)


def _parse_targets(targets) -> list[Target]:
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise TypeError(f"targets must be a list of targets, got {validate.shown(targets)}")
    targets = list(targets)
    validate.integer("number of targets", len(targets), 1, MAX_TARGETS)
    return [parse_target(t) for t in targets]


class _Stagger:
    """The connection attempt delay, as one timer on the loop: when it fires, start the next address."""

    __slots__ = ("fired",)

    def __init__(self) -> None:
        self.fired = False

    def on_timer(self) -> None:
        self.fired = True


def _race(targets, delay: float | None, settings: Settings) -> Race:
    # Everything is checked before any socket exists: the settings by the caller, the targets and families here.
    parsed = _parse_targets(targets)
    plans = plans_by_family(parsed, settings)

    race = Race(SEQUENTIAL if delay is None else HAPPY_EYEBALLS, delay, [c_escape(t.text) for t in parsed])
    delay_ns = None if delay is None else int(delay * 1e9)
    in_flight: list[Attempt] = []
    failed_since_last_start = [False]  # an attempt failed: the next one may start at once
    winner: list[Attempt] = []
    t0 = _monotonic_ns()

    def event(text: str) -> None:
        # escaped as strace escapes a path: an AF_UNIX target with a newline or an ESC stays on its line
        race.events.append((_monotonic_ns() - t0, c_escape(text)))

    def done(attempt: Attempt) -> None:
        # Runs inside the loop (or inside start() for an immediate answer): only bookkeeping here,
        # the driver below decides what to start or cancel, so nothing recurses.
        in_flight.remove(attempt)
        result = attempt.result
        if result.connected and not winner:
            winner.append(attempt)
            race.elapsed_ns = _monotonic_ns() - t0
            event(f"{result.target} connected: it wins")
        elif winner:
            result.close()  # a second connect in the same epoll batch: only one socket is handed out
        else:
            failed_since_last_start[0] = True
            race.elapsed_ns = _monotonic_ns() - t0
            event(f"{result.target} {result.outcome}" + (f" ({result.errno})" if result.errno else ""))

    try:
        with Loop(max_events=max(8, len(parsed)), nginx_clock=settings.nginx_exact) as loop:
            try:
                # (inside the try, and `while True:`: an interrupt at a `continue` below must reach the
                # finally on every Python, tests/test_interrupt_coverage.py says why)
                stagger, stagger_timer = None, None
                next_index = 0
                while True:
                    if winner:
                        break
                    # Start the next address: the first one at once; then when an attempt failed
                    # (sequential and happy eyeballs alike), or when the stagger timer fired.
                    start_now = next_index == 0 or failed_since_last_start[0] or (stagger is not None and stagger.fired)
                    if next_index < len(parsed) and (start_now or not in_flight):
                        reason = ("first address" if next_index == 0 else
                                  "previous attempt failed" if failed_since_last_start[0] else
                                  f"{delay_ns / 1e6:.0f} ms passed without a winner")
                        if stagger_timer is not None:
                            loop.cancel(stagger_timer)
                            stagger_timer = None
                        failed_since_last_start[0] = False
                        target = parsed[next_index]
                        attempt = Attempt(target, plans[target.family], loop, done)
                        race.attempts.append(attempt.result)
                        race.started_ns.append(_monotonic_ns() - t0)
                        event(f"start {target.text} ({reason})")
                        next_index += 1
                        in_flight.append(attempt)
                        attempt.start()
                        if delay_ns is not None and next_index < len(parsed):
                            # RFC 8305: the next attempt starts `delay` after this one did, unless
                            # an attempt fails first (then at once, see `done`).
                            stagger = _Stagger()
                            stagger_timer = loop.call_at(attempt.result.started_ns + delay_ns, stagger)
                        continue
                    if not in_flight:
                        break  # every address tried, none connected
                    # Bounded: each attempt in flight has its connect timer armed.
                    loop.run_once()
            finally:
                # The losers (and, on an interrupt, everyone): unregister and close, recorded in their traces.
                for attempt in list(in_flight):
                    if winner:
                        event(f"cancel {attempt.target.text}: {winner[0].target.text} won")
                    attempt.abort()
                in_flight.clear()
        if winner:
            race.winner = c_escape(winner[0].target.text)
            race.sock = winner[0].result.sock
    except BaseException:
        if winner:  # an interrupt after the race was won (in Loop.__exit__, say): its socket goes too
            winner[0].result.close()
        raise
    return race


# -- the lab: one name, two addresses ------------------------------------------------------------

#: The made-up name the lab answers for (RFC 6761 reserves .test: no real resolver knows it).
LAB_NAME = "upstream.nbconn.test"


class LabName:
    """One name with two addresses and one port, answered by a resolver of our own (no DNS query).

    ``targets``: the two addresses as nbconn and nginx name them, first the one whose
    SYNs vanish, then the one that accepts; ``port``; ``first_host`` ("::1" when this
    machine has IPv6 loopback -- the natural case, a broken IPv6 path -- else 127.0.0.2);
    ``name`` (:data:`LAB_NAME`); ``addrinfo()``: the answer, shaped like getaddrinfo's.
    """

    def __init__(self, first_host: str, second_host: str, port: int) -> None:
        self.first_host, self.second_host, self.port = first_host, second_host, port
        self.name = LAB_NAME
        self.targets = [_host_port(first_host, port), _host_port(second_host, port)]

    def addrinfo(self) -> list[tuple]:
        answer = []
        for host in (self.first_host, self.second_host):
            if ":" in host:
                answer.append((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, self.port, 0, 0)))
            else:
                answer.append((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, self.port)))
        return answer

    def _answer(self, host, port) -> list[tuple]:
        host = host.decode() if isinstance(host, bytes) else host
        if host != self.name or int(port) != self.port:
            raise socket.gaierror(socket.EAI_NONAME, f"the lab only answers for {self.name}:{self.port}")
        return self.addrinfo()

    async def asyncio_getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0) -> list[tuple]:
        """Stands in for ``loop.getaddrinfo`` (asyncio's open_connection resolves through it)."""
        return self._answer(host, port)

    def trio_resolver(self):
        """An object for ``trio.socket.set_custom_hostname_resolver``."""
        lab = self

        class _Resolver:
            async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
                return lab._answer(host, port)

            async def getnameinfo(self, sockaddr, flags):
                raise socket.gaierror(socket.EAI_NONAME, "the lab resolver does no reverse lookups")

        return _Resolver()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def lab_name(*, http: bool = False, tries: int = 20):
    """A :class:`LabName` whose first address black-holes SYNs and whose second accepts.

    The second address is :func:`nbconn.lab.listening` on 127.0.0.1 (``http=True``: it
    answers HTTP, for nginx).  The first is a listener on the same port at ::1 (or
    127.0.0.2) whose accept queue is full and never drained -- the kernel drops every
    SYN to it, as a path that has gone away does.  Both are loopback; everything is
    closed on exit.
    """
    from ..lab import peers

    first_host = "::1" if _ipv6_loopback_works() else "127.0.0.2"
    family = socket.AF_INET6 if first_host == "::1" else socket.AF_INET
    for _ in range(tries):
        with peers.listening("127.0.0.1", http=http) as up:
            hole = socket.socket(family, socket.SOCK_STREAM)
            try:
                try:
                    hole.bind((first_host, up.port))
                except OSError:  # that port is taken at the first address: try another one
                    continue
                hole.listen(0)  # listen(0) still queues one connection; the filler takes that place
                with _filled(hole):
                    yield LabName(first_host, "127.0.0.1", up.port)
                    return
            finally:
                hole.close()
    raise RuntimeError(f"no port free at both 127.0.0.1 and {first_host} after {tries} tries")


@contextlib.contextmanager
def _filled(listener: socket.socket):
    """One established connection sitting in ``listener``'s accept queue, so the queue is full."""
    with socket.socket(listener.family, socket.SOCK_STREAM) as filler:
        filler.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        filler.settimeout(2.0)
        filler.connect(listener.getsockname())
        yield
