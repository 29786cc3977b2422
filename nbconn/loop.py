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

A timer is a plain list, ``[deadline_ns, seq, handler]``: its own heap entry
and its own handle.  ``heapq`` compares lists in C, deadline first, and the
sequence number breaks ties, so handlers are never compared; ``cancel()``
sets the handler to None, which both marks the timer dead and lets go of the
handler at once.  (A Timer class with a Python ``__lt__`` cost a few hundred
nanoseconds per connect, and the connect timer is armed on every connect.)

The loop knows file descriptors and deadlines.  What "ready" or "expired" means
for a connect is the business of :mod:`nbconn.flow`: handlers are objects with
``on_ready(events)`` and ``on_timer()`` methods.

nginx reads the clock once per turn, when epoll_wait returns (``ngx_current_msec``,
whole ms): timers are armed from it, epoll_wait's timeout is the nearest key minus it,
and a timer expires when its key is not after it.  :attr:`Loop.cached_msec` is that
clock; ``Loop(nginx_clock=True)`` (nginx-exact mode) reckons waits and expiry from
it, the default loop from a fresh clock read.

``select.epoll.poll`` takes seconds as a float and rounds up to whole
milliseconds, exactly the resolution nginx's timers have (``ngx_msec_t``).
"""

from __future__ import annotations

import heapq
import select
import time
from itertools import count

_monotonic_ns = time.monotonic_ns

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


_EVENT_TEXT: dict[int, str] = {}  # mask -> text; only a handful of masks ever occur


def event_names(mask: int) -> str:
    """``EPOLLIN|EPOLLOUT|EPOLLET`` for a mask, as strace prints it."""
    text = _EVENT_TEXT.get(mask)
    if text is None:
        names = [name for bit, name in _EVENT_NAMES if mask & bit]
        text = "|".join(names) if names else "0"
        if len(_EVENT_TEXT) < 4096:
            _EVENT_TEXT[mask] = text
    return text


#: What :meth:`Loop.call_at` returns: ``[deadline_ns, seq, handler]``, handler None once dead.
Timer = list


class Loop:
    """epoll plus a timer heap.  Use as a context manager; ``close()`` closes the epoll fd."""

    def __init__(self, *, max_events: int = 512, nginx_clock: bool = False) -> None:
        # 512: nginx's default event list, `epoll_events 512` (ngx_epoll_init_conf, ngx_epoll_module.c);
        # connect_many (and the panel, through it) keeps it, nbconn.connect asks for 8 (one socket).
        self.epoll = select.epoll()
        #: Keep nginx's clock (nginx-exact mode): epoll_wait's timeout and the expiry of timers are reckoned
        #: from the cached clock below, as ngx_event_find_timer and ngx_event_expire_timers reckon them from
        #: ngx_current_msec (src/event/ngx_event_timer.c).  Otherwise from a fresh clock read.
        self.nginx_clock = nginx_clock
        self.epoll_fd = self.epoll.fileno()
        self.max_events = max_events
        self._handlers: dict[int, object] = {}
        self._timers: list[Timer] = []  # a heap of [deadline_ns, seq, handler]
        self._dead_timers = 0
        self._seq = count()
        #: the timeout (ms) of the last epoll_wait, when it was called and when it returned, for the trace
        self.last_wait_ms = -1
        self.last_wait_started_ns = 0
        self.last_wait_returned_ns = 0
        #: nginx's ngx_current_msec: CLOCK_MONOTONIC in whole ms, read when the loop starts and each time
        #: epoll_wait returns (ngx_epoll_process_events -> ngx_time_update), not at every call.  nginx arms
        #: its timers and takes u->start_time from it (nginx-exact mode does too, see nbconn.flow).
        self.cached_msec = _monotonic_ns() // 1_000_000

    # -- descriptors ---------------------------------------------------------
    def register(self, fd: int, mask: int, handler) -> None:
        """epoll_ctl(EPOLL_CTL_ADD); raises OSError as the syscall does."""
        self.epoll.register(fd, mask)
        self._handlers[fd] = handler

    def handler_of(self, fd: int):
        """The handler registered for ``fd``, or None."""
        return self._handlers.get(fd)

    def hand_over(self, fd: int, handler) -> None:
        """Give a registered descriptor a new handler, with no syscall: nginx changes ``c->read->handler``
        and ``c->write->handler`` (e.g. to ngx_ssl_handshake_handler) and keeps the epoll registration made
        before connect().  KeyError if ``fd`` is not registered here."""
        if fd not in self._handlers:
            raise KeyError(f"descriptor {fd} is not registered with this loop")
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Drop the handler only: the caller closes the descriptor, and close() takes it out of the epoll set
        (nginx's way: ngx_close_connection never calls EPOLL_CTL_DEL for a socket it closes)."""
        self._handlers.pop(fd, None)

    def unregister(self, fd: int) -> None:
        """epoll_ctl(EPOLL_CTL_DEL).  nginx lets close() do this; nbconn does it explicitly."""
        self._handlers.pop(fd, None)
        self.epoll.unregister(fd)

    # -- timers --------------------------------------------------------------
    def call_at(self, deadline_ns: int, handler) -> Timer:
        """Arm a timer: ``handler.on_timer()`` runs once the monotonic clock passes ``deadline_ns``."""
        timer = [deadline_ns, next(self._seq), handler]
        heapq.heappush(self._timers, timer)
        return timer

    def cancel(self, timer: Timer) -> None:
        """ngx_del_timer.  Unless it is the nearest one, the timer stays in the heap, dead, until it
        surfaces or the heap is rebuilt."""
        if timer[2] is not None:
            timer[2] = None
            timers = self._timers
            if timers and timers[0] is timer:  # the nearest one (always, with one connect at a time): just drop it
                heapq.heappop(timers)
                return
            self._dead_timers += 1
            if self._dead_timers > 64 and self._dead_timers * 2 > len(timers):
                self._timers = [t for t in self._timers if t[2] is not None]
                heapq.heapify(self._timers)
                self._dead_timers = 0

    def next_deadline_ns(self) -> int | None:
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
            self._dead_timers -= 1
        return timers[0][0] if timers else None

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
        timers = self._timers
        # the nearest deadline: the heap's top, unless it is dead (next_deadline_ns skips those)
        deadline = timers[0][0] if timers and timers[0][2] is not None else self.next_deadline_ns()
        now = self.last_wait_started_ns = _monotonic_ns()
        if self.nginx_clock:
            # nginx: timer = key - ngx_current_msec, from the clock cached when epoll_wait last returned, so
            # an idle worker waits the timer's whole length again from this call (strace: epoll_wait(.., 200))
            now = self.cached_msec * 1_000_000
        if deadline is None:
            wait_ns = max_wait_ns
        else:
            wait_ns = deadline - now
            if wait_ns < 0:
                wait_ns = 0
            if max_wait_ns is not None and max_wait_ns < wait_ns:
                wait_ns = max_wait_ns
        if wait_ns is None:
            timeout = self.last_wait_ms = -1
        else:
            timeout = wait_ns / 1e9
            self.last_wait_ms = -(-wait_ns // 1_000_000)
        events = self.epoll.poll(timeout, self.max_events)
        returned = self.last_wait_returned_ns = _monotonic_ns()
        self.cached_msec = returned // 1_000_000
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
        now = self.cached_msec * 1_000_000 if self.nginx_clock else _monotonic_ns()
        ran = 0
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)
            handler = timer[2]
            if handler is None:
                self._dead_timers -= 1
                continue
            timer[2] = None
            handler.on_timer()
            ran += 1
        return ran

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        try:
            self.epoll.close()  # first, so that an interrupt in here cannot leave it open
        finally:
            self._handlers.clear()
            self._timers.clear()
            self._dead_timers = 0

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
