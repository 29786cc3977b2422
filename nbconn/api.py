"""The two calls most users need: :func:`connect` and :func:`connect_many`.

Both take a :class:`nbconn.settings.Settings` (or build one from their keywords) and parse every
target first, so bad input raises ValueError/TypeError naming the value before any socket exists.  Then
they drive :class:`nbconn.flow.Attempt` objects on one :class:`nbconn.loop.Loop`,
the way one nginx worker drives all its upstream connects on one epoll
instance.  Every descriptor they open is closed before they return (unless you
ask to keep connected sockets), also when interrupted.
"""

from __future__ import annotations

import itertools

from . import validate
from .flow import DONE, Attempt, make_plan, plans_by_family
from .loop import Loop
from .result import Result
from .settings import Settings, given
from .targets import Target, parse_target

MAX_CONCURRENCY = validate.MAX_CONCURRENCY

# Why connect_many starts at most this many attempts per loop turn: starting 200
# attempts back to back takes ~15 ms of Python, and that would delay the handling
# of handshakes that already completed and of timers that are due -- both land
# directly on the handshake times nbconn reports and on how late a timer fires.
#
# The cyclic garbage collector is left alone: pausing or freezing it would touch the caller's objects
# too (gc.freeze moves every young object of the process, its garbage included), and measured with
# cachegrind, pausing it during a run saves only ~2% of the CPU instructions per connect.
_START_BATCH = 16


def connect(target, settings: Settings | None = None, **keywords) -> Result:
    """Connect once, nginx's way, and return the :class:`~nbconn.result.Result`.

    ``target``: "HOST:PORT", "[V6ADDR]:PORT", "unix:/path" or (host, port).
    ``settings``: a :class:`~nbconn.settings.Settings`, or its keywords here instead (not both):
    ``timeout`` (5 s: proxy_connect_timeout), ``nonblocking`` ("ioctl", nginx's FIONBIO), ``trigger``
    ("edge", nginx's EPOLLET), ``keep`` (keep a connected socket in ``result.sock``; off by default: a
    notebook's ``Out[]`` history holds every Result, and with it every kept descriptor), ``trace``,
    ``tcp_info``, ``nginx_exact`` (exactly nginx's syscalls, see :mod:`nbconn.flow`), the socket options
    of :data:`nbconn.options.OPTIONS` (rcvbuf=, keepalive=, ...) and ``bind="HOST[:PORT]"``.
    """
    settings = given(settings, keywords, "connect")
    tgt = parse_target(target)
    plan = make_plan(tgt.family, settings)
    attempt = None
    try:
        with Loop(max_events=8, nginx_clock=settings.nginx_exact) as loop:
            attempt = Attempt(tgt, plan, loop)
            try:
                attempt.start()
                _run_until_done(attempt, loop)
            finally:
                attempt.abort()
    except BaseException:
        if attempt is not None:
            _completely(attempt.result.close)  # an interrupt after the connect was decided: no kept socket escapes
        raise
    return attempt.result


def _run_until_done(attempt: Attempt, loop: Loop) -> None:
    # Bounded: the connect timer is armed whenever the attempt is pending.  (Every loop that runs
    # while something must be closed on an interrupt lives in a function called inside the try:
    # tests/test_interrupt_coverage.py says why.)
    while attempt.state is not DONE:
        loop.run_once()


def connect_many(targets, settings: Settings | None = None, *, concurrency: int = 64, on_result=None, stop=None,
                 **keywords) -> list[Result]:
    """Connect to every target with at most ``concurrency`` handshakes in flight on one epoll loop.

    ``settings``: as for :func:`connect` (a Settings, or its keywords).  Returns one Result per target, in
    target order.  Sockets are closed unless ``keep=True`` (then connected Results hold theirs).
    ``on_result(i, result)`` is called as each attempt is decided (progress bars use it).  ``stop`` is
    an optional callable; when it returns True no new attempt starts and the
    ones in flight are aborted (a Stop button uses it); their Results and those
    never started have outcome "error" and errno "ECANCELED".
    """
    settings = given(settings, keywords, "connect_many")
    validate.integer("concurrency", concurrency, 1, MAX_CONCURRENCY)
    if on_result is not None and not callable(on_result):
        raise TypeError(f"on_result must be callable, got {validate.shown(on_result)}")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be callable, got {validate.shown(stop)}")
    parsed = _parse_all(_take(targets))
    plans = plans_by_family(parsed, settings)

    results: list[Result | None] = [None] * len(parsed)
    in_flight: dict[int, Attempt] = {}

    def done(attempt: Attempt) -> None:
        index = attempt.index
        results[index] = attempt.result  # first: an interrupt in between must not lose a kept socket
        del in_flight[index]
        if on_result is not None:
            on_result(index, attempt.result)

    try:
        with Loop(nginx_clock=settings.nginx_exact) as loop:
            try:
                _run_all(parsed, plans, loop, in_flight, done, concurrency, stop)
            finally:
                _abort_in_flight(in_flight, results)
        _fill_cancelled(results, parsed)
    except BaseException:
        # wherever the interrupt landed, also after the last attempt was decided, in Loop.__exit__ or
        # while the never started ones are filled in: no socket outlives the call
        _abort_in_flight(in_flight, results)
        _close_kept(results)
        raise
    return results  # type: ignore[return-value]


