"""measure: summaries on small N against real peers; plots: the data drawn is the data measured."""

import json
import subprocess
import sys

import pytest

import nbconn
from nbconn import lab
from nbconn.experiments import measure
from nbconn.view import plots
from nbconn.experiments.measure import Measurement, percentiles


def test_percentiles_nearest_rank():
    p = percentiles(list(range(1, 101)))
    assert (p["p50"], p["p90"], p["p99"], p["p99.9"], p["max"]) == (50, 90, 99, 100, 100)
    assert percentiles([None, float("nan")]) == {}


def test_listening_summary():
    m = measure.run("listening", count=50)
    s = m.summary()
    assert s["count"] == 50 and s["outcomes"] == {"connected": 50}
    assert s["connect_returned"] == {"EINPROGRESS": 50}
    assert 0 < s["handshake_ms"]["p50"] <= s["handshake_ms"]["p99"] <= s["handshake_ms"]["max"] < 1000
    assert s["tcpi_rtt_ms"]["p50"] > 0


def test_blackhole_ecdf_ends_at_the_timeout():
    m = measure.run("blackhole", count=8, concurrency=8, timeout=0.15)
    assert m.outcome_counts() == {"timed_out": 8}
    fig = plots.ecdf(m)
    xs, ys = fig.axes[0].lines[0].get_data()
    assert ys[-1] == 1.0
    assert 150 <= xs[-1] <= 200  # the last connect was decided by the 150 ms timer, within 50 ms


def test_histogram_counts_sum_to_n_and_units_on_axes():
    m = measure.run("refused", count=40, concurrency=4)
    fig = plots.histogram(m)
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 40  # one bar per bin, every connect in one bin
    assert "(ms)" in ax.get_xlabel() and ax.get_ylabel() == "connects"


def test_outcome_bars_match_counts():
    with lab.listening() as up, lab.refused() as down:
        results = nbconn.connect_many([up, down, down], timeout=1)
    m = Measurement.from_results(results, label="mixed", scenario="target", timeout_s=1, concurrency=64)
    fig = plots.outcomes(m)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert sorted(heights) == [1, 2]


def test_timeline_has_one_marker_per_step_and_gantt_one_bar_per_connect():
    with lab.refused() as target:
        res = nbconn.connect(target)
    fig = plots.timeline(res)
    calls = [line for line in fig.axes[0].lines if line.get_gid() == "call"]
    events = [line for line in fig.axes[0].lines if line.get_gid() == "event"]
    assert len(calls) + len(events) == len(res.steps)
    # each call a bar from the moment it was called to the moment it returned (a dot at the return put
    # connect() after the packets it sent)
    t0 = res.started_ns
    for line, step in zip(calls, [s for s in res.steps if s.name not in ("timer", "timeout")]):
        start, end = line.get_xdata()
        assert start == (step.t_start_ns - t0) / 1e3 and end >= (step.t_ns - t0) / 1e3
    assert calls[0].get_xdata()[0] == 0  # time 0 is the call to socket()
    # one row per step, labelled with its name: nothing piles up at 0
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == len(res.steps) and labels[0].endswith("socket")
    with lab.listening() as up, lab.blackhole() as hole:
        batch = nbconn.connect_many([up, hole] * 5, concurrency=4, timeout=0.05)
    g = plots.gantt(batch)
    assert len(g.axes[0].patches) == 10


def test_compare_and_syn_timeline_return_figures():
    a = measure.run("listening", count=10, label="a")
    b = measure.run("refused", count=10, label="b")
    fig = plots.compare([a, b], log_x=True)
    assert len(fig.axes) == 2
    # shares, not counts: no bin of a 10-connect run reaches above 1
    assert all(p.get_xy()[:, 1].max() <= 1.0 for p in fig.axes[0].patches)
    s = plots.syn_timeline([{"label": "x", "sent_s": [0, 1], "predicted_s": [0, 1], "failed_s": 3.0,
                             "predicted_failed_s": 3.0, "predicted_late_s": 0.1}])
    assert s.axes[0].get_xscale() == "symlog" and s.axes[0].get_xlabel().startswith("time since connect() (s")


def test_every_plot_has_a_fixed_size_and_distributions_show_shares():
    a = measure.run("listening", count=30, label="a")
    b = measure.run("listening", count=10, label="b")
    fig = plots.distributions([a, b], zoom_ms=(0.0, 1.0))
    assert tuple(fig.get_size_inches()) == (12.0, 3.8) and len(fig.axes) == 3
    left = fig.axes[0]
    import numpy as np

    # outline histograms are one Polygon per run; the heights are shares: they sum to 1 per run
    for patch in left.patches:
        assert patch.get_xy()[:, 1].max() <= 1.0
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("a: p50 ") and "(n=30)" in labels[0]
    late = plots.timer_lateness([measure.run("blackhole", count=3, concurrency=3, timeout=0.05, label="t")])
    xs = late.axes[0].lines[0].get_xdata()
    assert len(xs) == 3 and all(x >= 0 for x in xs)  # a timer never fires before its deadline
    assert np.all(np.isfinite(xs))


def test_measurement_json_round_trip():
    m = measure.run("listening", count=5, label="rt")
    back = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.summary() == m.summary()


