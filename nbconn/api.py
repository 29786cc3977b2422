"""The two calls most users need: :func:`connect` and :func:`connect_many`.

Both validate everything first -- targets, timeout, options -- so bad input
raises ValueError/TypeError naming the value before any socket exists.  Then
they drive :class:`nbconn.flow.Attempt` objects on one :class:`nbconn.loop.Loop`,
the way one nginx worker drives all its upstream connects on one epoll
instance.  Every descriptor they open is closed before they return (unless you
ask to keep connected sockets), also when interrupted.
"""

from __future__ import annotations

import gc

from .flow import Attempt, Plan, check_settings, make_plan
from .loop import Loop
from .result import Result
from .targets import Target, parse_target

MAX_CONCURRENCY = 100_000

# Why connect_many starts at most this many attempts per loop turn, and pauses the
# cyclic garbage collector while it runs: both would otherwise delay the handling of
# handshakes that already completed and of timers that are due.  Starting 200
# attempts back to back takes ~15 ms of Python; a full GC pass over tens of
# thousands of recorded Steps takes tens of ms.  Either lands directly on the
# handshake times nbconn reports and on how late a connect timer fires.
_START_BATCH = 16


def connect(target, *, timeout: float = 5.0, nonblocking: str = "ioctl", trigger: str = "edge",
            keep: bool = True, trace: bool = True, tcp_info: bool = True, **options) -> Result:
    """Connect once, nginx's way, and return the :class:`~nbconn.result.Result`.

    ``target``: "HOST:PORT", "[V6ADDR]:PORT", "unix:/path" or (host, port).
    ``timeout``: the connect timer in seconds (nginx: proxy_connect_timeout).
    ``nonblocking``: "ioctl" (FIONBIO, nginx's way), "fcntl" (O_NONBLOCK) or "setblocking".
    ``trigger``: "edge" (EPOLLET, nginx's way) or "level".
    ``keep``: keep a connected socket in ``result.sock`` (use the Result as a
    context manager, or call ``result.close()``).
    ``**options``: socket options, see :data:`nbconn.options.OPTIONS` (rcvbuf=,
    sndbuf=, keepalive=, nodelay=, reuseaddr=, linger=, syncnt=, user_timeout=,
    bind_address_no_port=) and ``bind="HOST[:PORT]"``.
    """
    check_settings(timeout=timeout, nonblocking=nonblocking, trigger=trigger, options=options)
    tgt = parse_target(target)
    plan = make_plan(tgt.family, timeout=timeout, nonblocking=nonblocking, trigger=trigger, keep=keep,
                     trace=trace, tcp_info=tcp_info, options=options)
    with Loop(max_events=8) as loop:
        attempt = Attempt(tgt, plan, loop)
        try:
            attempt.start()
            # Bounded: the connect timer is armed whenever the attempt is pending.
            while attempt.state != "DONE":
                loop.run_once()
        finally:
            attempt.abort()
    return attempt.result


def connect_many(targets, *, concurrency: int = 64, timeout: float = 5.0, nonblocking: str = "ioctl",
                 trigger: str = "edge", keep: bool = False, trace: bool = True, tcp_info: bool = True,
                 on_result=None, stop=None, **options) -> list[Result]:
    """Connect to every target with at most ``concurrency`` handshakes in flight on one epoll loop.

    Returns one Result per target, in target order.  Sockets are closed unless
    ``keep=True`` (then connected Results hold theirs).  ``on_result(i, result)``
    is called as each attempt is decided (progress bars use it).  ``stop`` is
    an optional callable; when it returns True no new attempt starts and the
    ones in flight are aborted (a Stop button uses it); their Results and those
    never started have outcome "error" and errno "ECANCELED".
    """
    targets = list(targets)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise TypeError(f"concurrency must be an int, got {concurrency!r}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency={concurrency} is outside 1..{MAX_CONCURRENCY}")
    check_settings(timeout=timeout, nonblocking=nonblocking, trigger=trigger, options=options)
    parsed = _parse_all(targets)
    plans: dict[int, Plan] = {}
    for tgt in parsed:
        if tgt.family not in plans:
            plans[tgt.family] = make_plan(tgt.family, timeout=timeout, nonblocking=nonblocking, trigger=trigger,
                                          keep=keep, trace=trace, tcp_info=tcp_info, options=options)

    n = len(parsed)
    results: list[Result | None] = [None] * n
    in_flight: dict[int, Attempt] = {}

    def done(attempt: Attempt) -> None:
        index = attempt.index
        del in_flight[index]
        results[index] = attempt.result
        if on_result is not None:
            on_result(index, attempt.result)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # see _START_BATCH: a full collection would walk every Step kept so far
    with Loop() as loop:
        next_index = 0
        try:
            while next_index < n or in_flight:
                if stop is not None and stop():
                    break
                started = 0
                while next_index < n and len(in_flight) < concurrency and started < _START_BATCH:
                    attempt = _IndexedAttempt(parsed[next_index], plans[parsed[next_index].family], loop, done)
                    attempt.index = next_index
                    in_flight[next_index] = attempt
                    next_index += 1
                    started += 1
                    attempt.start()
                if in_flight:
                    # Every pending attempt has a timer, so this always returns within `timeout`.
                    # While more attempts wait to start, only look at what is ready (no sleep).
                    more = next_index < n and len(in_flight) < concurrency
                    loop.run_once(max_wait_ns=0 if more else (100_000_000 if stop is not None else None))
        except BaseException:
            _close_kept(results)
            raise
        finally:
            for attempt in list(in_flight.values()):
                attempt.abort()
                results[attempt.index] = attempt.result
            if gc_was_enabled:
                gc.enable()
    for i, res in enumerate(results):
        if res is None:
            results[i] = Result(target=parsed[i].text, family=parsed[i].family_name, errno="ECANCELED")
    return results  # type: ignore[return-value]


class _IndexedAttempt(Attempt):
    __slots__ = ("index",)


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


def _close_kept(results: list) -> None:
    for res in results:
        if res is not None:
            res.close()
