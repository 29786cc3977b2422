"""A real nginx (Debian's package) next to nbconn.nginx.upstream on the same lab peers: same peers tried, same
classification, same syscalls.  Skips with one line where nginx is missing (CI installs it and fails instead)."""

import contextlib
import re
import time

import pytest

from nbconn import lab
from nbconn.nginx import runner
from nbconn.nginx.upstream import Upstream, run_request, run_requests

from .conftest import require_tool, wait_for


@pytest.fixture(autouse=True)
def _need_nginx():
    if runner.unavailable_reason():
        require_tool("nginx")


def wait_for_access_log(ng, requests: int) -> None:
    """nginx writes a request's access-log line in its log phase, after the response went out, and a request's
    error lines before it: once all ``requests`` lines are there, both logs are complete (an event, not a sleep)."""
    assert wait_for(lambda: len(ng.access_log()) >= requests, 10), (requests, ng.access_log())


def side_by_side(peers, requests, *, connect_timeout=0.2, **kw):
    with runner.Nginx(peers, connect_timeout=connect_timeout, **kw) as ng:
        statuses = [ng.request() for _ in range(requests)]
        wait_for_access_log(ng, requests)
        access, errors = ng.access_log(), ng.error_log()
    ours = run_requests(Upstream(peers), requests, timeout=connect_timeout)
    return statuses, access, errors, ours


@contextlib.contextmanager
def peers(*kinds):
    makers = {"up": lambda: lab.listening(http=True), "refused": lab.refused, "hole": lab.blackhole}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(makers[k]()) for k in kinds]


def assert_same(access, ours):
    rows = runner.compare_sequences(access, ours)
    assert len(rows) == len(ours)
    for row in rows:
        assert row["same"], row


def test_version_is_none_where_there_is_no_nginx(monkeypatch):
    """Notebook 01 prints nginx.version() or a sentence: with no binary found it is None, not a TypeError."""
    monkeypatch.setattr(runner, "find_nginx", lambda: None)
    assert runner.version() is None


def test_refused_first():
    with peers("refused", "up") as (down, up):
        statuses, access, errors, ours = side_by_side([str(down), str(up)], 3)
    assert statuses == ["200"] * 3
    assert_same(access, ours)
    refused = [e for e in errors if e.upstream == down and e.level == "error"]
    assert refused[0].message == "connect() failed (111: Connection refused) while connecting to upstream"
    assert refused[0].message == ours[0].attempts[0].nginx_log  # nbconn's classification matches nginx's line
    assert any(e.message.startswith("upstream server temporarily disabled") for e in errors)


def test_black_hole_first():
    with peers("hole", "up") as (hole, up):
        statuses, access, errors, ours = side_by_side([str(hole), str(up)], 2)
    assert_same(access, ours)
    assert access[0].connect_time[0] is None and ours[0].attempts[0].outcome == "timed_out"
    timed = [e for e in errors if e.upstream == hole and e.level == "error"]
    assert timed[0].message == ours[0].attempts[0].nginx_log == \
        "upstream timed out (110: Connection timed out) while connecting to upstream"


def test_weighted_peers_with_one_failing():
    with peers("up", "up", "refused") as (a, b, down):
        specs = [f"{a},weight=3", f"{b}", f"{down},weight=2"]
        statuses, access, errors, ours = side_by_side(specs, 8)
    assert statuses == ["200"] * 8
    assert_same(access, ours)


def test_all_down_no_live_upstreams():
    with peers("refused", "refused") as (d1, d2):
        statuses, access, errors, ours = side_by_side([str(d1), str(d2)], 2)
    assert statuses == ["502", "502"]
    assert access[1].upstream_addr == ["backend"]
    assert any(e.message.startswith("no live upstreams") for e in errors)
    assert ours[1].log == ["[error] no live upstreams while connecting to upstream"]
    assert_same(access, ours)


