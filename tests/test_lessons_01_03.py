"""Notebooks 01-03 make their socket calls on the page; these tests run those very cells (by id) and check the claim.

Issue 20: a tutorial's code cells are its lesson.  So the check of each claim of 01-03 is the notebook's own
cell, executed here in a fresh namespace after the notebook's ``imports`` cell, with its ``rows`` read back --
not a copy of the experiment kept in the library.  The helpers the cells use (nbconn/experiments/nb01-03) are
plumbing and are tested below as such.
"""

import re
import select
import socket

import pytest

from nbconn.experiments import nb01, nb02, nb03

from .conftest import require_tool
from .test_claims_checks import _seconds
from .test_lessons_00_05 import cells, run_cells

#: what a cell of 01-03 may still take from nbconn besides nbconn.connect and the lab: plumbing (a table, a duration,
#: an errno's or an event mask's name, nginx's version, a notebook's own nbNN helpers, synretry's timer-wheel bound)
PLUMBING = {"nbconn.experiments.table": {"Table", "options_table"}, "nbconn.strace": {"format_ns"},
            "nbconn.errors": {"errno_name"}, "nbconn.loop": {"event_names"},
            "nbconn.experiments": {"nb01", "nb02", "nb03"},
            "nbconn.experiments.synretry": {"config_hz", "wheel_lateness_s"},
            "nbconn": {"lab"}, "nbconn.nginx": {"runner"}}
#: the calls each notebook's cells must make themselves
ON_THE_PAGE = {
    "01": ("setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF", "getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF",
           "TCP_USER_TIMEOUT", "connect_ex(", "ep.register(", "ep.poll(", "SO_ERROR"),
    "02": ("termios.FIONBIO", "SO_SNDTIMEO", "connect_ex("),
    "03": ("termios.FIONBIO", "ep.register(", "connect_ex(", "ep.poll(", "SO_ERROR", "client.close()",
           "select.EPOLLET"),
}


@pytest.mark.parametrize("number", sorted(ON_THE_PAGE))
def test_the_cells_make_the_socket_calls_and_take_only_plumbing_from_nbconn(number):
    code = "\n".join(c.source for c in cells(number).values() if c.cell_type == "code")
    imported = {(module, name.split(" as ")[0].strip()) for module, names in
                re.findall(r"^from (nbconn[\w.]*) import ([\w, ]+(?: as \w+)?)$", code, re.M) for name in names.split(",")}
    assert imported, "the scan found no 'from nbconn... import' line: the regex broke"
    experiments = sorted(f"{m}.{n}" for m, n in imported if n not in PLUMBING.get(m, set()))
    assert experiments == [], f"notebook {number} takes an experiment from the library: {experiments}"
    missing = [call for call in ON_THE_PAGE[number] if call not in code]
    assert not missing, f"notebook {number}'s cells do not show {missing}"


# -- 01 ------------------------------------------------------------------------------------------------------

def test_01_readback_doubles_caps_and_raises(no_fd_leak, capsys):
    rows = {r[0]: r[1:] for r in run_cells("01", "readback")["rows"]}
    rmem_max = int(nb01.sysctl("net.core.rmem_max"))
    assert rows[4096][:2] == [8192, "doubled"]
    assert rows[1024][0] > 2048 and rows[1024][1] == "raised to the kernel's minimum"
    assert rows[1 << 24][0] == 2 * min(1 << 24, rmem_max)


def test_01_a_set_rcvbuf_is_not_autotuned_and_the_default_grows(no_fd_leak, capsys):
    default, fixed = run_cells("01", "autotuning")["rows"]
    assert fixed[2] == "unchanged" and fixed[3] == default[3] == "16 MiB"
    assert default[2].endswith("x larger"), default


def test_01_user_timeout_ends_the_handshake_with_etimedout(no_fd_leak, capsys):
    rows = run_cells("01", "user-timeout")["rows"]
    assert [r[0] for r in rows] == ["500 ms", "1500 ms"]
    for _, returned, events, _, so_error in rows:
        assert returned == "EINPROGRESS" and "EPOLLERR" in events and so_error == "ETIMEDOUT"
    after = [_seconds(r[3]) for r in rows]
    # never early (kernel timers): 500 ms ends at the first 1 s SYN timer, not at 0.5 s; 1500 ms at its 1.5 s.
    # The upper bounds are generous: the kernel's own schedule (tcp_syn_retries) would take minutes.
    assert 0.95 <= after[0] <= 3.0 and 1.45 <= after[1] <= 3.5, rows


# -- 02 ------------------------------------------------------------------------------------------------------

def test_02_setblocking_is_one_ioctl_fionbio_and_fcntl_two_calls(capsys):
    require_tool("strace")
    rows = dict(run_cells("02", "strace-three")["rows"])
    assert re.fullmatch(r"ioctl\(\d+, FIONBIO, \[1\]\)", rows["sock.setblocking(False)"])
    assert rows["ioctl(FIONBIO)"] == rows["sock.setblocking(False)"]
    assert re.fullmatch(r"fcntl\(\d+, F_GETFL\); fcntl\(\d+, F_SETFL, O_RDWR\|O_NONBLOCK\)", rows["fcntl(O_NONBLOCK)"])


def test_02_the_blocking_connect_sleeps_its_sndtimeo_the_nonblocking_one_returns_at_once(no_fd_leak, capsys):
    rows = run_cells("02", "blocking")["rows"]
    assert [(r[0], r[2]) for r in rows] == [("blocking, SO_SNDTIMEO", "EINPROGRESS"), ("non-blocking", "EINPROGRESS")]
    blocking, nonblocking = (_seconds(r[1]) for r in rows)
    assert blocking >= 0.49, rows  # its 0.5 s SO_SNDTIMEO, never early (10 ms for the clock reads)
    assert nonblocking < 0.25, rows  # microseconds on a quiet machine: generous for a loaded one


