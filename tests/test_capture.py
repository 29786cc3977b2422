"""The packet capture: real segments from real connects, on the trace's clock; the CLI forms of issue 14.

The packet socket needs CAP_NET_RAW: these tests run as root, or (for a normal user) inside a lab
namespace once the flow makes its sockets there; otherwise they skip with the reason.
"""

import json
import os
import subprocess
import sys
import time

import pytest

import nbconn
from nbconn.view import plots
from nbconn.experiments import nb11
from nbconn.lab import capture, listening, refused

from .conftest import open_fds, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "nbconn", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def need_packet_socket():
    """A packet socket of our own on the host's loopback: root."""
    reason = capture.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def need_some_capture():
    """Root, or a lab namespace (a normal user): what nb11.shoot and nb11.accuracy need."""
    if capture.unavailable_reason() is None:
        return
    from nbconn.lab import namespace_unavailable_reason

    reason = namespace_unavailable_reason()
    if reason is not None:
        pytest.skip(f"{capture.unavailable_reason()}; and no lab namespace: {reason}")


def rootless_or_skip(call):
    """Run ``call``; as a normal user, skip (with the reason) if the flow cannot make its sockets in a namespace."""
    try:
        return call()
    except RuntimeError as exc:
        if "nbconn.socketsource" in str(exc):
            pytest.skip(str(exc))
        raise


def test_clock_pair_is_tight():
    offset, error = capture.clock_offset_ns()
    assert error < 50_000  # half the tightest monotonic-realtime-monotonic window: far below the µs scale
    assert abs(offset - (time.time_ns() - time.monotonic_ns())) < 10_000_000


def test_flags_in_tcpdump_letters():
    assert [capture.flags_text(b) for b in (0x02, 0x12, 0x10, 0x04, 0x14, 0x11, 0x18)] == \
        ["S", "SA", "A", "R", "RA", "FA", "PA"]


def test_the_filter_is_a_valid_program_for_both_link_layouts():
    for header in (0, 14):
        prog = capture.tcp_port_filter(8080, header)
        assert len(prog) % 8 == 0 and len(prog) // 8 == 21


def read_until(cap, enough, timeout_s: float = 5.0) -> bool:
    """Read the capture until ``enough(cap.packets)``: the packets are the event, not a sleep."""
    return wait_for(lambda: cap.read() is not None and enough(cap.packets), timeout_s)


def test_handshake_packets_on_the_trace_clock(no_fd_leak):
    need_packet_socket()
    with listening(hold=True) as peer, capture.Capture(peer.port) as cap:
        res = nbconn.connect(peer, keep=True)
        client_port = res.sock.getsockname()[1]
        res.close()
        assert read_until(cap, lambda packets: len(capture.for_client_port(packets, client_port)) >= 3)
    packets = capture.for_client_port(cap.packets, client_port)
    assert [(p.dir, p.flags) for p in packets][:3] == [("out", "S"), ("in", "SA"), ("out", "A")]
    connect_called = res.started_ns
    decided = next(s.t_ns for s in res.steps if s.name == "so_error")
    # one clock: the SYN leaves after socket() was called and the SYN-ACK arrives before SO_ERROR said 0
    assert connect_called < packets[0].t_ns < packets[1].t_ns < decided
    wire = capture.wire_handshake_ns(packets)
    assert 0 < wire < res.handshake_ns


def test_refused_is_syn_then_rst_ack():
    need_packet_socket()
    with refused() as peer, capture.Capture(peer.port) as cap:
        res = nbconn.connect(peer)
        assert read_until(cap, lambda packets: len(packets) >= 2)
    assert res.outcome == "refused"
    assert [(p.dir, p.flags) for p in cap.packets] == [("out", "S"), ("in", "RA")]


def test_other_ports_are_filtered_out():
    need_packet_socket()
    with listening() as mine, listening() as other, capture.Capture(mine.port) as cap, \
            capture.Capture(other.port) as witness:
        nbconn.connect(other)
        # the witness on the other port saw the handshake: by then this capture had its chance to see it too
        assert read_until(witness, lambda packets: len(packets) >= 3)
        cap.read()
    assert cap.packets == []


