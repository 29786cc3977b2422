"""The event loop: one epoll instance and a heap of timers, nothing about TCP.

nginx's worker runs ``ngx_process_events_and_timers`` (``src/event/ngx_event.c``)
forever: find the nearest timer in a red-black tree (``ngx_event_find_timer``),
call ``epoll_wait`` with that many milliseconds (``ngx_epoll_process_events``),
run the handlers of the descriptors that became ready, then expire the timers
whose time has come (``ngx_event_expire_timers``).

:class:`Loop` is that cycle in a few dozen lines.  A binary heap replaces the
red-black tree: both give the nearest deadline cheaply, and a heap is what
Python has (``heapq``).  nginx deletes a timer from its tree when the event
fires first (``ngx_del_timer``); a heap cannot delete from the middle, so a
cancelled timer is only marked dead and skipped when it surfaces, and the heap
is rebuilt when dead entries outnumber live ones (CPython's asyncio does the
same in ``base_events.py``).  That keeps memory flat in a long run.

The loop knows file descriptors and deadlines.  What "ready" or "expired" means
for a connect is the business of :mod:`nbconn.flow`: handlers are objects with
``on_ready(events)`` and ``on_timer()`` methods.

``select.epoll.poll`` takes seconds as a float and rounds up to whole
milliseconds, exactly the resolution nginx's timers have (``ngx_msec_t``).
"""

from __future__ import annotations

import heapq
import select
import time
from itertools import count

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLET = select.EPOLLET
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

#: What ngx_epoll_add_connection registers (src/event/modules/ngx_epoll_module.c).
NGINX_MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET

_EVENT_NAMES = (
    (select.EPOLLIN, "EPOLLIN"),
    (select.EPOLLPRI, "EPOLLPRI"),
    (select.EPOLLOUT, "EPOLLOUT"),
    (select.EPOLLERR, "EPOLLERR"),
    (select.EPOLLHUP, "EPOLLHUP"),
    (select.EPOLLRDHUP, "EPOLLRDHUP"),
    (select.EPOLLET, "EPOLLET"),
)


def event_names(mask: int) -> str:
    """``EPOLLIN|EPOLLOUT|EPOLLET`` for a mask, as strace prints it."""
    names = [name for bit, name in _EVENT_NAMES if mask & bit]
    return "|".join(names) if names else "0"


class Timer:
    """A heap entry: a deadline and what to call; ``cancel()`` marks it dead."""

    __slots__ = ("deadline_ns", "seq", "handler", "alive")

    def __init__(self, deadline_ns: int, seq: int, handler) -> None:
        self.deadline_ns = deadline_ns
        self.seq = seq
        self.handler = handler
        self.alive = True

    def __lt__(self, other: "Timer") -> bool:
        return (self.deadline_ns, self.seq) < (other.deadline_ns, other.seq)


class Loop:
    """epoll plus a timer heap.  Use as a context manager; ``close()`` closes the epoll fd."""

    def __init__(self, *, max_events: int = 512) -> None:
        # 512 is nginx's default `worker_connections`-bound event list size.
        self.epoll = select.epoll()
        self.max_events = max_events
        self._handlers: dict[int, object] = {}
        self._timers: list[Timer] = []
        self._dead_timers = 0
        self._seq = count()
        #: (timeout_ms, n_events) of the last epoll_wait, for the trace
        self.last_wait_ms = -1

    # -- descriptors ---------------------------------------------------------
    def register(self, fd: int, mask: int, handler) -> None:
        """epoll_ctl(EPOLL_CTL_ADD); raises OSError as the syscall does."""
        self.epoll.register(fd, mask)
        self._handlers[fd] = handler

    def handler_of(self, fd: int):
        """The handler registered for ``fd``, or None."""
        return self._handlers.get(fd)

    def unregister(self, fd: int) -> None:
        """epoll_ctl(EPOLL_CTL_DEL).  nginx lets close() do this; nbconn does it explicitly."""
        self._handlers.pop(fd, None)
        self.epoll.unregister(fd)

    # -- timers --------------------------------------------------------------
    def call_at(self, deadline_ns: int, handler) -> Timer:
        """Arm a timer: ``handler.on_timer()`` runs once the monotonic clock passes ``deadline_ns``."""
        timer = Timer(deadline_ns, next(self._seq), handler)
        heapq.heappush(self._timers, timer)
        return timer

    def cancel(self, timer: Timer) -> None:
        if timer.alive:
            timer.alive = False
            self._dead_timers += 1
            if self._dead_timers > 64 and self._dead_timers * 2 > len(self._timers):
                self._timers = [t for t in self._timers if t.alive]
                heapq.heapify(self._timers)
                self._dead_timers = 0

    def next_deadline_ns(self) -> int | None:
        timers = self._timers
        while timers and not timers[0].alive:
            heapq.heappop(timers)
            self._dead_timers -= 1
        return timers[0].deadline_ns if timers else None

    @property
    def pending(self) -> int:
        """Descriptors registered plus live timers: 0 means nothing can happen any more."""
        return len(self._handlers) + len(self._timers) - self._dead_timers

    # -- one turn ------------------------------------------------------------
    def run_once(self, max_wait_ns: int | None = None) -> int:
        """Wait for readiness or the nearest timer, dispatch, expire timers.

        Returns the number of handlers run.  ``max_wait_ns`` caps the wait (None:
        until the nearest timer, or forever when there is none -- callers always
        have a timer armed, so the loop never blocks without bound).
        """
        deadline = self.next_deadline_ns()
        now = time.monotonic_ns()
        if deadline is None:
            wait_ns = max_wait_ns
        else:
            wait_ns = max(0, deadline - now)
            if max_wait_ns is not None:
                wait_ns = min(wait_ns, max_wait_ns)
        timeout = -1 if wait_ns is None else wait_ns / 1e9
        self.last_wait_ms = -1 if wait_ns is None else -(-wait_ns // 1_000_000)
        events = self.epoll.poll(timeout, self.max_events)
        handlers = self._handlers
        ran = 0
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler.on_ready(mask)
                ran += 1
        return ran + self.expire_timers()

    def expire_timers(self) -> int:
        """Run every live timer whose deadline has passed (ngx_event_expire_timers)."""
        timers = self._timers
        if not timers:
            return 0
        now = time.monotonic_ns()
        ran = 0
        while timers and timers[0].deadline_ns <= now:
            timer = heapq.heappop(timers)
            if not timer.alive:
                self._dead_timers -= 1
                continue
            timer.alive = False
            timer.handler.on_timer()
            ran += 1
        return ran

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        self._handlers.clear()
        self._timers.clear()
        self._dead_timers = 0
        self.epoll.close()

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