def _run_all(parsed: list, plans: dict, loop: Loop, in_flight: dict, done, concurrency: int, stop) -> None:
    """Start every attempt, at most ``concurrency`` in flight, and run the loop until all are decided.

    Its own function, called inside connect_many's try: see tests/test_interrupt_coverage.py for why."""
    n = len(parsed)
    # Every pending attempt has a timer, so waiting always ends within `timeout`; with a
    # stop callable, wake at least every 100 ms to ask it.
    max_wait_ns = 100_000_000 if stop is not None else None
    next_index = 0
    while next_index < n or in_flight:
        if stop is not None and stop():
            break
        started = 0
        while next_index < n and len(in_flight) < concurrency and started < _START_BATCH:
            target = parsed[next_index]
            attempt = _IndexedAttempt(target, plans[target.family], loop, done)
            attempt.index = next_index
            in_flight[next_index] = attempt
            next_index += 1
            started += 1
            attempt.start()
        if in_flight:
            # While more attempts wait to start, only look at what is ready (no sleep).
            more = next_index < n and len(in_flight) < concurrency
            loop.run_once(0 if more else max_wait_ns)


def _fill_cancelled(results: list, parsed: list) -> None:
    """The attempts a stop() never started: outcome "error", errno "ECANCELED"."""
    for i, res in enumerate(results):
        if res is None:
            results[i] = Result(target=parsed[i].text, family=parsed[i].family_name, errno="ECANCELED")


class _IndexedAttempt(Attempt):
    __slots__ = ("index",)


def _take(targets) -> list:
    """The targets as a list, counted while they are taken: an endless iterable (itertools.repeat) is refused
    after MAX_COUNT + 1 items, not listed until memory runs out."""
    if isinstance(targets, (str, bytes, Target)):
        # one target where a list of them belongs: each of its characters would be refused as a target
        raise TypeError(f"targets must be a list of targets, got the single target {validate.shown(targets)} "
                        "(write [target])")
    try:
        items = iter(targets)
    except TypeError:
        raise TypeError(f"targets must be a list (or any iterable) of targets, got {validate.shown(targets)}") from None
    taken = list(itertools.islice(items, validate.MAX_COUNT + 1))
    if len(taken) > validate.MAX_COUNT:
        raise ValueError(f"targets: more than {validate.MAX_COUNT} of them, at most {validate.MAX_COUNT} per call")
    return taken


def _parse_all(targets: list) -> list[Target]:
    """Parse every target once (resolving a name once, however often it repeats)."""
    cache: dict = {}
    parsed = []
    for target in targets:
        key = target if isinstance(target, (str, tuple)) else id(target)
        try:
            tgt = cache.get(key)
        except TypeError:  # an unhashable tuple inside a tuple: let parse_target name it
            tgt = None
        if tgt is None:
            tgt = parse_target(target)
            try:
                cache[key] = tgt
            except TypeError:
                pass
        parsed.append(tgt)
    return parsed


def _abort_in_flight(in_flight: dict, results: list) -> None:
    """Abort every attempt still in flight; its Result takes its place in ``results``.  Idempotent."""
    _completely(_abort_each, in_flight, results)


def _abort_each(in_flight: dict, results: list) -> None:
    for attempt in list(in_flight.values()):
        attempt.abort()
        results[attempt.index] = attempt.result


def _close_kept(results: list) -> None:
    """Close the socket every Result holds.  Idempotent."""
    _completely(_close_each, results)


def _close_each(results: list) -> None:
    for res in results:
        if res is not None:
            res.close()


def _completely(step, *args) -> None:
    """Run ``step`` until one pass ends without an exception, then raise the first one.

    A Ctrl-C arriving in a pass must not leave the remaining sockets open: the pass
    starts over (closing what is already closed does nothing), then the first
    KeyboardInterrupt is raised.  The pass is a function of its own, so that an
    interrupt at the bottom of its loop reaches the except below on every Python.
    """
    error = None
    while True:
        try:
            step(*args)
            break
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
