"""Hardening: long runs, exhausted resources, interrupts and hostile input -- all with real sockets.

What each test holds nbconn to, and where that comes from:

* soak -- 100,000 connects of mixed outcomes leave the descriptor table as they
  found it, and memory flat: a per-connect leak of even 50 bytes would show.
* EMFILE -- when ``socket()`` fails because the process is out of descriptors,
  nginx's ``ngx_event_connect_peer`` (src/event/ngx_event_connect.c) logs at
  ``alert`` and returns NGX_ERROR; the worker lives on.  So must connect_many:
  that attempt ends as outcome "error"/EMFILE, the others go on, later ones
  connect once descriptors are free again.  Run in a child process whose
  RLIMIT_NOFILE is lowered, so the test process itself never runs short.
* EADDRNOTAVAIL -- out of ephemeral ports, Linux fails ``connect()`` at once.
  nginx files every immediate connect() errno outside its short "the peer's
  fault" list (ECONNREFUSED, ECONNRESET, ENETDOWN, ENETUNREACH, EHOSTDOWN,
  EHOSTUNREACH, Linux EAGAIN) under ``crit`` and returns NGX_DECLINED: next
  peer.  The ports are run out for real, in a private network namespace with a
  ten-port ``net.ipv4.ip_local_port_range``.
* KeyboardInterrupt -- a real SIGINT to a child in the middle of connect_many,
  and interrupts raised from a signal handler at many points of an in-process
  run: every descriptor connect_many opened is closed; with keep=True also after
  the last attempt was decided (the kept sockets, while the traceback lives).
* hypothesis -- connect_many, connect and the CLI over generated targets,
  options and arguments: a Result (or list of them) or a ValueError/TypeError
  naming what was wrong; never a traceback, never a leaked descriptor.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import nbconn
from nbconn.lab import blackhole, listening, refused, reset

from .conftest import fds_left, open_fds, require_root, require_tool, sigint_default, wait_for, would_query_dns

ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = {"connected", "refused", "timed_out", "reset", "unreachable", "error"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm(*peers) -> None:
    """Connect to each accepting peer once and wait until its thread accepted: from then on the
    thread's own descriptors (its epoll) exist, and only connects can change the descriptor table."""
    for peer in peers:
        seen = peer.accepted
        nbconn.connect(peer, keep=False, trace=False)
        assert wait_for(lambda: peer.accepted > seen, 5), f"the {peer.scenario} peer's thread did not accept"


