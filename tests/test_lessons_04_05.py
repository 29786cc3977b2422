"""Notebooks 04 and 05 write their connects in their cells (issue 20); these tests run those very cells and check
the claim against what they printed.

Each test executes the notebook's ``imports`` cell, the cell that defines its bare connect (04's
``start-connect``, 05's ``pending-connect``), then the cell of the claim, in one fresh namespace
(:func:`tests.test_lessons_00_05.run_cells`), and reads back the lines it printed or the names it left.
"""

import errno
import re

import pytest

from nbconn.lab import namespace_unavailable_reason

from .test_lessons_00_05 import run_cells


def _printed(capsys, number: str, *ids: str) -> tuple[dict, list[str]]:
    capsys.readouterr()  # what came before is not this cell's
    seen = run_cells(number, *ids)
    return seen, capsys.readouterr().out.splitlines()


def _row(lines: list[str], label: str) -> str:
    (line,) = [line for line in lines if line.startswith(label + " ")]
    return line


# -- 04 ------------------------------------------------------------------------------------------------------

def test_04_loopback_tcp_answers_einprogress_and_af_unix_at_once(no_fd_leak, capsys):
    """Row 04/kernel-answers: 20 of 20 bare non-blocking connects answer EINPROGRESS on loopback TCP, even to a
    closed port; AF_UNIX answers in the call: 0, EAGAIN (backlog full), ENOENT (no such path)."""
    _, lines = _printed(capsys, "04", "start-connect", "kernel-answers")
    expected = {"TCP 127.0.0.1 listening": "EINPROGRESS 20/20", "TCP ::1 listening": "EINPROGRESS 20/20",
                "TCP closed port": "EINPROGRESS 20/20", "AF_UNIX listening": "0 20/20",
                "AF_UNIX backlog full": "EAGAIN 20/20", "AF_UNIX missing path": "ENOENT 20/20"}
    for label, counts in expected.items():
        assert _row(lines, label)[25:].startswith(counts + " "), (label, lines)


def test_04_the_tcp_state_right_after_connect_returned(no_fd_leak, capsys):
    """Rows 04/right-after, 00/sequence-diagram: connect() returned EINPROGRESS, and by then the loopback handshake
    was already over (ESTABLISHED), the RST already in (CLOSE), or the SYN still unanswered (SYN_SENT)."""
    _, lines = _printed(capsys, "04", "start-connect", "right-after")
    for label, state in {"listening port": "ESTABLISHED", "closed port": "CLOSE", "black hole": "SYN_SENT"}.items():
        row = _row(lines, label)
        assert row.split()[-1] == state and " EINPROGRESS " in row, (label, lines)


def test_04_ip_bind_address_no_port_shares_local_ports_between_upstreams(no_fd_leak, capsys):
    """Row 04/port-exhaustion: 4 local ports and 2 upstreams keep 8 connections without a local address and with
    nginx's IP_BIND_ADDRESS_NO_PORT then bind(), then connect() fails (EADDRNOTAVAIL); a bind() that picks the
    port keeps 4, one per port, then bind() fails (EADDRINUSE)."""
    if namespace_unavailable_reason():
        pytest.skip(namespace_unavailable_reason())
    _, lines = _printed(capsys, "04", "keep-connecting", "port-exhaustion")
    # f"{label:62} {kept:<5} {ports:21} {failed}"
    row = {label: [_row(lines, label)[63:68].strip(), _row(lines, label)[69:90].strip(), _row(lines, label)[91:]]
           for label in ("none", "127.0.0.1, IP_BIND_ADDRESS_NO_PORT then bind() (nginx 1.22.1)",
                         "127.0.0.1, bind() picks the port")}
    assert row["none"] == ["8", "4, each used 2 times", "connect(): EADDRNOTAVAIL -> NGX_DECLINED"], lines
    assert row["127.0.0.1, IP_BIND_ADDRESS_NO_PORT then bind() (nginx 1.22.1)"] == row["none"], lines
    assert row["127.0.0.1, bind() picks the port"] == ["4", "4, each used 1 time", "bind(): EADDRINUSE -> NGX_ERROR"]


# -- 05 ------------------------------------------------------------------------------------------------------

def test_05_the_first_so_error_read_clears_it(no_fd_leak, capsys):
    """Row 05/so-error-twice: against a closed port, SO_ERROR reads 111 (ECONNREFUSED) once, then 0."""
    seen, _ = _printed(capsys, "05", "pending-connect", "so-error-twice")
    assert seen["err"] == errno.EINPROGRESS
    assert (seen["first"], seen["second"]) == (errno.ECONNREFUSED, 0)


def test_05_so_error_returns_and_clears_a_soft_error_while_connecting(no_fd_leak, capsys):
    """Row 05/soft-error: with the route gone, SO_ERROR says ENETUNREACH while nothing was reported and the state
    is SYN_SENT; the read clears it; when the kernel gives up (TCP_SYNCNT 1) the connect ends with ENETUNREACH."""
    if namespace_unavailable_reason():
        pytest.skip(namespace_unavailable_reason())
    _, lines = _printed(capsys, "05", "pending-connect", "soft-error")
    if any("IPv6 is off" in line for line in lines):
        pytest.skip(lines[0])
    (pending,) = [line for line in lines if line.startswith("epoll_wait(1.5 s):")]
    assert pending.split(":", 1)[1].split() == ["(nothing),", "SYN_SENT,", "SO_ERROR", "ENETUNREACH,", "read",
                                                "again", "at", "once:", "0"], lines
    (gave_up,) = [line for line in lines if line.startswith("the kernel gave up")]
    assert re.search(r", CLOSE, SO_ERROR ENETUNREACH \(not ETIMEDOUT\)$", gave_up), lines


def test_05_other_ways_to_learn_the_outcome(no_fd_leak, capsys):
    """Row 05/other-ways: getpeername() gives ENOTCONN while pending or after a failure; connect() again gives
    EALREADY while pending, 0 then EISCONN after success, and after a refusal ECONNREFUSED (consuming it)."""
    # the cell uses name(), which notebook 05 defines in its soft-error cell (before that cell's try: run anywhere)
    _, lines = _printed(capsys, "05", "pending-connect", "soft-error", "other-ways")
    rows = {}
    for label in ("listening port", "closed port", "black hole"):
        row = _row(lines, label)  # f"{label:15} {mask:46} {peer:14} {again:16} {third:12} {last}"
        rows[label] = [row[63:77].strip(), row[78:94].strip(), row[95:107].strip(), row[108:].strip()]
    assert rows["listening port"][:3] == ["an address", "0", "EISCONN"], lines
    assert rows["closed port"][:2] == ["ENOTCONN", "ECONNREFUSED"], lines
    assert rows["black hole"][:3] == ["ENOTCONN", "EALREADY", "EALREADY"], lines
