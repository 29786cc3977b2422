"""The notebook demonstrations measure what they claim, on this kernel."""

import re

from nbconn import explain, lab
from nbconn.explain import Table


def test_table_renders_text_and_html_with_highlight():
    t = Table(["a", "b"], [[1, "x"], [22, "y"]], title="t", highlight=lambda r: r[0] == "22")
    text = repr(t)
    assert text.splitlines()[0] == "t" and text.endswith("<-")
    assert "<table>" in t._repr_html_() and "background" in t._repr_html_()


def test_rcvbuf_is_doubled_and_capped():
    rows = explain.rcvbuf_readback(values=(4096, 1 << 30)).rows
    assert rows[0][1] == "8192" and rows[0][2] == "doubled"
    assert rows[1][2] == "capped: 2 x rmem_max"


def test_edge_reports_once_level_every_time():
    rows = explain.edge_vs_level(rounds=3).rows
    assert "edge" in rows[0][1] and all("edge" not in r[1] for r in rows[1:])
    assert all("level" in r[1] for r in rows)


def test_connect_returns_and_so_error_clears():
    with lab.refused() as closed, lab.unix_full() as full:
        t = explain.connect_returns({"closed": closed, "full": full}, repeat=3)
        assert t.rows[0][1] == "EINPROGRESS 3/3" and t.rows[1][1] == "EAGAIN 3/3"
        rows = dict(explain.so_error_twice(closed).rows)
    assert rows["getsockopt(SO_ERROR) #1"].startswith("111") and rows["getsockopt(SO_ERROR) #2"].startswith("0")


def test_blocking_connect_is_bounded_by_sndtimeo():
    with lab.blackhole() as hole:
        rows = explain.blocking_vs_nonblocking(hole, timeout_s=0.2).rows
    assert rows[0][2] == "EINPROGRESS" and rows[1][2] == "EINPROGRESS"


def test_rdhup_seen_when_peer_closes():
    with lab.listening() as up:
        assert "EPOLLRDHUP" in explain.rdhup_after_peer_close(up)


def test_setblocking_is_ioctl_fionbio_under_strace():
    from .conftest import require_tool

    require_tool("strace")
    rows = dict(explain.nonblocking_syscalls().rows)
    # exactly one ioctl(FIONBIO) and nothing else for setblocking(False) (CPython's internal_setblocking on Linux)
    assert re.fullmatch(r"ioctl\(\d+, FIONBIO, \[1\]\)", rows["sock.setblocking(False)"]), rows
    # fcntl: read the flags, then set them with O_NONBLOCK added
    get, put = rows["fcntl(O_NONBLOCK)"].split("; ")
    assert "F_GETFL" in get and "F_SETFL" in put and "O_NONBLOCK" in put, rows
