"""The notebook demonstrations measure what they claim, on this kernel."""

import re

import pytest

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
    assert [r[1] for r in rows] == ["EPOLLOUT", "(not reported)", "(not reported)"]
    assert [r[2] for r in rows] == ["EPOLLOUT"] * 3
    assert not any("EPOLLET" in cell for r in rows for cell in r[1:]), "epoll_wait never reports EPOLLET"


def test_edge_triggered_reports_every_matching_wakeup_with_the_full_mask():
    rows = {r[0]: r[1:] for r in explain.edge_triggered_wakeups().rows}
    # not "only when writability becomes true": each byte arriving reports EPOLLOUT again
    assert rows["the peer sends 1 byte; epoll_wait"] == ["EPOLLIN|EPOLLOUT", "read handler, then write handler"]
    assert rows["the peer sends 1 more byte; epoll_wait"][0] == "EPOLLIN|EPOLLOUT"
    # ...and nothing between wakeups, even with unread data
    assert rows["epoll_wait again: the byte is still unread"][0] == "(nothing)"
    assert rows["the peer shuts down its side (FIN); epoll_wait"][0] == "EPOLLIN|EPOLLOUT|EPOLLRDHUP"


def test_close_removes_the_registration_only_with_the_last_reference():
    rows = explain.close_with_a_duplicate().rows
    assert rows[0][2] == "(nothing)"
    assert rows[1][2] == "EPOLLIN, for the closed descriptor", "reported for a closed number: a dup holds the file"


def test_extras_title_counts_the_rows_it_shows():
    import nbconn

    with lab.listening(hold=True) as up:
        table = explain.extras_beyond_nginx(nbconn.connect(up))
    counted = sum(int(r[1]) for r in table.rows)
    assert table.title == f"beyond nginx 1.22.1: {counted} extra syscalls in this trace"
    assert any(r[0].startswith("SOCK_CLOEXEC") and r[1] == "0" for r in table.rows), "a flag is not a syscall"


@pytest.mark.timing
def test_blocking_connect_gives_up_on_the_timer_wheel_grid(late_tolerance_ms):
    from nbconn.synretry import config_hz, wheel_lateness_s

    hz = config_hz()
    if hz is None:
        pytest.skip("CONFIG_HZ is not readable here")
    with lab.blackhole() as hole:
        rows = explain.blocking_connect_lateness(hole, timeouts_s=(0.3,), repeat=2).rows
    low, high = (float(x) for x in re.findall(r"-?[0-9.]+", rows[0][1])[:2])
    assert low >= -1.0, "a kernel timer is never early (1 ms for the clock reads)"
    assert high <= wheel_lateness_s(0.3, hz) * 1e3 + late_tolerance_ms(5)
    if rows[0][2] != "n/a":  # the timer's own lateness, the CPU wait taken out
        timer_high = float(re.findall(r"-?[0-9.]+", rows[0][2])[1])
        assert timer_high <= wheel_lateness_s(0.3, hz) * 1e3 + late_tolerance_ms(2)


def test_ip_bind_address_no_port_shares_local_ports_between_upstreams():
    from nbconn.lab import namespace_unavailable_reason

    if namespace_unavailable_reason():
        pytest.skip(namespace_unavailable_reason())
    rows = {r[0].split(",")[0] + (" bind" if "picks" in r[0] else ""): r[1:]
            for r in explain.local_port_exhaustion(ports=2, upstreams=2).rows}
    assert rows["none"] == ["4", "2, each used 2 times", "connect(): EADDRNOTAVAIL -> NGX_DECLINED"]
    assert rows["127.0.0.1"] == rows["none"], "nginx's IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect()"
    assert rows["127.0.0.1 bind"] == ["2", "2, each used 1 time", "bind(): EADDRINUSE -> NGX_ERROR"]


def test_so_error_returns_and_clears_the_soft_error_while_connecting():
    from nbconn.lab import namespace_unavailable_reason

    if namespace_unavailable_reason():
        pytest.skip(namespace_unavailable_reason())
    try:
        rows = explain.soft_error_while_connecting(syncnt=1).rows
    except RuntimeError as exc:  # IPv6 or iproute2 missing in the lab namespace
        pytest.skip(str(exc))
    assert rows[1][1:] == ["(nothing)", "SYN_SENT", "ENETUNREACH"], "sk_err_soft, with nothing reported"
    assert rows[2][2:] == ["SYN_SENT", "0"], "the read cleared it"
    assert rows[3][2:] == ["CLOSE", "ENETUNREACH"], "tcp_write_err reports the pending soft error, not ETIMEDOUT"


def test_add_reports_current_readiness_in_either_order():
    with lab.listening(hold=True) as up:
        rows = explain.register_order(up).rows
    assert [r[2] for r in rows] == ["EPOLLOUT", "EPOLLOUT"] and [r[4] for r in rows] == ["0", "0"]


