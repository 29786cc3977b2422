"""The loop: epoll readiness (edge vs level, shown on real sockets) and the timer heap."""

import select
import socket
import time

import pytest

from nbconn.loop import NGINX_MASK, Loop, event_names


class Recorder:
    def __init__(self):
        self.ready, self.timers = [], 0

    def on_ready(self, events):
        self.ready.append(events)

    def on_timer(self):
        self.timers += 1


def test_edge_triggered_reports_writability_once_level_every_time():
    a, b = socket.socketpair()
    with a, b, Loop() as loop:
        edge, level = Recorder(), Recorder()
        a2 = a.dup()
        with a2:
            loop.register(a.fileno(), NGINX_MASK, edge)
            loop.register(a2.fileno(), NGINX_MASK & ~select.EPOLLET, level)
            for _ in range(3):
                loop.run_once(max_wait_ns=10_000_000)
            assert len(edge.ready) == 1 and len(level.ready) == 3
            loop.unregister(a2.fileno())
        loop.unregister(a.fileno())


def test_timers_fire_in_deadline_order_and_cancel():
    with Loop() as loop:
        now = time.monotonic_ns()
        order = []

        class T:
            def __init__(self, n):
                self.n = n

            def on_timer(self):
                order.append(self.n)

        timers = [loop.call_at(now + d * 1_000_000, T(d)) for d in (30, 10, 20, 5)]
        loop.cancel(timers[3])
        deadline = time.monotonic() + 1
        while len(order) < 3 and time.monotonic() < deadline:
            loop.run_once()
        assert order == [10, 20, 30]
        assert loop.pending == 0


def test_cancelled_timers_are_compacted():
    with Loop() as loop:
        far = time.monotonic_ns() + 10**12
        timers = [loop.call_at(far, Recorder()) for _ in range(1000)]
        for t in timers[:900]:
            loop.cancel(t)
        assert len(loop._timers) < 400 and loop.pending == 100


@pytest.mark.timing
def test_timer_fires_within_a_few_ms(late_tolerance_ms):
    with Loop() as loop:
        rec = Recorder()
        deadline = time.monotonic_ns() + 20_000_000
        loop.call_at(deadline, rec)
        while not rec.timers:
            loop.run_once()
        late_ms = (time.monotonic_ns() - deadline) / 1e6
        assert 0 <= late_ms < late_tolerance_ms(5), late_ms


def test_event_names():
    assert event_names(NGINX_MASK) == "EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET"
    assert event_names(0) == "0"


def test_cached_clock_is_read_when_epoll_wait_returns_not_at_every_call():
    """nginx's ngx_current_msec: whole ms of CLOCK_MONOTONIC, updated when epoll_wait returns."""
    with Loop() as loop:
        before = loop.cached_msec
        assert before * 1_000_000 <= time.monotonic_ns()
        time.sleep(0.01)  # time passes, but nothing reads the clock for the loop: the cached value stands still
        assert loop.cached_msec == before
        loop.run_once(max_wait_ns=0)
        assert loop.cached_msec == loop.last_wait_returned_ns // 1_000_000 and loop.cached_msec >= before + 10
