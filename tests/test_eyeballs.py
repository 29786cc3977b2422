"""Happy eyeballs and nginx's sequential walk against real lab peers: who wins, who is cancelled, in what order.

Times are only compared with bounds the algorithm guarantees (an attempt cannot start before its delay or
timer has passed) or with generous ones (finished well before a multi-second timeout).
"""

import json
import signal

import pytest

from nbconn.experiments import eyeballs
from nbconn.lab import blackhole, listening, refused

from .conftest import fds_left, open_fds


def test_happy_eyeballs_starts_the_second_address_after_the_delay_and_cancels_the_first(no_fd_leak):
    with blackhole() as hole, listening() as up:
        race = eyeballs.happy_eyeballs([hole, up], delay=0.1, timeout=5.0)
    assert race.winner == str(up)
    first, second = race.attempts
    assert (first.target, first.outcome, first.errno) == (str(hole), "error", "ECANCELED")
    assert [s.name for s in first.steps][-2:] == ["unregister", "close"]  # the loser was closed, and it shows
    assert second.outcome == "connected"
    assert race.started_ns[1] - race.started_ns[0] >= 100_000_000  # not before the delay
    assert race.elapsed_ms < 4000  # long before the first attempt's 5 s timer
    assert "ms passed without a winner" in race.timeline()
    assert race.sock is None


def test_a_failed_attempt_starts_the_next_at_once(no_fd_leak):
    with refused() as down, listening() as up:
        race = eyeballs.happy_eyeballs([down, up], delay=5.0, timeout=5.0)
    assert [r.outcome for r in race.attempts] == ["refused", "connected"]
    assert race.winner == str(up)
    assert race.elapsed_ms < 4000  # did not wait for the 5 s delay
    assert "previous attempt failed" in race.timeline()


def test_sequential_waits_for_the_connect_timer_like_nginx(no_fd_leak):
    with blackhole() as hole, listening() as up:
        race = eyeballs.sequential([hole, up], timeout=0.2)
    assert race.mode == "sequential" and race.delay_s is None
    assert [r.outcome for r in race.attempts] == ["timed_out", "connected"]
    assert race.attempts[0].timer_fired
    assert race.started_ns[1] - race.started_ns[0] >= 200_000_000  # the whole proxy_connect_timeout
    assert race.winner == str(up)


def test_nobody_connects(no_fd_leak):
    with refused() as down, blackhole() as hole:
        for race in (eyeballs.sequential([down, hole, down], timeout=0.05),
                     eyeballs.happy_eyeballs([hole, down, hole], delay=0.02, timeout=0.05)):
            assert race.winner is None and not race.connected
            assert len(race.attempts) == 3
            assert {r.outcome for r in race.attempts} == {"refused", "timed_out"}
            assert race.elapsed_ns > 0


def test_delay_zero_starts_every_address_and_one_wins(no_fd_leak):
    with blackhole() as hole, listening() as up:
        race = eyeballs.happy_eyeballs([hole, hole, up, up], delay=0, timeout=5.0)
    assert race.winner == str(up)
    outcomes = [r.outcome for r in race.attempts]
    assert outcomes.count("connected") >= 1 and "timed_out" not in outcomes


def test_keep_hands_out_only_the_winners_socket(no_fd_leak):
    with blackhole() as hole, listening() as up:
        with eyeballs.happy_eyeballs([hole, up, up], delay=0.05, timeout=5.0, keep=True) as race:
            assert race.sock is not None
            assert race.sock.getpeername()[1] == up.port
            assert sum(r.sock is not None for r in race.attempts) == 1
        assert race.sock is None


@pytest.mark.skipif(not eyeballs._ipv6_loopback_works(), reason="no IPv6 loopback (::1) on this machine")
def test_two_families_like_an_aaaa_and_an_a_record(no_fd_leak):
    with blackhole("::1") as hole6, listening("127.0.0.1") as up4:
        race = eyeballs.happy_eyeballs([hole6, up4], delay=0.05, timeout=5.0)
    assert [r.family for r in race.attempts] == ["AF_INET6", "AF_INET"]
    assert race.winner == str(up4)