def _run_child(code: str, *args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


# -- soak ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_soak_100k_mixed_connects_fd_count_returns_and_rss_stays_flat():
    batches, per_batch = 10, 10_000
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(listening())
        down = stack.enter_context(refused())
        hole = stack.enter_context(blackhole())
        rst = stack.enter_context(reset())
        # 50 targets: 30 listening, 12 refused, 7 resetting, 1 black hole (2%, each waits out the timer)
        pattern = [up] * 30 + [down] * 12 + [rst] * 7 + [hole]
        random.Random(7).shuffle(pattern)
        targets = [pattern[i % len(pattern)] for i in range(per_batch)]
        _warm(up, rst)
        before = open_fds()
        totals: dict[str, int] = {}
        rss_after_first = 0
        for batch in range(batches):
            # linger=0: close() sends RST, so 100,000 connects leave no TIME_WAIT behind to eat the ports
            results = nbconn.connect_many(targets, concurrency=256, timeout=0.05, trace=False, linger=0)
            assert len(results) == per_batch
            for r in results:
                totals[r.outcome] = totals.get(r.outcome, 0) + 1
                assert r.sock is None
            by_target = {}
            for t, r in zip(targets, results):
                by_target.setdefault(t.scenario, set()).add(r.outcome)
            assert by_target["refused"] == {"refused"}, by_target
            assert by_target["blackhole"] == {"timed_out"}, by_target
            assert by_target["reset"] <= {"connected", "reset", "timed_out"}, by_target
            del results, r
            if batch == 0:
                rss_after_first = _rss_bytes()
        rss_growth = _rss_bytes() - rss_after_first
        left = fds_left(before)
    assert sum(totals.values()) == batches * per_batch
    assert set(totals) <= {"connected", "refused", "timed_out", "reset"}, totals
    assert totals["connected"] >= 0.9 * batches * per_batch * 30 / 50, totals  # the listening share, nearly all
    assert totals["refused"] == batches * per_batch * 12 / 50, totals
    assert not left, f"descriptors left open: {sorted(left)}"
    assert rss_growth < 5 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MB over {batches - 1} batches"


# -- EMFILE ----------------------------------------------------------------------------------------

EMFILE_CHILD = """
    import json, os, resource, sys
    import nbconn
    targets = json.loads(sys.argv[1])
    before = set(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(before) + 12, hard))  # room for ~10 sockets
    results = nbconn.connect_many(targets, concurrency=64, timeout=0.3, linger=0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = set(os.listdir("/proc/self/fd"))
    out = {"outcomes": [[r.outcome, r.errno] for r in results], "left_open": sorted(after - before)}
    emfile = [r for r in results if r.errno == "EMFILE"]
    if emfile:
        e = emfile[0]
        out["emfile"] = {"ngx_connect": e.ngx_connect, "ngx_decision": e.ngx_decision, "ngx_log": e.ngx_log,
                         "ngx_level": e.ngx_level, "steps": [s.call for s in e.steps], "fd": e.fd}
    print(json.dumps(out))
"""


def test_emfile_in_a_child_ends_those_attempts_as_ngx_error_and_the_loop_goes_on():
    """More connects in flight than descriptors: socket() fails with EMFILE, later connects succeed."""
    with listening() as up, blackhole() as hole:
        # black holes hold their descriptor until the 0.3 s timer: that is what runs the process out
        targets = ([up] * 9 + [hole]) * 60
        proc = _run_child(EMFILE_CHILD, json.dumps(targets), timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    outcomes = [tuple(o) for o in out["outcomes"]]
    kinds = set(outcomes)
    assert ("error", "EMFILE") in kinds and ("connected", None) in kinds and ("timed_out", "ETIMEDOUT") in kinds
    assert kinds <= {("error", "EMFILE"), ("connected", None), ("timed_out", "ETIMEDOUT")}, kinds
    first_emfile = outcomes.index(("error", "EMFILE"))
    assert ("connected", None) in outcomes[first_emfile + 1:], "nothing connected after the first EMFILE"
    e = out["emfile"]
    # ngx_event_connect_peer: socket() failed -> ngx_log_error(NGX_LOG_ALERT, ...) -> return NGX_ERROR
    assert (e["ngx_connect"], e["ngx_decision"], e["ngx_level"]) == ("NGX_ERROR", "NGX_ERROR", "alert")
    assert e["ngx_log"].startswith("socket() failed (24: Too many open files)")
    assert e["steps"] == ["socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = -1 EMFILE"] and e["fd"] is None
    assert out["left_open"] == []


# -- EADDRNOTAVAIL -----------------------------------------------------------------------------------

PORTS_CHILD = """
    import fcntl, json, socket, struct
    import nbconn

    # A fresh network namespace (unshare -n): lo is down and every sysctl is our own.
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket() as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("40000 40009")  # ten ephemeral ports
    listener = socket.socket()
    listener.bind(("127.0.0.1", 8080))  # outside the range, so it takes none of the ten
    listener.listen(128)
    # keep=True holds every connected socket: ports stay taken; linger=0 frees them at close (no TIME_WAIT)
    held = nbconn.connect_many(["127.0.0.1:8080"] * 25, concurrency=25, keep=True, linger=0, timeout=2)
    out = {"held": [[r.outcome, r.connect_returned, r.ngx_connect, r.ngx_decision, r.ngx_level, r.ngx_log]
                    for r in held]}
    for r in held:
        r.close()
    again = nbconn.connect_many(["127.0.0.1:8080"] * 5, keep=False, linger=0, timeout=2)
    out["again"] = [r.outcome for r in again]
    print(json.dumps(out))
"""


def test_ephemeral_ports_run_out_eaddrnotavail_is_ngx_declined_at_crit():
    require_root("a network namespace with its own ip_local_port_range")
    unshare = require_tool("unshare")
    proc = subprocess.run([unshare, "-n", sys.executable, "-c", textwrap.dedent(PORTS_CHILD)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    held = [tuple(h) for h in out["held"]]
    connected = [h for h in held if h[0] == "connected"]
    failed = [h for h in held if h[0] != "connected"]
    assert 1 <= len(connected) <= 10, held  # at most one connection per port of the range (10 here)
    assert failed and all(h[:5] == ("error", "EADDRNOTAVAIL", "NGX_DECLINED", "NGX_DECLINED", "crit")
                          for h in failed), failed
    assert failed[0][5] == ("connect() to 127.0.0.1:8080 failed (99: Cannot assign requested address) "
                            "while connecting to upstream")
    assert out["again"] == ["connected"] * 5  # the loop, and the ports, recovered


# -- KeyboardInterrupt ---------------------------------------------------------------------------------

SIGINT_CHILD = """
    import json, os, sys, time
    import nbconn
    from nbconn.lab import blackhole, listening

    def fds():  # (the listing's own directory descriptor shows up in it, then is gone: not ours)
        return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}

    with listening() as up, blackhole() as hole:
        nbconn.connect(up, keep=False)  # warm up: once the peer's thread accepted, its epoll exists
        deadline = time.monotonic() + 5
        while not up.accepted and time.monotonic() < deadline:
            time.sleep(0.005)
        before = fds()
        told = []

        def stop():
            if not told:
                told.append(1)
                print("running", flush=True)
            return False

        interrupted = False
        try:
            nbconn.connect_many([hole, up] * 5000, concurrency=200, timeout=5, keep=True, stop=stop)
        except KeyboardInterrupt:
            interrupted = True
        deadline = time.monotonic() + 2
        while fds() - before and time.monotonic() < deadline:  # the peer's thread closes what it accepted
            time.sleep(0.01)
        print(json.dumps({"interrupted": interrupted, "left_open": sorted(fds() - before)}), flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.2])
def test_real_sigint_to_a_child_in_connect_many_closes_every_socket(delay_s):
    with sigint_default():  # the child must take the SIGINT, also when this suite runs in the background
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SIGINT_CHILD)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"interrupted": True, "left_open": []}


def test_interrupts_at_many_points_of_connect_many_leave_no_fd():
    """KeyboardInterrupt raised by a signal handler wherever the interpreter happens to be."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    rng = random.Random(11)
    old = signal.signal(signal.SIGPROF, interrupt)
    interrupted = 0
    try:
        with listening() as up, refused() as down, blackhole() as hole:
            _warm(up)
            for _ in range(30):
                before = open_fds()
                concurrency = rng.choice([1, 16, 200])
                # (black holes only where they run in parallel: every run ends by itself within ~0.2 s)
                targets = [up, up, down, hole] * 150 if concurrency > 1 else [up, up, down] * 150
                try:
                    # ITIMER_PROF counts this process's CPU time, so the signal lands while nbconn works,
                    # between any two bytecodes of connect_many, the flow or the loop -- or not at all,
                    # if the run ends first
                    signal.setitimer(signal.ITIMER_PROF, rng.uniform(0.0002, 0.02))
                    try:
                        nbconn.connect_many(targets, concurrency=concurrency, timeout=0.02, keep=rng.random() < 0.5)
                    finally:
                        signal.setitimer(signal.ITIMER_PROF, 0)
                    time.sleep(0)  # a pending handler runs here at the latest, still inside the try
                except KeyboardInterrupt:
                    interrupted += 1
                left = fds_left(before)
                assert not left, f"left open after an interrupt: {sorted(left)}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
    assert interrupted >= 10  # most runs were cut short somewhere


@pytest.mark.parametrize("where", ["finally", "loop_exit", "fill_cancelled", "connect"])
def test_an_interrupt_after_the_run_ended_closes_the_kept_sockets(monkeypatch, where):
    """With keep=True the connected Results hold their sockets: an interrupt that lands after the last
    attempt was decided -- in the finally that aborts what is left, in Loop.__exit__, or while the
    attempts a stop() never started are filled in -- must close them, as one during the run does.
    (Where the interrupt lands is chosen by raising KeyboardInterrupt from that step, after it did its work.)"""
    from nbconn import api, loop

    def then_interrupt(step):
        def interrupted(*args, **kwargs):
            value = step(*args, **kwargs)
            if not raised:
                raised.append(step.__name__)
                raise KeyboardInterrupt
            return value
        return interrupted

    def cancelled(**fields):
        raise KeyboardInterrupt  # the first Result made for an attempt never started

    raised: list = []
    got: list = []
    stop = (lambda: len(got) >= 4) if where == "fill_cancelled" else None
    with listening() as up:
        _warm(up)
        before = open_fds()
        if where == "finally":
            monkeypatch.setattr(api, "_abort_in_flight", then_interrupt(api._abort_in_flight))
        elif where in ("loop_exit", "connect"):
            monkeypatch.setattr(loop.Loop, "close", then_interrupt(loop.Loop.close))
        else:
            monkeypatch.setattr(api, "Result", cancelled)
        # the traceback stays (a notebook keeps it in sys.last_traceback), and with it the frames' Results:
        # a socket must be closed by nbconn, not by the garbage collector
        with pytest.raises(KeyboardInterrupt) as interrupt:
            if where == "connect":
                nbconn.connect(up, keep=True, timeout=5)
            else:
                nbconn.connect_many([up] * 12, concurrency=2, keep=True, timeout=5, stop=stop,
                                    on_result=lambda i, res: got.append(res.connected))
        assert where == "fill_cancelled" or raised, "the interrupt did not come from the step it is for"
        assert where != "fill_cancelled" or (len(got) >= 4 and all(got)), got
        monkeypatch.undo()
        left = fds_left(before)
        assert interrupt.tb is not None
        assert not left, f"kept sockets left open after an interrupt in {where}: {sorted(left)}"


# -- targets that are not a list --------------------------------------------------------------------------

ENDLESS_CHILD = """
    import itertools, resource
    import nbconn
    # 512 MB more address space than the interpreter has now: listing itertools.repeat() would need far more
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.RLIM_INFINITY))
    try:
        nbconn.connect_many(itertools.repeat("127.0.0.1:1"))
    except ValueError as exc:
        print(exc)
"""


def test_an_endless_iterable_of_targets_is_refused_while_counting_not_listed():
    """connect_many(itertools.repeat(...)) was listed whole before its length was checked: MemoryError."""
    proc = _run_child(ENDLESS_CHILD, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.stdout.strip() == "targets: more than 1000000 of them, at most 1000000 per call"


class _Hostile:
    def __repr__(self):
        raise RuntimeError("no repr for you")


@pytest.mark.parametrize(("targets", "error", "words"), [
    ([_Hostile()], TypeError, "got <a _Hostile whose repr() raised RuntimeError>"),
    (_Hostile(), TypeError, "targets must be a list (or any iterable) of targets, got <a _Hostile whose repr()"),
    ("127.0.0.1:1", TypeError, "got the single target '127.0.0.1:1' (write [target])"),
    (5, TypeError, "targets must be a list (or any iterable) of targets, got 5"),
])
def test_targets_that_cannot_be_used_are_named(targets, error, words):
    before = open_fds()
    with pytest.raises(error) as info:
        nbconn.connect_many(targets)
    assert words in str(info.value)
    assert open_fds() == before


# -- hypothesis ---------------------------------------------------------------------------------------------

_LISTENER = socket.socket()
_LISTENER.bind(("127.0.0.1", 0))
_LISTENER.listen(4096)
OPEN_TARGET = f"127.0.0.1:{_LISTENER.getsockname()[1]}"




good_targets = st.sampled_from([OPEN_TARGET, "127.0.0.1:1", "[::1]:1", "unix:/nonexistent/nbconn", ("127.0.0.1", 1),
                                "localhost:1"])
target_values = st.one_of(
    st.just(OPEN_TARGET), st.just("127.0.0.1:1"), st.just("[::1]:1"), st.just("unix:/nonexistent/nbconn"),
    st.just(("127.0.0.1", 1)), st.just("localhost:1"),
    st.text(max_size=30),
    st.from_regex(r"(127\.0\.0\.1|\[::1\]|unix):[-0-9a-z/@]{0,8}", fullmatch=True),
    st.tuples(st.sampled_from(["127.0.0.1", "::1", "[::1]", "", "256.0.0.1"]),
              st.one_of(st.integers(-3, 70_000), st.text(max_size=4), st.none(), st.booleans(), st.floats())),
    st.none(), st.integers(), st.floats(), st.binary(max_size=5), st.lists(st.integers(), max_size=2),
    # folded in from the old test_bad_input_hypothesis.py, and the values issue 13 found raising the wrong error
    st.from_regex(r"127\.0\.0\.1:-?[0-9]{0,6}", fullmatch=True),
    st.from_regex(r"\[[0-9a-f:]{0,12}\]:[0-9]{0,6}", fullmatch=True),
    st.builds(lambda s: "unix:" + s, st.text(max_size=30)),
    st.builds(lambda b: b"unix:/tmp/" + b, st.binary(max_size=6)),
    st.sampled_from(["127.0.0.1:" + "9" * 5000, "unix:@", "unix:/tmp/\udcff", ("127.0.0.1", 10**5000),
                     "[::1]:" + "1" * 40]),
)
weird = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True), st.text(max_size=4),
                  st.binary(max_size=3), st.lists(st.integers(), max_size=2),
                  st.sampled_from([10**400, -10**400, 2**63, "٣"]))
option_names = ["rcvbuf", "sndbuf", "keepalive", "nodelay", "reuseaddr", "linger", "syncnt", "user_timeout",
                "bind_address_no_port", "bind", "tcp_nodelay", "Linger"]
option_values = st.one_of(weird, st.sampled_from(["127.0.0.1", "127.0.0.1:0", "[::1]:0", "::1", "1.2.3", "[::1",
                                                  "[::1]junk", "[::1]", "127.0.0.1:" + "7" * 5000]))
valid_settings = st.fixed_dictionaries({}, optional={
    "concurrency": st.integers(1, 64), "timeout": st.floats(0.01, 1.0),
    "nonblocking": st.sampled_from(["ioctl", "fcntl", "setblocking"]), "trigger": st.sampled_from(["edge", "level"]),
    "keep": st.booleans(), "trace": st.booleans(), "tcp_info": st.booleans(), "nginx_exact": st.booleans(),
})
valid_options = st.dictionaries(st.sampled_from(["rcvbuf", "sndbuf", "keepalive", "nodelay", "linger", "syncnt"]),
                                st.integers(1, 3), max_size=2)
hostile_settings = st.fixed_dictionaries({}, optional={
    "concurrency": st.one_of(st.integers(-2, 200_000), weird),
    "timeout": st.one_of(st.just(0.05), st.floats(-1, 2), st.floats(allow_nan=True, allow_infinity=True), weird),
    "nonblocking": st.one_of(st.sampled_from(["ioctl", "fcntl", "setblocking", "IOCTL", "o_nonblock"]), weird),
    "trigger": st.one_of(st.sampled_from(["edge", "level", "oneshot", ""]), weird),
    "keep": st.one_of(st.booleans(), weird),
    "trace": st.booleans(),
    "tcp_info": st.booleans(),
    "nginx_exact": st.one_of(st.booleans(), weird),
})
call_settings = st.one_of(valid_settings, hostile_settings)
call_options = st.one_of(valid_options, st.dictionaries(st.sampled_from(option_names), option_values, max_size=3))


def _mentions(message: str, values: dict) -> bool:
    """Does an error message name one of the arguments, or show one of their values?"""
    from nbconn.validate import shown

    def texts(item):
        yield shown(item)  # how nbconn.validate caps a long value
        for show in (repr, str):
            try:
                yield show(item)
            except ValueError:  # an int too long to print
                pass

    words = set()
    for name, value in values.items():
        words.add(name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            words.update(texts(item))
            if isinstance(item, tuple):
                for x in item:
                    words.update(texts(x))
    return any(w and w in message for w in words)


def _bounded(settings_: dict) -> dict:
    """Keep generated runs short: a valid timeout stays small (nothing here is a black hole anyway)."""
    t = settings_.get("timeout")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t == t and 0 < t < float("inf"):
        settings_["timeout"] = min(t, 1.0)
    return settings_


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(targets=st.one_of(st.lists(good_targets, max_size=4), st.lists(target_values, max_size=4)), call=call_settings,
       opts=call_options)
# issue 24, item 13: the bytes b"unix:" (st.binary draws it) was named as the str 'unix:' it decodes to
@example(targets=[b"unix:"], call={}, opts={})
@example(targets=[b"unix:@"], call={}, opts={})
def test_connect_many_any_input_gives_results_or_a_named_error(targets, call, opts):
    assume(not any(would_query_dns(t) for t in targets))
    call = _bounded(call)
    before = open_fds()
    try:
        results = nbconn.connect_many(targets, **call, **opts)
    except (ValueError, TypeError) as exc:
        event(f"named error: {type(exc).__name__}")
        message = str(exc)
        assert message and "\n" not in message
        assert _mentions(message, {"targets": targets, **call, **opts}), message
    else:
        event("results" if results else "results: none (no targets)")
        assert len(results) == len(targets)
        for r in results:
            assert isinstance(r, nbconn.Result) and r.outcome in OUTCOMES
            r.close()
    assert open_fds() == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.one_of(good_targets, target_values), call=call_settings, opts=call_options)
def test_connect_any_input_gives_a_result_or_a_named_error(target, call, opts):
    assume(not would_query_dns(target))
    call.pop("concurrency", None)
    call = _bounded(call)
    before = open_fds()
    try:
        with nbconn.connect(target, **call, **opts) as res:
            event(f"result: {res.outcome}")
            assert res.outcome in OUTCOMES
    except (ValueError, TypeError) as exc:
        event(f"named error: {type(exc).__name__}")
        assert str(exc) and _mentions(str(exc), {"target": target, **call, **opts}), str(exc)
    assert open_fds() == before


cli_tokens = st.one_of(
    st.sampled_from(["connect", OPEN_TARGET, "127.0.0.1:1", "unix:/nonexistent/nbconn", "[::1]:1", "--json",
                     "--timeout", "0.05", "--nonblocking", "fcntl", "--trigger", "level", "--bind", "127.0.0.1",
                     "--rcvbuf", "--sndbuf", "--linger", "--syncnt", "--user-timeout", "--keepalive", "--nodelay",
                     "--reuseaddr", "--bind-address-no-port", "0", "1", "-1", "99999999999", "x", "", "--",
                     "--timeout=nan", "--timeout=-1", "--linger=3601"]),
    st.text(max_size=6),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rest=st.lists(cli_tokens, max_size=7))
def test_cli_connect_never_tracebacks_or_leaks(rest, capsys):
    """``connect`` only: the other subcommands run measurements, nginx or write files.  No generated
    target can be a black hole (none is ever slow), and none leaves loopback: a text of at most six
    characters cannot spell another IPv4 address and port."""
    from nbconn.cli import main

    argv = ["connect", *rest]
    assume(not any(would_query_dns(a) for a in argv if ":" in a))
    assume(not any(a.startswith("-") and a.lstrip("-") in ("h", "help") for a in argv))
    before = open_fds()
    code = main(list(argv))
    out = capsys.readouterr()
    assert code in (0, 1, 2), code
    assert "Traceback" not in out.err and "Traceback" not in out.out
    if code == 2:
        assert len(out.err.strip().splitlines()) == 1, out.err
    assert open_fds() == before