@pytest.mark.parametrize("kwargs, words", [
    ({"count": 0}, "count=0"),
    ({"count": 1.5}, "count must be a whole number"),
    ({"concurrency": 0}, "concurrency=0"),
    ({"timeout": -1}, "timeout=-1"),
    ({"delay_ms": 5}, "only apply to the 'impaired' scenario"),
    ({"bogus": 1}, "unknown setting 'bogus'"),
])
def test_bad_measure_input_named(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as info:
        measure.run("listening", **kwargs)
    assert words in str(info.value)


def test_unknown_scenario_named():
    with pytest.raises(ValueError, match="'nothing' is neither a scenario"):
        measure.run("nothing")


def test_measure_cli_json_shape_and_exit_codes():
    out = subprocess.run([sys.executable, "-m", "nbconn", "measure", "refused", "--count", "5", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"scenario", "count", "outcomes", "handshake_ms", "tcpi_rtt_ms"}
    assert data["outcomes"] == {"refused": 5} and set(data["handshake_ms"]) == {"p50", "p90", "p99", "max"}
    bad = subprocess.run([sys.executable, "-m", "nbconn", "measure", "listening", "--count", "-2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "count=-2" in bad.stderr


def test_scaling_rows_and_plot():
    rows = measure.scaling("listening", [1, 4], count=50, label="lo")
    assert [r["concurrency"] for r in rows] == [1, 4] and all(r["connects_per_s"] > 0 for r in rows)
    fig = plots.scaling(rows, ideal_rtt_ms={"lo": 20})
    left = fig.axes[0]
    assert list(left.lines[0].get_xdata()) == [1, 4]
    assert left.get_ylabel() == "connects per second"
    assert list(left.lines[1].get_ydata()) == pytest.approx([50, 200])  # the ideal C / RTT line


def test_rtt_vs_handshake_draws_only_unretransmitted_connects():
    m = measure.run("listening", count=20)
    m.tcpi_total_retrans[0] = 1  # pretend the first one needed a retransmission
    fig = plots.rtt_vs_handshake(m)
    offsets = fig.axes[0].collections[0].get_offsets()
    assert len(offsets) == 19
    # y is the difference handshake - tcpi_rtt in µs, for the same connects
    kept = [(h - r) * 1e3 for h, r, t in zip(m.handshake_ms, m.tcpi_rtt_ms, m.tcpi_total_retrans) if not t]
    assert list(offsets[:, 1]) == pytest.approx(kept)


def _synthetic(label, handshakes_ms, rtts_ms):
    return Measurement(label=label, scenario="impaired", timeout_s=5.0, concurrency=1, outcome=["connected"] * len(
        handshakes_ms), handshake_ms=list(handshakes_ms), tcpi_rtt_ms=list(rtts_ms),
        tcpi_total_retrans=[0] * len(handshakes_ms))


def test_a_link_keeps_its_colour_from_one_figure_to_the_next():
    """08 draws the loopback run and three links, then only the links: "20 ms RTT" was orange, then blue."""
    from matplotlib.colors import to_hex

    loopback = _synthetic("loopback", [0.01, 0.02, 0.03], [0.01, 0.01, 0.01])
    links = [_synthetic(label, [20.1, 20.4, 21.0], [20.0, 20.1, 20.2])
             for label in ("20 ms RTT", "20 ms RTT, jitter 2 ms", "20 ms RTT, 2% loss")]
    dist = plots.distributions([loopback, *links], zoom_ms=(15, 25))
    tail = {line.get_label(): to_hex(line.get_color()) for line in dist.axes[2].lines}
    scatter = plots.rtt_vs_handshake(links)
    dots = {c.get_label().split(":")[0]: to_hex(c.get_facecolor()[0]) for c in scatter.axes[0].collections}
    assert set(dots) == {m.label for m in links}
    for label, colour in dots.items():
        assert tail[label] == colour == plots.RUN_COLOURS[label], label
    # a label the table does not know never takes a link's colour
    others = plots.run_colours(["a", "b", "20 ms RTT"])
    assert others["20 ms RTT"] == plots.RUN_COLOURS["20 ms RTT"]
    assert others["a"] != others["b"] and not {others["a"], others["b"]} & set(plots.RUN_COLOURS.values())


def test_time_segments_break_the_axis_only_where_one_linear_axis_squeezes_the_calls():
    us, ms, s = 1_000, 1_000_000, 1_000_000_000
    loopback = [0, 10 * us, 12 * us, 20 * us, 27 * us, 49 * us, 65 * us, 78 * us, 115 * us, 167 * us, 174 * us]
    assert plots.time_segments(loopback) == [(0, 174 * us)]
    # a normal user's socket() from the lab's helper: 211 µs of 357 is drawn as it is, 2230 µs of 2376 is not
    assert len(plots.time_segments([0, *(x + 211 * us for x in loopback[1:]), 357 * us])) == 1
    helper = [0, *(2230 * us + x for x in loopback[1:])]
    assert plots.time_segments(helper) == [(0, 0), (2230 * us + 10 * us, helper[-1])]
    # a 20 ms link: the calls up to connect() in one part, the SYN-ACK and the decision in the other
    link = [0, 10 * us, 20 * us, 30 * us, 60 * us, 80 * us, 20 * ms, 20 * ms + 30 * us, 20 * ms + 60 * us]
    assert plots.time_segments(link) == [(0, 80 * us), (20 * ms, 20 * ms + 60 * us)]
    # a black hole: the break falls before the first resent SYN, never between SYNs a second apart
    hole = [0, 10 * us, 20 * us, 44 * us, 60 * us, 1 * s + 9 * ms, 2 * s + 30 * ms, 2 * s + 500 * ms]
    assert plots.time_segments(hole) == [(0, 60 * us), (1 * s + 9 * ms, 2 * s + 500 * ms)]
    assert plots.time_segments([]) == [(0, 0)]