def _nbconn_strace(target, timeout):
    import subprocess
    import sys

    strace = require_tool("strace")
    proc = subprocess.run([strace, "-f", "-qq", "-e", "trace=socket,ioctl,epoll_ctl,connect,epoll_wait,getsockopt,close",
                           sys.executable, "-m", "nbconn", "connect", target, "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=60)
    lines = [re.sub(r"\s+= ", " = ", re.sub(r"^\[pid\s+\d+\] ", "", line)) for line in proc.stderr.splitlines()]
    start = max(i for i, line in enumerate(lines) if re.match(r"socket\(AF_INET, SOCK_STREAM", line))
    fd = re.search(r"= (\d+)$", lines[start]).group(1)
    out = [lines[start]]
    for line in lines[start + 1:]:
        if line.startswith("epoll_wait(") or re.match(rf"\w+\({fd}[,)]", line) or re.match(
                rf"epoll_ctl\(\d+, EPOLL_CTL_ADD, {fd},", line):
            out.append(line)
    return out


def _shape(lines):
    """The syscall order as names (getsockopt(SO_ERROR) kept apart; epoll_wait runs collapsed)."""
    names = []
    for line in lines:
        name = line.split("(")[0]
        if name == "getsockopt" and "SO_ERROR" not in line:
            continue
        if name == "getsockopt":
            name = "getsockopt(SO_ERROR)"
        if name == "connect":
            name += " EINPROGRESS" if "EINPROGRESS" in line else ""
        if not names or names[-1] != name:
            names.append(name)
    return names


@pytest.mark.parametrize("kind, expected", [
    ("up", ["socket", "ioctl", "epoll_ctl", "connect EINPROGRESS", "epoll_wait", "getsockopt(SO_ERROR)"]),
    ("hole", ["socket", "ioctl", "epoll_ctl", "connect EINPROGRESS", "epoll_wait", "close"]),
])
def test_strace_same_syscall_order_as_nginx(kind, expected):
    require_tool("strace")
    with peers(kind) as (peer,):
        with runner.Nginx([str(peer)], connect_timeout=0.2, strace=True) as ng:
            ng.request()

            def theirs_so_far():  # strace writes a call when it returns: wait for the lines, not a while
                return runner.upstream_connect_syscalls(ng.strace_lines(), peer.port)

            wait_for(lambda: len(_shape(theirs_so_far())) >= len(expected), 10)
            theirs = theirs_so_far()
        ours = _nbconn_strace(str(peer), 0.2)
    assert "EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET" in theirs[2] and "EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET" in ours[2]
    assert _shape(theirs)[:len(expected)] == expected, theirs
    assert _shape(ours)[:len(expected)] == expected, ours
    if kind == "hole":  # the timer: epoll_wait given proxy_connect_timeout, then close without SO_ERROR
        timer_expired = re.compile(r", (19\d|200)\) = 0$")  # waited the timer's remaining ms, nothing ready
        assert any(timer_expired.search(line) for line in theirs), theirs
        assert any(timer_expired.search(line) for line in ours), ours


def test_nginx_cleans_up_and_bad_settings_named():
    with pytest.raises(ValueError, match="connect_timeout=0"):
        runner.Nginx(["127.0.0.1:1"], connect_timeout=0)
    with pytest.raises(ValueError, match="'http_501'"):  # not a kind nginx 1.22.1 knows
        runner.Nginx(["127.0.0.1:1"], next_upstream=("http_501",))
    with peers("up") as (up,):
        ng = runner.Nginx([str(up)])
        with ng:
            prefix, proc = ng.prefix, ng.proc
            assert ng.request() == "200"
        assert proc.poll() is not None
    import os

    assert not os.path.exists(prefix)


# -- parity details (issue 10 item 11), each checked against the real nginx -----------------------------

def _nginx_lines(errors):
    """nginx's error log as the model writes it: "[level] message" for error and warn lines."""
    return [f"[{e.level}] {e.message}" for e in errors if e.level in ("error", "warn")]


def test_timeout_that_disables_logs_warn_first_like_nginx():
    with peers("hole", "up") as (hole, up):
        statuses, access, errors, ours = side_by_side([str(hole), str(up)], 1)
    theirs = _nginx_lines(errors)
    assert theirs == [
        "[warn] upstream server temporarily disabled while connecting to upstream",
        "[error] upstream timed out (110: Connection timed out) while connecting to upstream"], theirs
    assert ours[0].log == theirs


def test_refused_that_disables_logs_error_first_like_nginx():
    with peers("refused", "up") as (down, up):
        statuses, access, errors, ours = side_by_side([str(down), str(up)], 1)
    assert _nginx_lines(errors) == ours[0].log == [
        "[error] connect() failed (111: Connection refused) while connecting to upstream",
        "[warn] upstream server temporarily disabled while connecting to upstream"]


def test_accept_then_reset_fails_in_both_with_a_line_nginx_writes():
    """nginx sends the request and reads the header before it decides; so does the model with http=True.
    Whether the RST beats the SO_ERROR check is a race in both, so the lines are compared as sets."""
    n = 12
    with peers("up") as (up,), lab.reset() as rst:
        specs = [str(rst)]
        with runner.Nginx(specs, connect_timeout=0.5) as ng:
            statuses = [ng.request() for _ in range(n)]
            wait_for_access_log(ng, n)
            theirs = {line for line in _nginx_lines(ng.error_log())}
        ours = run_requests(Upstream(specs), n, timeout=0.5, http=True)
    assert statuses == ["502"] * n and [r.result for r in ours] == ["502"] * n
    possible = {"[error] connect() failed (104: Connection reset by peer) while connecting to upstream",
                "[error] recv() failed (104: Connection reset by peer) while reading response header from upstream",
                "[error] writev() failed (104: Connection reset by peer) while sending request to upstream",
                "[error] writev() failed (32: Broken pipe) while sending request to upstream"}
    mine = {line for r in ours for line in r.log}
    assert theirs <= possible and mine <= possible, (theirs, mine)


def _at_fraction(fraction: float) -> None:
    """Sleep until the wall clock's fractional second is ``fraction`` (bounded: at most one second)."""
    now = time.time()
    time.sleep((fraction - now % 1) % 1)


def test_fail_timeout_on_ngx_time_agrees_on_one_real_time_schedule():
    """Both on ngx_time() (whole wall-clock seconds).  Two refused peers, fail_timeout=1s, both fail at wall
    second S + a.  At S+1+p both are still out (1 is not > 1): "no live upstreams"; at S+2+p they get their
    chance again (2 > 1).  A model on int(time.monotonic()) -- the old clock -- runs beside it: when the two
    clocks' fractional seconds are far enough apart, a and p are chosen so that it still counts one second
    at the last probe and keeps the peers out, where nginx tries them."""
    offset = (time.time() - time.monotonic()) % 1
    discriminating = 0.2 <= offset <= 0.8  # 0.1 s or more from every second boundary of both clocks
    a, p = (offset + 0.1, offset - 0.1) if discriminating else (0.8, 0.3)
    with peers("refused", "refused") as (d1, d2):
        specs = [f"{d1},fail_timeout=1", f"{d2},fail_timeout=1"]
        model = Upstream(specs)
        old = Upstream(specs, clock=time.monotonic, msec_clock=time.monotonic)
        with runner.Nginx(specs, connect_timeout=0.5) as ng:
            ours, theirs_old = [], []
            for fraction in (a, p, p):  # second S, S+1, S+2
                _at_fraction(fraction)
                ng.request()
                ours.append([x.peer for x in run_request(model, timeout=0.5).attempts] or ["backend"])
                theirs_old.append([x.peer for x in run_request(old, timeout=0.5).attempts] or ["backend"])
            wait_for_access_log(ng, 3)
            theirs = [e.upstream_addr for e in ng.access_log()]
    assert theirs == ours, (theirs, ours)
    assert ours[1] == ["backend"] and len(ours[2]) == 2, ours
    if discriminating:
        assert theirs_old[2] == ["backend"] and theirs_old != theirs, (offset, theirs_old)


# -- the configuration cannot be rewritten through a value; the worker is not root --------------------------

INJECTION = "unix:/tmp/a;}server{listen 127.0.0.1:9;autoindex on;root /;}upstream x{server unix:/tmp/b"


@pytest.mark.parametrize("address", [
    INJECTION,                                   # issue 13's kind of path (85 bytes): a whole server block
    "unix:/tmp/a b",                             # whitespace splits a token
    "unix:/tmp/a\nserver",                       # a newline too
    'unix:/tmp/"a"',                             # quotes change how nginx reads a token
    "unix:/tmp/a{",
    "unix:/tmp/$host",                           # a variable
])
def test_config_refuses_values_that_change_its_structure(address, monkeypatch):
    """Refused by name while constructing: no temporary prefix is made and no process is started (both are
    made to fail loudly here, so a call would show)."""
    import subprocess
    import tempfile

    def forbidden(*args, **kwargs):
        raise AssertionError("reached before the bad value was refused")

    monkeypatch.setattr(tempfile, "mkdtemp", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    with pytest.raises(ValueError, match="cannot go into an nginx configuration") as info:
        runner.Nginx([address])
    assert "peer address" in str(info.value)


def test_config_checks_again_when_written():
    """A peer changed after construction is caught by config() itself, before nginx.conf is written."""
    ng = runner.Nginx(["127.0.0.1:1"])
    ng.peers[0].address = INJECTION
    with pytest.raises(ValueError, match="peer address"):
        ng.config()


def test_worker_runs_unprivileged_as_root():
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("as a normal user nginx's worker runs as that user already (nginx cannot switch users)")
    with peers("up") as (up,):
        with runner.Nginx([str(up)]) as ng:
            assert "\nuser nobody " in "\n" + ng.config()
            assert ng.request() == "200"  # the worker can still proxy, write its logs and use its temp paths
            ps = subprocess.run(["ps", "-o", "user=,args=", "--ppid", str(ng.master_pid)], capture_output=True,
                                text=True).stdout
            wait_for_access_log(ng, 1)
            assert len(ng.access_log()) == 1
    workers = [line for line in ps.splitlines() if "worker process" in line]
    assert workers and all(line.split()[0] == "nobody" for line in workers), ps


# -- keepalive (issue 14 part 3): the model predicts which requests reuse a connection -------------------

@pytest.mark.parametrize("weights, keepalive", [((1, 1), 1), ((1, 1), 2), ((3, 1), 1), ((1,), 1)])
def test_keepalive_model_predicts_which_requests_nginx_reuses(weights, keepalive):
    """The upstream's own record (which connection each request came on) for nginx and for the model."""
    from nbconn.nginx.httpd import HttpPeer

    journal = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(HttpPeer(journal=journal)) for _ in weights]
        specs = [f"{s},weight={w}" for s, w in zip(servers, weights)]
        with runner.Nginx(specs, keepalive=keepalive) as ng:
            assert [ng.request() for _ in range(8)] == ["200"] * 8
        theirs = [(s.peer, s.reused) for s in journal]
        journal.clear()
        with Upstream(specs, keepalive=keepalive) as up:
            ours = [(r.attempts[0].peer, r.attempts[0].reused) for r in run_requests(up, 8)]
        seen_by_peer = [(s.peer, s.reused) for s in journal]
    assert ours == theirs and seen_by_peer == ours, (theirs, ours)


def test_keepalive_nginx_makes_one_connect_for_many_requests():
    require_tool("strace")
    from nbconn.nginx.httpd import HttpPeer

    counts = {}
    with HttpPeer() as peer:
        for keepalive in (0, 4):
            with runner.Nginx([str(peer)], keepalive=keepalive, strace=True) as ng:
                for _ in range(5):
                    ng.request()

                def connects():  # strace writes a call when it returns: wait for the lines, not a while
                    return sum(1 for line in ng.strace_lines() if "connect(" in line and f"htons({peer.port})" in line)

                wait_for(lambda: connects() >= (5 if keepalive == 0 else 1), 10)
                counts[keepalive] = connects()
    assert counts == {0: 5, 4: 1}, counts


@pytest.mark.parametrize("kwargs, words", [
    ({"tries": "1; autoindex on"}, "tries"),
    ({"next_upstream_timeout": "1s; root /"}, "next_upstream_timeout"),
    ({"connect_timeout": 10**400}, "connect_timeout"),
    ({"next_upstream": "error"}, "next_upstream"),
    ({"keepalive": "8; root /"}, "keepalive"),
    ({"strace_syscalls": "connect -o /etc/x"}, "strace_syscalls"),
])
def test_every_setting_is_checked_before_it_reaches_the_config(kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        runner.Nginx(["127.0.0.1:1"], **kwargs)


# -- the settings (issue 24 item 9, issue 19 A12, the oracle's settings) ----------------------------------------

# issue 24 item 9: text set after construction became a new location serving /etc
LOCATION_INJECTION = "1;\n        }\n        location /x/ { alias /etc/; autoindex on; }\n        location /y {"


@pytest.mark.parametrize("name, value", [
    ("tries", LOCATION_INJECTION),
    ("next_upstream", ("error", LOCATION_INJECTION)),
    ("next_upstream", LOCATION_INJECTION),
    ("connect_timeout", "1s; autoindex on"),
    ("proxy_bind", "127.0.0.1; autoindex on"),
    ("workers", "1; user root"),
    ("peers", ["127.0.0.1:1"]),
])
def test_settings_cannot_change_after_construction(name, value):
    ng = runner.Nginx(["127.0.0.1:1"])
    before = ng.config()
    with pytest.raises(AttributeError, match=name):
        setattr(ng, name, value)
    assert ng.config() == before


@pytest.mark.parametrize("name, value", [
    ("tries", LOCATION_INJECTION),
    ("next_upstream", ("error", LOCATION_INJECTION)),
    ("read_timeout", "5s; autoindex on"),
    ("worker_connections", 10**30),
    ("proxy_bind", "::1 transparent"),
])
def test_config_checks_every_setting_again_when_written(name, value):
    """Even a setting forced past the guard (object.__setattr__) is refused by config(), by name."""
    ng = runner.Nginx(["127.0.0.1:1"])
    object.__setattr__(ng, name, value)
    with pytest.raises((ValueError, TypeError), match=name):
        ng.config()


def test_a_peer_object_changed_after_construction_does_not_reach_the_config():
    from nbconn.nginx.upstream import Server

    peer = Server("127.0.0.1:1")
    ng = runner.Nginx([peer])
    peer.address = INJECTION
    assert "autoindex" not in ng.config()


def test_connect_timeout_has_no_75s_cap():
    """nginx 1.22.1 takes any proxy_connect_timeout (the 75 s of its docs is about the OS); so does the runner,
    up to nbconn's own limit for every timer."""
    from nbconn import validate

    ng = runner.Nginx(["127.0.0.1:1"], connect_timeout=120)
    assert "proxy_connect_timeout 120000ms;" in ng.config()
    runner.Nginx(["127.0.0.1:1"], connect_timeout=validate.MAX_TIMEOUT_S)
    with pytest.raises(ValueError, match="connect_timeout"):
        runner.Nginx(["127.0.0.1:1"], connect_timeout=validate.MAX_TIMEOUT_S + 1)


@pytest.mark.parametrize("kwargs, lines", [
    ({}, ["worker_processes 1;", "worker_connections 64;", "proxy_read_timeout 5000ms;",
          "proxy_next_upstream error timeout;"]),
    ({"next_upstream": ()}, ["proxy_next_upstream off;"]),
    ({"next_upstream": runner.PROXY_NEXT_UPSTREAM_KINDS},
     ["proxy_next_upstream error timeout invalid_header http_500 http_502 http_503 http_504 http_403 http_404 "
      "http_429 non_idempotent;"]),
    ({"next_upstream": ["http_502"]}, ["proxy_next_upstream http_502;"]),
    ({"proxy_bind": "198.18.0.5"}, ["proxy_bind 198.18.0.5;"]),
    ({"proxy_bind": "0:0::1"}, ["proxy_bind ::1;"]),  # written as nginx's ngx_parse_addr reads it: bare
    ({"workers": 2}, ["worker_processes 2;"]),
    ({"zone": True}, ["zone backend 64k;"]),
    ({"worker_connections": 4}, ["worker_connections 4;"]),
    ({"read_timeout": 0.25}, ["proxy_read_timeout 250ms;"]),
])
def test_new_settings_in_the_config_text(kwargs, lines):
    text = runner.Nginx(["127.0.0.1:1"], **kwargs).config()
    for line in lines:
        assert re.search(rf"^\s*{re.escape(line)}$", text, re.M), (line, text)
    if not kwargs.get("zone"):
        assert "zone" not in text
    if not kwargs.get("proxy_bind"):
        assert "proxy_bind" not in text


@pytest.mark.parametrize("kwargs, error, words", [
    ({"next_upstream": ("updating",)}, ValueError, "next_upstream='updating'"),
    ({"next_upstream": ("off",)}, ValueError, "next_upstream='off'"),  # off is the empty tuple
    ({"next_upstream": ("error", "error")}, ValueError, "twice"),
    ({"next_upstream": None}, TypeError, "next_upstream"),
    ({"proxy_bind": "127.0.0.1:8080"}, ValueError, "without a port"),
    ({"proxy_bind": "[::1]"}, ValueError, "proxy_bind"),
    ({"proxy_bind": "fe80::1%lo"}, ValueError, "proxy_bind"),
    ({"proxy_bind": "localhost"}, ValueError, "proxy_bind"),
    ({"proxy_bind": 2130706433}, TypeError, "proxy_bind"),
    ({"workers": 0}, ValueError, "workers=0"),
    ({"workers": True}, TypeError, "workers"),
    ({"workers": 10**30}, ValueError, "workers"),
    ({"zone": 1}, TypeError, "zone"),
    ({"worker_connections": 1}, ValueError, "worker_connections=1"),
    ({"worker_connections": "64; user root"}, TypeError, "worker_connections"),
    ({"read_timeout": 0}, ValueError, "read_timeout=0"),
    ({"read_timeout": float("nan")}, ValueError, "read_timeout"),
    ({"read_timeout": "5s"}, TypeError, "read_timeout"),
])
def test_new_settings_refused_by_name_before_anything_exists(kwargs, error, words, monkeypatch):
    import subprocess
    import tempfile

    def forbidden(*args, **kw):
        raise AssertionError("reached before the bad value was refused")

    monkeypatch.setattr(tempfile, "mkdtemp", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    with pytest.raises(error, match=re.escape(words)):
        runner.Nginx(["127.0.0.1:1"], **kwargs)


def test_real_nginx_runs_the_new_settings():
    """The settings are what nginx 1.22.1 accepts: it starts with all of them, proxies, and runs two workers."""
    import subprocess

    with peers("up") as (up,):
        with runner.Nginx([str(up)], next_upstream=runner.PROXY_NEXT_UPSTREAM_KINDS, proxy_bind="127.0.0.1", workers=2,
                         zone=True, worker_connections=16, read_timeout=2, connect_timeout=100) as ng:
            assert [ng.request() for _ in range(3)] == ["200"] * 3
            ps = subprocess.run(["ps", "-o", "args=", "--ppid", str(ng.master_pid)], capture_output=True,
                                text=True, timeout=10).stdout
    assert sum("worker process" in line for line in ps.splitlines()) == 2, ps


# -- nginx ends with its owner (issue 24 item 1) ---------------------------------------------------------

OWNER = r"""
import os, sys, threading, time
from nbconn.nginx import runner

how = sys.argv[2]
if how == "thread":  # started from a thread that then ends: nginx must live on with the process
    box = []
    t = threading.Thread(target=lambda: box.append(runner.Nginx([sys.argv[1]]).start()))
    t.start()
    t.join()
    ng = box[0]
else:
    ng = runner.Nginx([sys.argv[1]]).start()
if how == "fork" and os.fork() == 0:  # a forked child holds every inherited descriptor, then outlives us
    os.close(1)
    time.sleep(30)
    os._exit(0)
print(ng.prefix, ng.port, ng.master_pid, ng.proc.pid, flush=True)
time.sleep(60)  # bounded: the test kills this process long before
"""


def _alive(pid: int) -> bool:
    """A process with this pid that is not a zombie (a reaped or reused pid is not nginx's: checked by name)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return state != "Z" and (name == "nginx" or name.startswith("python") or name == "strace")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _start_owner(how: str, *extra):
    import os
    import select
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    owner = subprocess.Popen([*extra, sys.executable, "-c", OWNER, "127.0.0.1:1", how], cwd=root,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    ready, _, _ = select.select([owner.stdout], [], [], 60)
    line = owner.stdout.readline() if ready else ""
    if not line:
        owner.kill()
        owner.wait(10)
        pytest.fail("the owner did not start nginx")
    prefix, port, master, guard = line.split()
    return owner, prefix, int(port), int(master), int(guard)


@pytest.mark.timing
@pytest.mark.parametrize("how, signum", [
    ("plain", "SIGKILL"), ("plain", "SIGTERM"), ("plain", "SIGHUP"),
    ("fork", "SIGKILL"),  # a forked child of the owner, still alive, does not keep nginx alive
])
def test_nginx_ends_with_its_owner(how, signum, late_tolerance_ms):
    import os
    import signal

    from .test_lab_reliability import wait_for

    owner, prefix, port, master, guard = _start_owner(how)
    forked = [p for p in _children(owner.pid) if p != guard]
    try:
        workers = _children(master)
        assert workers and _alive(master) and os.path.isdir(prefix)
        os.kill(owner.pid, getattr(signal, signum))
        owner.wait(10)
        bound_s = late_tolerance_ms(1000) / 1000
        everything = [master, guard, *workers]
        assert wait_for(lambda: not any(_alive(p) for p in everything) and not os.path.exists(prefix), bound_s), \
            ([p for p in everything if _alive(p)], os.path.exists(prefix), bound_s)
        import socket

        with pytest.raises(OSError):  # nothing answers on nginx's port any more
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        if how == "fork":
            assert forked and all(_alive(p) for p in forked)  # it is the owner's death that counted
    finally:
        for p in forked:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


def test_nginx_lives_on_when_the_thread_that_started_it_ends():
    """PR_SET_PDEATHSIG fires when the parent *thread* ends; nginx's life follows the owner *process*."""
    import os
    import signal
    import time

    owner, prefix, port, master, guard = _start_owner("thread")
    try:
        time.sleep(0.3)  # the starting thread ended before the owner printed; give a wrong PDEATHSIG time to act
        assert _alive(master) and _alive(guard) and os.path.isdir(prefix)
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        owner.kill()
        owner.wait(10)
    from .test_lab_reliability import wait_for

    assert wait_for(lambda: not _alive(master) and not os.path.exists(prefix), 10)


def test_a_forked_child_leaving_the_with_block_does_not_stop_the_owners_nginx():
    import os

    with peers("up") as (up,):
        with runner.Nginx([str(up)]) as ng:
            pid = os.fork()
            if pid == 0:  # the child runs the with block's exit (stop()) on its copy
                try:
                    ng.stop()
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            assert ng.request() == "200" and os.path.isdir(ng.prefix)


def test_a_guard_killed_from_outside_takes_nginx_with_it_at_stop():
    """SIGKILL to the guard: its death signal ends nginx's master; stop() ends the orphaned workers and the prefix."""
    import os
    import signal

    from .test_lab_reliability import wait_for

    ng = runner.Nginx(["127.0.0.1:1"]).start()
    try:
        master, prefix = ng.master_pid, ng.prefix
        workers = _children(master)
        assert workers
        os.kill(ng.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: not _alive(master), 10)
    finally:
        ng.stop()
    assert wait_for(lambda: not any(_alive(p) for p in workers), 10)
    assert not os.path.exists(prefix)


# -- the real nginx inside a lab namespace (issue 22) ------------------------------------------------------

def _lab_namespace_or_skip():
    reason = lab.namespace_unavailable_reason()
    if reason:
        pytest.skip(f"a lab namespace cannot be made here: {reason}")


def test_nginx_runs_inside_a_lab_namespace():
    """Its listener and its upstream connects are made in the namespace: it reaches peers that exist only in
    there (the host's loopback has no listener on their ports), the namespace counts its connects, and its
    lifetime guard still removes everything."""
    import os

    _lab_namespace_or_skip()
    with lab.namespace() as ns, ns.listening(http=True) as up, ns.refused() as down:
        before = ns.read_netstat()["Tcp"]["ActiveOpens"]
        with runner.Nginx([str(down), str(up)], netns=ns) as ng:
            prefix, master = ng.prefix, ng.master_pid
            assert os.stat(f"/proc/{master}/ns/net").st_ino == os.stat(f"/proc/{ns.pid}/ns/net").st_ino
            assert os.stat(f"/proc/{master}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
            assert [ng.request() for _ in range(3)] == ["200"] * 3
            wait_for_access_log(ng, 3)
            access, errors = ng.access_log(), ng.error_log()
            workers = _children(master)
            users = {os.stat(f"/proc/{p}").st_uid for p in workers}
        opened = ns.read_netstat()["Tcp"]["ActiveOpens"] - before
    assert access[0].upstream_addr == [str(down), str(up)] and access[0].status == "200", access
    assert any(e.upstream == str(down) and e.message.startswith("connect() failed (111: Connection refused)")
               for e in errors), errors
    assert [e for e in errors if e.level in ("emerg", "alert", "crit")] == []  # e.g. no initgroups() failure
    # 3 requests: the refused try, then the listening peer (the readiness probe's and requests' own
    # connections to nginx count too)
    assert opened >= 4, opened
    assert users == ({65534} if os.geteuid() == 0 else {os.geteuid()}), users  # nobody as root, else the caller
    assert not os.path.exists(prefix)


def test_nginx_in_a_namespace_ends_with_its_owner():
    """The owner, holding a lab namespace with nginx inside, is SIGKILLed: nginx, its guard and prefix go."""
    import os
    import signal
    import subprocess
    import sys

    from .test_lab_reliability import wait_for

    _lab_namespace_or_skip()
    code = r"""
import sys, time
from nbconn import lab
from nbconn.nginx import runner
with lab.namespace() as ns, ns.listening(http=True) as up:
    ng = runner.Nginx([str(up)], netns=ns).start()
    assert ng.request() == "200"
    print(ng.prefix, ng.master_pid, ng.proc.pid, flush=True)
    time.sleep(60)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = owner.stdout.readline()
        assert line, "the owner did not start nginx"
        prefix, master, guard = line.split()
        everything = [int(master), int(guard), *_children(int(master))]
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        assert wait_for(lambda: not any(_alive(p) for p in everything) and not os.path.exists(prefix), 10)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


def test_netns_must_be_a_lab_namespace():
    with pytest.raises(TypeError, match="netns"):
        runner.Nginx(["127.0.0.1:1"], netns="/proc/1/ns/net")


def test_nginx_in_the_client_namespace_connects_across_the_impaired_link():
    """nginx in the link's client namespace, the peer in the server namespace: every connect crosses the wire,
    so $upstream_connect_time holds the link's round trip (a lower bound: load can only add to it)."""
    from nbconn.lab import peers as lab_peers
    from nbconn.lab import probe

    reason = probe.wire_unavailable_reason()
    if reason:
        pytest.skip(f"the impairment wire cannot run here: {reason}")
    with lab.impaired(delay_ms=15) as link, \
            lab_peers.listening(link.server_addr, http=True, source=link.server_ns) as up:
        with runner.Nginx([f"{link.server_addr}:{up.port}"], netns=link.client_ns, connect_timeout=2) as ng:
            assert [ng.request() for _ in range(2)] == ["200"] * 2
            wait_for_access_log(ng, 2)
            access = ng.access_log()
    times = [entry.connect_time[0] for entry in access]
    assert len(times) == 2 and all(t is not None and t >= 0.029 for t in times), times  # 15 ms out + 15 ms back


def test_an_nginx_dropped_without_stop_ends_when_collected():
    import gc
    import os

    from .test_lab_reliability import wait_for

    ng = runner.Nginx(["127.0.0.1:1"]).start()
    master, guard, prefix = ng.master_pid, ng.proc.pid, ng.prefix
    del ng
    gc.collect()
    assert wait_for(lambda: not _alive(master) and not _alive(guard) and not os.path.exists(prefix), 10)


def test_too_few_worker_connections_give_nginx_500_with_its_alert():
    """worker_connections 3: the listener, the channel and the client's connection leave none for the upstream;
    ngx_get_connection fails in ngx_event_connect_peer: NGX_ERROR, 500 at once, an [alert] line (issue 19 A8)."""
    with peers("up") as (up,):
        with runner.Nginx([str(up)], worker_connections=3) as ng:
            assert [ng.request() for _ in range(2)] == ["500", "500"]
            wait_for_access_log(ng, 2)
            errors, access = ng.error_log(), ng.access_log()
    assert [(e.level, e.message) for e in errors] == \
        [("alert", "3 worker_connections are not enough while connecting to upstream")] * 2
    assert [a.status for a in access] == ["500", "500"]


def test_proxy_bind_reaches_nginx():
    """proxy_bind to an address this host lacks: bind() fails locally (no packet leaves), nginx answers 500 with
    one [crit] line naming the address without a port; to a loopback address it proxies as usual."""
    with peers("up") as (up,):
        with runner.Nginx([str(up)], proxy_bind="198.18.0.5") as ng:
            assert ng.request() == "500"
            wait_for_access_log(ng, 1)
            errors = ng.error_log()
        with runner.Nginx([str(up)], proxy_bind="127.0.0.2") as ng:
            assert ng.request() == "200"
    assert [(e.level, e.message) for e in errors] == [
        ("crit", "bind(198.18.0.5) failed (99: Cannot assign requested address) while connecting to upstream")]


def test_nginx_in_a_namespace_meets_its_sysctls():
    """ip_local_port_range narrowed to two ports inside the namespace: nginx's first two upstream connections hold
    them (the peer accepts and never answers; read_timeout ends each with 504, and nginx, closing first, keeps the
    port in TIME_WAIT), the third connect() fails at once with EADDRNOTAVAIL, which nginx 1.22.1 logs at crit as
    "connect() to PEER failed (99: ...)" (ngx_event_connect_peer) and answers 502."""
    _lab_namespace_or_skip()
    with lab.namespace() as ns, ns.listening(hold=True) as held:
        with runner.Nginx([str(held)], netns=ns, read_timeout=0.1, next_upstream=()) as ng:
            ns.set_sysctl("net.ipv4.ip_local_port_range", "40000 40001")  # after nginx's listener took its port
            statuses = [ng.request() for _ in range(3)]
            wait_for_access_log(ng, 3)
            errors = [(e.level, e.message) for e in ng.error_log()]
    assert statuses == ["504", "504", "502"], (statuses, errors)
    timed_out = ("error", "upstream timed out (110: Connection timed out) while reading response header from upstream")
    no_port = ("crit", f"connect() to {held} failed (99: Cannot assign requested address) while connecting to upstream")
    assert errors == [timed_out, timed_out, no_port], errors


def test_keepalive_over_the_impaired_link_with_real_handshakes():
    """HttpPeer in the link's server namespace, nginx in its client namespace: a new upstream connection pays the
    link's round trip in $upstream_connect_time, a reused one nothing ("0.000") -- no rtt_ms stand-in."""
    from nbconn.nginx.httpd import HttpPeer
    from nbconn.lab import probe

    reason = probe.wire_unavailable_reason()
    if reason:
        pytest.skip(f"the impairment wire cannot run here: {reason}")
    with lab.impaired(delay_ms=10) as link, HttpPeer(link.server_addr, source=link.server_ns) as peer:
        with runner.Nginx([str(peer)], netns=link.client_ns, keepalive=4, connect_timeout=2) as ng:
            assert [ng.request() for _ in range(4)] == ["200"] * 4
            wait_for_access_log(ng, 4)
            times = [entry.connect_time[0] for entry in ng.access_log()]
        reused = [s.reused for s in peer.journal]
    assert reused == [False, True, True, True], reused
    assert times[0] >= 0.019 and times[1:] == [0.0, 0.0, 0.0], times  # 10 ms out + 10 ms back, then none


@pytest.mark.parametrize("kwargs, error, words", [
    ({"host": "198.18.0.2"}, ValueError, "loopback"),      # outside a lab namespace: loopback only
    ({"host": "localhost"}, ValueError, "not an IP address"),
    ({"host": 1}, TypeError, "host"),
    ({"source": "/proc/1/ns/net"}, TypeError, "source"),
])
def test_http_peer_refuses_bad_host_or_source_by_name(kwargs, error, words):
    from nbconn.nginx.httpd import HttpPeer

    with pytest.raises(error, match=words):
        HttpPeer(**kwargs)