@pytest.mark.timing
def test_02_a_blocking_connect_ends_late_never_early_within_the_wheel_bound(no_fd_leak, capsys, late_tolerance_ms):
    from nbconn.experiments.synretry import config_hz, wheel_lateness_s

    if config_hz() is None:
        pytest.skip("CONFIG_HZ is not readable here")
    rows = run_cells("02", "lateness")["rows"]
    assert [r[0] for r in rows] == ["0.5 s", "1 s"]
    for row, timeout_s in zip(rows, (0.5, 1.0)):
        low, high = (float(x) for x in re.findall(r"-?[0-9.]+", row[1])[:2])
        assert low >= -1.0, row  # a kernel timer is never early (1 ms for the clock reads)
        bound_ms = wheel_lateness_s(timeout_s, config_hz()) * 1e3
        assert row[3].startswith(f"0 ms to {bound_ms:.0f} ms"), row
        if row[2] != "n/a":  # the timer's own lateness, the wait for a CPU taken out
            assert float(re.findall(r"-?[0-9.]+", row[2])[1]) <= bound_ms + late_tolerance_ms(2), row


# -- 03 ------------------------------------------------------------------------------------------------------

def test_03_add_reports_the_current_readiness_in_either_order(no_fd_leak, capsys):
    rows = run_cells("03", "start-connect", "order")["rows"]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("ADD, then connect()", "EINPROGRESS", "EPOLLOUT", 0),
                                                        ("connect(), then ADD", "EINPROGRESS", "EPOLLOUT", 0)]


def test_03_one_registration_reports_the_connect_then_the_reply(no_fd_leak, capsys):
    rows = dict(run_cells("03", "start-connect", "one-registration")["rows"])
    assert rows["epoll_wait"] == "EPOLLOUT" and rows["getsockopt(SO_ERROR)"] == 0
    assert {"EPOLLIN", "EPOLLRDHUP"} <= set(rows["epoll_wait (until the reply and the peer's FIN)"].split("|"))
    assert rows["recv()"].startswith("HTTP/1.")


def test_03_edge_reports_once_level_every_time(no_fd_leak, capsys):
    rows = run_cells("03", "edge-level")["rows"]
    assert [r[1] for r in rows] == ["EPOLLOUT", "(not reported)", "(not reported)"]
    assert [r[2] for r in rows] == ["EPOLLOUT"] * 3


def test_03_a_byte_on_a_writable_socket_is_reported_with_epollout(no_fd_leak, capsys):
    rows = [r[1] for r in run_cells("03", "edge-wakeups")["rows"]]
    assert rows == ["EPOLLOUT", "(nothing)", "EPOLLIN|EPOLLOUT", "(nothing)", "EPOLLIN|EPOLLOUT",
                    "EPOLLIN|EPOLLOUT|EPOLLRDHUP"]


def test_03_close_unregisters_only_with_the_last_reference(no_fd_leak, capsys):
    (_, _, alone), (_, _, with_dup) = run_cells("03", "close-dup")["rows"]
    assert alone == "(nothing)" and with_dup == "EPOLLIN, for the closed descriptor"


# -- the plumbing ----------------------------------------------------------------------------------------------

def test_nb01_sysctl_reads_proc_and_says_what_it_could_not():
    assert int(nb01.sysctl("net.core.rmem_max")) > 0
    assert len(nb01.sysctl("net.ipv4.tcp_rmem").split(" ")) == 3  # tabs in /proc become single spaces
    assert nb01.sysctl("net.no_such_setting") == "?"


def test_nb01_receive_counts_every_byte_and_leaves_nothing_open(no_fd_leak):
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as s:
        s.settimeout(10.0)
        s.connect(listener.getsockname())
        assert nb01.receive_from_peer(s, listener, 100_000) == 100_000
    with pytest.raises(ValueError, match="total_bytes=0"):
        nb01.receive_from_peer(None, None, 0)  # refused before it touches a socket


def test_nb02_timeval_is_what_so_sndtimeo_reads_back():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, nb02.timeval(1.5))
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16) == nb02.timeval(1.5)
    assert nb02.timeval(0.9999999) == nb02.timeval(1.0)  # a valid timeval: tv_usec stays below 1000000
    with pytest.raises(ValueError, match="seconds=-1"):
        nb02.timeval(-1)
    assert nb02.spread_ms([0.0012, 0.0117]) == "1.2 ms to 11.7 ms" and nb02.spread_ms([]) == "n/a"


def test_nb03_nginx_runs_the_read_handler_first_and_widens_err_and_hup():
    assert nb03.nginx_handlers(select.EPOLLOUT) == "write handler"
    assert nb03.nginx_handlers(select.EPOLLIN | select.EPOLLOUT) == "read handler, then write handler"
    assert nb03.nginx_handlers(select.EPOLLIN | select.EPOLLRDHUP) == "read handler (pending_eof)"
    assert nb03.nginx_handlers(select.EPOLLERR) == "read handler, then write handler"  # ngx_epoll_module.c:862-875


def test_nb03_poll_until_stops_at_its_bound_with_what_it_saw(no_fd_leak):
    client, server = nb03.loopback_pair()
    with client, server, select.epoll() as ep:
        ep.register(client.fileno(), select.EPOLLIN | select.EPOLLET)
        assert nb03.poll_until(ep, select.EPOLLIN, 0.05) == 0  # nothing came: it returns after its 50 ms
        server.send(b"x")
        assert nb03.poll_until(ep, select.EPOLLIN, 5.0) == select.EPOLLIN