def test_one_registration_sees_connect_and_reply():
    with lab.listening(http=True) as up:
        rows = dict(explain.one_registration(up).rows)
    assert rows["epoll_wait (until the reply and the peer's FIN)"] == "EPOLLIN|EPOLLOUT|EPOLLRDHUP"
    assert rows["recv()"].startswith("HTTP/1.")


def test_state_right_after_connect_and_other_ways():
    with lab.listening(hold=True) as up, lab.refused() as closed, lab.blackhole() as hole:
        targets = {"up": up, "closed": closed, "hole": hole}
        states = {r[0]: r[3] for r in explain.right_after_connect(targets).rows}
        other = {r[0]: r[2:] for r in explain.other_ways_to_learn(targets, wait_s=0.1).rows}
    assert states == {"up": "ESTABLISHED", "closed": "CLOSE", "hole": "SYN_SENT"}
    assert other["up"][:3] == ["an address", "0", "EISCONN"]
    assert other["closed"][:2] == ["ENOTCONN", "ECONNREFUSED"]
    assert other["hole"][:3] == ["ENOTCONN", "EALREADY", "EALREADY"]


def test_duration_units():
    assert explain.duration(52_300) == "52.3 µs" and explain.duration(200_336_300) == "200.3 ms"
    assert explain.duration(12.5e9) == "12.50 s" and explain.duration(1.5e9) == "1.50 s"


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


# -- the code on the page (notebook 00) --------------------------------------------------

def _strace(code: str) -> list[tuple]:
    from .conftest import require_tool

    require_tool("strace")
    return explain.strace_python(code)


def test_connect_nonb_makes_nginx_syscalls_in_nginx_order():
    with lab.listening(hold=True) as target:
        host, port = target.rsplit(":", 1)
        plain = _strace(f"from nbconn.connect_nonb import connect_nonb; print(connect_nonb({host!r}, {port}))")
    assert plain == list(explain.NGINX_WORKER_CALLS), plain


@pytest.mark.parametrize("peer", ["listening", "refused", "blackhole"])
def test_connect_nonb_matches_nbconn_in_nginx_exact_mode(peer):
    """Connected, refused (SO_ERROR 111) and timed out (the timer: no SO_ERROR read): the same calls in the same order."""
    start = {"listening": lambda: lab.listening(hold=True), "refused": lab.refused, "blackhole": lab.blackhole}[peer]
    with start() as target:
        host, port = target.rsplit(":", 1)
        plain = _strace(f"from nbconn.connect_nonb import connect_nonb; connect_nonb({host!r}, {port}, 0.2)")
        exact = _strace(f"import nbconn; nbconn.connect({target!r}, nginx_exact=True, timeout=0.2)")
    assert plain == exact, (plain, exact)
    if peer == "blackhole":
        assert ("getsockopt", "SO_ERROR") not in plain and plain[-1] == ("close",)


def test_connect_nonb_outcomes():
    from nbconn.connect_nonb import connect_nonb

    with lab.listening(hold=True) as up, lab.refused() as closed, lab.blackhole() as hole:
        def run(t, timeout_s=2.0):
            host, port = t.rsplit(":", 1)
            return connect_nonb(host, int(port), timeout_s)

        assert run(up).startswith("NGX_OK")
        assert run(closed) == "NGX_ERROR: ECONNREFUSED, try the next peer"
        assert run(hole, 0.05).startswith("NGX_HTTP_UPSTREAM_FT_TIMEOUT")


def test_notebook_00_shows_connect_nonb_character_for_character():
    import inspect
    import json
    import os

    from nbconn import connect_nonb

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "00_start_here.ipynb")
    with open(path) as f:
        cells = json.load(f)["cells"]
    shown = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    wanted = inspect.getsource(connect_nonb.connect_nonb).rstrip()
    assert any(wanted in src for src in shown), "notebook 00 must show nbconn/connect_nonb.py's function unchanged"


def test_setting_rcvbuf_stops_autotuning():
    rows = explain.rcvbuf_autotuning(total_bytes=8 << 20).rows
    assert rows[0][2].endswith("x larger") and float(rows[0][2].split("x")[0]) > 1.5, rows
    assert rows[1][2] == "unchanged", rows


def test_user_timeout_ends_the_handshake():
    with lab.blackhole() as hole:
        row = explain.user_timeout_in_handshake(hole, values_ms=(1500,)).rows[0]
    assert row[4] == "ETIMEDOUT"
    value, unit = row[3].split()
    seconds = float(value) * {"s": 1.0, "ms": 1e-3}[unit]
    assert 1.2 <= seconds <= 3.0, row  # about 1.5 s; generous for a loaded machine