def test_blackhole_shows_the_syn_sent_again():
    need_some_capture()
    shot = rootless_or_skip(lambda: nb11.shoot("blackhole", timeout=1.3))
    assert shot.result.outcome == "timed_out"
    syns = [p for p in shot.packets if p.flags == "S"]
    assert len(syns) == 2 and syns[1].retransmission and not syns[0].retransmission
    assert syns[1].t_ns - syns[0].t_ns >= 900_000_000  # the initial retransmission timeout is 1 s


def test_syncookie_clients_connect_while_the_server_drops_their_final_ack(no_fd_leak):
    from nbconn.lab import wire_unavailable_reason

    if wire_unavailable_reason() is not None:
        pytest.skip(wire_unavailable_reason())
    shot = nb11.shoot("syncookie", burst=10, delay_ms=5)
    assert all(r.connected for r in shot.results)
    assert shot.counters["SyncookiesSent"] >= 1 and shot.counters["ListenOverflows"] >= 1
    assert [(p.dir, p.flags) for p in shot.packets][:3] == [("out", "S"), ("in", "SA"), ("out", "A")]
    assert "dropped its final ACK" in shot.note


def test_accuracy_compares_every_connect(no_fd_leak):
    need_some_capture()
    acc = rootless_or_skip(lambda: nb11.accuracy(50, batch=20))
    assert len(acc.nbconn) + acc.skipped == 50 and acc.skipped <= 5
    assert all(w > 0 for w in acc.wire)
    # the SYN goes out after the clock read before connect(), the SYN-ACK arrives before SO_ERROR returns
    assert all(b > 0 for b in acc.before_syn) and all(a > 0 for a in acc.after_synack)
    summary = acc.summary()
    assert set(summary["difference_us"]) == {"p50", "p99", "max"}


def test_bad_input_before_any_socket():
    before = open_fds()
    for kwargs, error in ((dict(port=0), ValueError), (dict(port="80"), TypeError),
                          (dict(port=80, interface="x" * 20), ValueError)):
        with pytest.raises(error):
            capture.Capture(**kwargs)
    for kwargs, error in ((dict(scenario="nope"), ValueError), (dict(scenario="impaired", delay_ms=-1), ValueError),
                          (dict(scenario="impaired", delay_ms="5"), TypeError),
                          (dict(scenario="blackhole", timeout=0), ValueError),
                          (dict(scenario="slow-accept", burst=1), ValueError)):
        with pytest.raises(error):
            nb11.shoot(**kwargs)
    with pytest.raises(ValueError):
        nb11.accuracy(0)
    assert open_fds() == before


# -- the CLI forms ------------------------------------------------------------------------------

def test_cli_capture_json_one_clock():
    need_some_capture()
    proc = cli("capture", "refused", "--json")
    if proc.returncode == 1 and "nbconn.socketsource" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [(p["dir"], p["flags"]) for p in data["packets"]] == [("out", "S"), ("in", "RA")]
    assert all({"t_ns", "dir", "flags"} <= set(p) for p in data["packets"])
    steps = {s["step"]: s["t_ns"] for s in data["steps"]}
    assert steps["socket"] < data["packets"][0]["t_ns"] < steps["so_error"]


def test_cli_capture_bad_input_is_one_line_exit_2():
    for args in (["capture", "nope"], ["capture", "impaired", "--delay-ms", "-3"], ["capture", "blackhole",
                                                                                    "--timeout", "abc"]):
        proc = cli(*args)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_capture_without_privilege_runs_in_a_namespace_or_says_why():
    if capture.unavailable_reason() is None:
        pytest.skip("this process can open packet sockets")
    proc = cli("capture", "refused")
    assert proc.returncode in (0, 1), proc.stderr
    if proc.returncode == 1:
        assert proc.stderr.startswith("nbconn: cannot capture here:") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    else:
        assert "lab namespace" in proc.stdout and "S> RA<" in proc.stdout


