"""A real nginx (Debian's package) next to nbconn.upstream on the same lab peers: same peers tried, same
classification, same syscalls.  Skips with one line where nginx is missing (CI installs it and fails instead)."""

import contextlib
import re
import time

import pytest

from nbconn import lab, nginx
from nbconn.upstream import Upstream, run_requests

from .conftest import require_tool


@pytest.fixture(autouse=True)
def _need_nginx():
    if nginx.unavailable_reason():
        require_tool("nginx")


def side_by_side(peers, requests, *, connect_timeout=0.2, **kw):
    with nginx.Nginx(peers, connect_timeout=connect_timeout, **kw) as ng:
        statuses = [ng.request() for _ in range(requests)]
        time.sleep(0.05)
        access, errors = ng.access_log(), ng.error_log()
    ours = run_requests(Upstream(peers), requests, timeout=connect_timeout)
    return statuses, access, errors, ours


@contextlib.contextmanager
def peers(*kinds):
    makers = {"up": lambda: lab.listening(http=True), "refused": lab.refused, "hole": lab.blackhole}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(makers[k]()) for k in kinds]


def assert_same(access, ours):
    rows = nginx.compare_sequences(access, ours)
    assert len(rows) == len(ours)
    for row in rows:
        assert row["same"], row


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
    assert ours[1].log == ["no live upstreams while connecting to upstream"]
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
        with nginx.Nginx([str(peer)], connect_timeout=0.2, strace=True) as ng:
            ng.request()
            time.sleep(0.2)
            theirs = nginx.upstream_connect_syscalls(ng.strace_lines(), peer.port)
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
        nginx.Nginx(["127.0.0.1:1"], connect_timeout=0)
    with pytest.raises(ValueError, match="'http_502'"):
        nginx.Nginx(["127.0.0.1:1"], next_upstream=("http_502",))
    with peers("up") as (up,):
        ng = nginx.Nginx([str(up)])
        with ng:
            prefix, proc = ng.prefix, ng.proc
            assert ng.request() == "200"
        assert proc.poll() is not None
    import os

    assert not os.path.exists(prefix)
