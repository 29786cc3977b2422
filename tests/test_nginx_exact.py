"""nginx-exact mode makes exactly the syscalls nginx 1.22.1's worker makes for one upstream connect, under strace.

nginx's own sequence, measured with strace on this machine's nginx 1.22.1 (notes in measured-here.md) and read in
ngx_event_connect_peer (src/event/ngx_event_connect.c): socket(AF_INET, SOCK_STREAM, IPPROTO_IP) -- no
SOCK_CLOEXEC -- setsockopt(SO_RCVBUF) when `rcvbuf` is configured, ioctl(FIONBIO), epoll_ctl(ADD,
EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET), connect() = -1 EINPROGRESS, epoll_wait, getsockopt(SO_ERROR), and close()
without EPOLL_CTL_DEL.  No read-back of the option, no TCP_INFO.
"""

import re
import subprocess
import sys

import pytest

import nbconn
from nbconn.lab import blackhole, listening

from .conftest import require_tool

CHILD = """
import os, sys
import nbconn
target, timeout = sys.argv[1], float(sys.argv[2])
nbconn.connect(target, nginx_exact=True, rcvbuf=65536, timeout=timeout)  # warm-up: imports, the C library
os.access("/nbconn-strace-begin", os.F_OK)
res = nbconn.connect(target, nginx_exact=True, rcvbuf=65536, timeout=timeout)
os.access("/nbconn-strace-end", os.F_OK)
print(res.outcome)
"""


def _syscalls_of_one_connect(target, timeout):
    strace = require_tool("strace")
    proc = subprocess.run([strace, "-f", "-qq", sys.executable, "-c", CHILD, str(target), str(timeout)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [re.sub(r"^\[pid\s+\d+\] ", "", line) for line in proc.stderr.splitlines()]
    begin = next(i for i, line in enumerate(lines) if "/nbconn-strace-begin" in line)
    end = next(i for i, line in enumerate(lines) if "/nbconn-strace-end" in line)
    calls = [line for line in lines[begin + 1:end]
             # the allocator's own calls are not the flow's
             if not line.startswith(("mmap(", "munmap(", "brk(", "madvise(", "mprotect("))]
    # connect() makes its own epoll instance (nginx's worker made one at start-up): set it aside
    epfd = re.match(r"epoll_create1\(EPOLL_CLOEXEC\)\s+= (\d+)", calls[0]).group(1)
    assert re.match(rf"close\({epfd}\)", calls[-1]), calls
    return proc.stdout.strip(), calls[1:-1], epfd


def test_nginx_exact_connected_makes_nginx_syscalls_only():
    with listening(hold=True) as target:
        outcome, calls, ep = _syscalls_of_one_connect(target, 5)
    assert outcome == "connected"
    fd = re.match(r"socket\(AF_INET, SOCK_STREAM, IPPROTO_IP\)\s+= (\d+)$", calls[0]).group(1)
    expected = [
        r"socket\(AF_INET, SOCK_STREAM, IPPROTO_IP\) = \d+",  # no SOCK_CLOEXEC
        rf"setsockopt\({fd}, SOL_SOCKET, SO_RCVBUF, \[65536\], 4\) = 0",  # no getsockopt read-back
        rf"ioctl\({fd}, FIONBIO, \[1\]\) = 0",
        rf"epoll_ctl\({ep}, EPOLL_CTL_ADD, {fd}, \{{events=EPOLLIN\|EPOLLOUT\|EPOLLRDHUP\|EPOLLET, ",
        rf"connect\({fd}, \{{sa_family=AF_INET, .*\}}, 16\) = -1 EINPROGRESS",
        rf"epoll_wait\({ep}, \[\{{events=EPOLLOUT, data=\{{u32={fd}, .*\}}\], 8, \d+\) = 1",
        rf"getsockopt\({fd}, SOL_SOCKET, SO_ERROR, \[0\], \[4\]\) = 0",  # no TCP_INFO after it
        rf"close\({fd}\) = 0",  # no EPOLL_CTL_DEL before it
    ]
    calls = [re.sub(r"\s+= ", " = ", c) for c in calls]
    assert len(calls) == len(expected), "\n".join(calls)
    for pattern, line in zip(expected, calls):
        assert re.match(pattern, line), f"expected {pattern!r}\n got {line!r}\nall:\n" + "\n".join(calls)


def test_nginx_exact_timer_closes_without_so_error():
    with blackhole() as target:
        outcome, calls, ep = _syscalls_of_one_connect(target, 0.2)
    assert outcome == "timed_out"
    names = [re.match(r"(\w+)\(", c).group(1) for c in calls]
    assert names[:5] == ["socket", "setsockopt", "ioctl", "epoll_ctl", "connect"]
    assert set(names[5:-1]) == {"epoll_wait"} and names[-1] == "close", calls
    assert all(re.search(r"\) += 0$", c) for c in calls if c.startswith("epoll_wait("))  # nothing ready


def test_nginx_exact_result_and_default_mode_differ_only_in_extras(no_fd_leak):
    with listening() as target:
        exact = nbconn.connect(target, nginx_exact=True, rcvbuf=65536)
        default = nbconn.connect(target, rcvbuf=65536)
    assert exact.connected and default.connected
    assert exact.effective == {} and exact.tcp_info is None  # nothing read back
    assert default.effective["rcvbuf"] >= 65536 and default.tcp_info is not None
    extras = {"getsockopt", "tcp_info", "unregister"}
    assert [s.name for s in exact.steps] == [s.name for s in default.steps if s.name not in extras]
    assert "SOCK_CLOEXEC" not in exact.steps[0].call and "SOCK_CLOEXEC" in default.steps[0].call


def test_nginx_exact_keep_hands_over_a_python_socket(no_fd_leak):
    with listening() as target:
        with nbconn.connect(target, nginx_exact=True, keep=True) as res:
            assert res.sock.getpeername()[1] == target.port
        assert res.sock is None


def test_nginx_exact_refuses_other_methods():
    with pytest.raises(ValueError, match="nginx_exact"):
        nbconn.connect("127.0.0.1:9", nginx_exact=True, nonblocking="fcntl")
    with pytest.raises(ValueError, match="nginx_exact"):
        nbconn.connect_many(["127.0.0.1:9"], nginx_exact=True, trigger="level")
    with pytest.raises(TypeError, match="nginx_exact"):
        nbconn.connect("127.0.0.1:9", nginx_exact="yes")


def test_nginx_exact_many_leaves_no_fd(no_fd_leak):
    with listening() as up, blackhole() as hole:
        results = nbconn.connect_many([up, hole, up, "127.0.0.1:1"] * 25, nginx_exact=True, timeout=0.2,
                                      concurrency=16)
    assert {r.outcome for r in results} <= {"connected", "timed_out", "refused"}
    assert sum(r.connected for r in results) == 50