def test_cli_connect_several_targets_walks_them_in_order():
    from nbconn.lab import blackhole

    with blackhole() as hole, listening() as up:
        proc = cli("connect", hole, up, "--timeout", "0.2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["winner"] == str(up) and isinstance(data["elapsed_ms"], float)
    assert [a["outcome"] for a in data["attempts"]] == ["timed_out", "connected"]
    assert data["elapsed_ms"] >= 200


def test_cli_connect_happy_eyeballs():
    from nbconn.lab import blackhole

    with blackhole() as hole, listening() as up:
        proc = cli("connect", hole, up, "--happy-eyeballs", "0.05", "--timeout", "5", "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == 0 and data["winner"] == str(up)
    assert [a["errno"] for a in data["attempts"]] == ["ECANCELED", None]
    assert data["elapsed_ms"] < 4000


def test_cli_connect_nobody_exit_1_and_null_winner():
    with refused() as down:
        proc = cli("connect", down, down, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["winner"] is None


def test_cli_connect_bad_happy_eyeballs_one_line():
    for args in (["-1"], ["nan"], ["1", "--happy-eyeballs", "2"]):
        proc = cli("connect", "127.0.0.1:1", "127.0.0.1:2", "--happy-eyeballs", *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert "--happy-eyeballs" in proc.stderr


# -- the packet figure (notebook 11): plots.packets of nb11's shots ------------------------------------

US = 1000  # ns


def _shot(scenario, steps, segments, note=""):
    """A Shot from recorded steps ``(name, start_us, end_us)`` and segments ``(dir, flags, t_us, again)``."""
    from nbconn.result import Result

    base = 10**12
    res = Result(target="127.0.0.1:1", family="AF_INET", outcome="connected")
    res.started_ns = base + steps[0][1] * US
    connect = next(s for s in steps if s[0] == "connect")
    res.handshake_ns = (steps[-1][2] - connect[1]) * US
    for name, start, end in steps:
        res.recorder()((name, name + "(...)", 0, base + start * US, base + end * US))
    packets = [capture.Packet(base + t * US, d, flags, "127.0.0.1", "127.0.0.1", 1, 2, 0, 0, 0, again)
               for d, flags, t, again in segments]
    return nb11.Shot(scenario, res, packets, [res], packets, "synthetic", 0, note)


def _calls(socket_us):
    """socket() taking ``socket_us``, then the rest of a loopback connect; the handshake inside connect()."""
    s = socket_us
    return [("socket", 0, s), ("nonblocking", s + 1, s + 6), ("epoll_ctl", s + 7, s + 12),
            ("connect", s + 13, s + 100), ("timer", s + 100, s + 100), ("epoll_wait", s + 120, s + 130),
            ("so_error", s + 132, s + 135), ("tcp_info", s + 140, s + 145)], \
        [("out", "S", s + 40, False), ("in", "SA", s + 55, False), ("out", "A", s + 70, False),
         ("out", "FA", s + 300, False)]


def _line(fig, gid):
    return [(ax, line) for ax in fig.axes for line in ax.lines if line.get_gid() == gid]


def _texts(fig):
    """Every piece of text drawn, with its box: flags, tick labels in view, axis labels, titles, the legend."""
    fig.draw_without_rendering()
    renderer = fig._get_renderer()
    boxes = []
    for ax in fig.axes:
        lo, hi = sorted(ax.get_xlim())
        shown = [t for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= x <= hi]
        for t in [*ax.texts, *shown, *ax.get_yticklabels(), ax.xaxis.label]:
            if t.get_visible() and t.get_text():
                boxes.append((t.get_text(), t.get_window_extent(renderer)))
    for sub in fig.subfigs:
        boxes.append((sub._suptitle.get_text(), sub._suptitle.get_window_extent(renderer)))
    boxes += [("legend", legend.get_window_extent(renderer)) for legend in fig.legends]
    return boxes


def _overlaps(fig):
    boxes = _texts(fig)
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


def test_packet_figure_time_zero_is_socket_for_root_and_for_a_normal_user():
    """As a normal user socket() is made by the lab's helper (2230 µs in the issue): the axis still starts at
    the call to socket(), not ~300 µs before the first dot, and the handshake is not squeezed into a sliver."""
    root = _shot("listening", *_calls(10))
    user = _shot("listening", *_calls(2230))
    fig = plots.packets([root, user])
    (ax_root, bar_root), = _line(fig.subfigs[0], "socket")
    (ax_user, bar_user), *_ = _line(fig.subfigs[1], "socket")
    for ax, bar in ((ax_root, bar_root), (ax_user, bar_user)):
        left, right = ax.get_xlim()
        assert bar.get_xdata()[0] == 0  # socket() was called at time 0
        assert -0.05 * (right - left) <= left <= 0, (left, right)
    # the normal user's panel breaks its axis: the calls after socket() get a part of their own
    assert len(fig.subfigs[0].axes) == 1 and len(fig.subfigs[1].axes) == 2


def test_packet_figure_draws_calls_from_start_to_return_so_the_syn_sits_inside_connect():
    fig = plots.packets([_shot("listening", *_calls(10))])
    (ax, connect), = _line(fig, "connect")
    (_, syn), = _line(fig, "segment out S")
    start, end = connect.get_xdata()
    assert (start, end) == (23, 110)  # µs since socket(): called at 23, returned at 110
    assert start < syn.get_xdata()[0] < end
    # after the decision (SO_ERROR) nothing is drawn: no TCP_INFO, no FIN of the close
    assert not _line(fig, "tcp_info") and not _line(fig, "segment out FA")


def test_packet_figure_has_a_legend_and_no_label_overprints_another():
    """11 showed "connect()" over "SO_ERROR" and "S again" over "A": segments microseconds apart."""
    crowded = _shot("slow-accept", [("socket", 0, 3), ("connect", 10, 14), ("timer", 14, 14),
                                    ("epoll_wait", 300, 1_020_900), ("so_error", 1_021_000, 1_021_001)],
                    [("out", "S", 12, False), ("out", "S", 1_016_900, True), ("in", "SA", 1_016_901, False),
                     ("out", "A", 1_016_902, False), ("out", "PA", 1_016_903, False)],
                    note="a long note about the server's counters, " * 6)
    # a late part 0.35 ms wide at 1012 ms: tick labels like "1012.75" side by side
    narrow = _shot("slow-accept", [("socket", 0, 3), ("connect", 10, 14), ("timer", 14, 14),
                                   ("epoll_wait", 300, 1_012_800), ("so_error", 1_012_990, 1_012_991)],
                   [("out", "S", 12, False), ("out", "S", 1_012_650, True), ("in", "SA", 1_012_760, False),
                    ("out", "A", 1_012_761, False)])
    fig = plots.packets([crowded, narrow, _shot("listening", *_calls(10))])
    assert _overlaps(fig) == []
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    for entry in ("segment out", "segment in", "sent again", "timer armed", "step 1 socket()"):
        assert entry in legend
    # a phone shows the figure 358-760 px wide: it is drawn narrow, so its text is not shrunk much
    assert fig.get_figwidth() <= 6.5


def test_packet_figure_of_real_connects_overprints_nothing(no_fd_leak):
    need_some_capture()
    shots = rootless_or_skip(lambda: [nb11.shoot("listening"), nb11.shoot("refused")])
    fig = plots.packets(shots)
    assert _overlaps(fig) == []
    # on loopback the SYN leaves inside connect(), in each panel
    for sub in fig.subfigs:
        # a normal user's socket() comes from the lab's helper and can take long enough that the panel breaks its
        # axis in two (each part in its own unit): compare connect() and the SYN on the part that holds the SYN
        (ax, syn), = _line(sub, "segment out S")
        (connect,) = [line for a, line in _line(sub, "connect") if a is ax]
        start, end = connect.get_xdata()
        assert start <= syn.get_xdata()[0] <= end


def test_merged_timeline_starts_at_socket_and_lists_the_handshake_inside_connect():
    """The text timeline began at "2230.4 µs socket(...)" for a normal user: the time socket() *returned*."""
    lines = _shot("listening", *_calls(2230)).timeline().splitlines()
    assert lines[1].split()[:4] == ["0.0", "µs", "2230.0", "µs"] and "socket(" in lines[1]
    connect = next(i for i, line in enumerate(lines) if "connect(" in line)
    called, returned = float(lines[connect].split()[0]), float(lines[connect].split()[2])
    wire = [float(line.split()[0]) for line in lines if "[wire]" in line]
    assert len(wire) == 3 and all(called < t < returned for t in wire)  # the FIN after the decision is not listed