def test_to_dict_is_the_cli_shape():
    with refused() as down, listening() as up:
        data = json.loads(json.dumps(eyeballs.sequential([down, up], timeout=1.0).to_dict()))
    assert data["winner"] == str(up)
    assert isinstance(data["elapsed_ms"], float)
    assert [a["outcome"] for a in data["attempts"]] == ["refused", "connected"]
    assert all("steps" in a and "started_ms" in a for a in data["attempts"])


@pytest.mark.parametrize("kwargs, error", [
    (dict(targets=[], delay=0.25), ValueError),
    (dict(targets="127.0.0.1:80", delay=0.25), TypeError),
    (dict(targets=["127.0.0.1:80"] * 65, delay=0.25), ValueError),
    (dict(targets=["127.0.0.1:80", "127.0.0.1:99999"], delay=0.25), ValueError),
    (dict(targets=["127.0.0.1:80"], delay=-1), ValueError),
    (dict(targets=["127.0.0.1:80"], delay="0.25"), TypeError),
    (dict(targets=["127.0.0.1:80"], delay=float("nan")), ValueError),
    (dict(targets=["127.0.0.1:80"], delay=0.25, timeout=0), ValueError),
    (dict(targets=["127.0.0.1:80"], delay=0.25, keep=1), TypeError),
    (dict(targets=["127.0.0.1:80"], delay=0.25, rcvbuf=-5), ValueError),
])
def test_bad_input_is_refused_before_any_socket(kwargs, error):
    before = open_fds()
    with pytest.raises(error) as info:
        eyeballs.happy_eyeballs(**kwargs)
    assert str(info.value)
    assert open_fds() == before


def test_an_interrupt_closes_every_attempt():
    before = open_fds()
    previous = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with blackhole() as hole:
            signal.setitimer(signal.ITIMER_REAL, 0.15)
            with pytest.raises(KeyboardInterrupt):
                eyeballs.happy_eyeballs([hole, hole, hole], delay=0.05, timeout=5.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert open_fds() == before


def test_an_interrupt_after_the_race_was_won_closes_the_winners_socket(monkeypatch):
    """keep=True: an interrupt in Loop.__exit__, after a winner was found, closes its socket (checked while the
    traceback, and with it the race's frame, is still alive: nbconn closes it, not the garbage collector)."""
    from nbconn import loop

    real_close = loop.Loop.close

    def close_then_interrupt(self):
        real_close(self)
        raise KeyboardInterrupt

    with listening() as up:
        eyeballs.sequential([up], timeout=5.0)  # the peer's thread is up: only the race changes the table now
        before = open_fds()
        monkeypatch.setattr(loop.Loop, "close", close_then_interrupt)
        with pytest.raises(KeyboardInterrupt) as interrupt:
            eyeballs.happy_eyeballs([up, up], delay=0.05, timeout=5.0, keep=True)
        monkeypatch.undo()
        left = fds_left(before)
        assert interrupt.tb is not None
        assert not left, f"the winner's socket was left open: {sorted(left)}"


def test_a_unix_path_with_a_newline_and_an_esc_stays_on_its_line(tmp_path):
    """Issue 24, item 12, in the race's timeline and summary: paths are printed as strace prints them."""
    from nbconn.experiments import eyeballs

    race = eyeballs.sequential([f"unix:{tmp_path}/a\nb\x1b[31mc", f"unix:{tmp_path}/d"], timeout=0.5)
    text = "\n".join(race.timeline()) if isinstance(race.timeline(), list) else str(race.timeline())
    text += "\n" + str(race.summary())
    assert "\x1b" not in text and "a\\nb\\33[31mc" in text, text
    assert not any(line.startswith("b") for line in text.splitlines()), text
