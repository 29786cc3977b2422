"""Plots of connects: distributions, one connect's timeline, a batch as a Gantt chart.

Every function builds a fresh ``matplotlib.figure.Figure`` with the object API
(no pyplot state: a notebook cell shows the returned figure exactly once, and
nothing leaks between cells), puts units on its axes, and returns the Figure.
matplotlib is imported here only, so ``import nbconn`` stays light.

Inputs are :class:`nbconn.experiments.measure.Measurement` objects (one, or a list to
overlay), :class:`nbconn.result.Result` objects (the timeline, the Gantt
chart), or the SYN-retransmission records of :mod:`nbconn.experiments.synretry`.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from .. import errors
from ..stats import percentile  # nbconn's one percentile rule (nearest rank)
from ..strace import c_escape

# -- the palette: the one home of every colour that means something (the widgets import it from here) --------

#: One colour per outcome, the same in every plot and widget.
OUTCOME_COLOURS = {
    errors.CONNECTED: "#2a9d8f",
    errors.REFUSED: "#e76f51",
    errors.TIMED_OUT: "#6c757d",
    errors.RESET: "#f4a261",
    errors.UNREACHABLE: "#9b5de5",
    errors.ERROR: "#d62828",
}
#: Something went wrong or was given up on: the error outcome's red, also for a failed SYN, the connect timer's
#: expiry line, a packet sent again and the panel's error message.
ALERT_COLOUR = OUTCOME_COLOURS[errors.ERROR]

#: one colour per seed step (1 socket, 2 options, 3 non-blocking, 4 epoll, 5 connect/decide)
SEED_STEP_COLOURS = {1: "#264653", 2: "#2a9d8f", 3: "#e9c46a", 4: "#f4a261", 5: "#e76f51", None: "#8d99ae"}
#: One colour per run label, the same in every figure: the links of the 07/08 series keep theirs from one figure
#: to the next ("20 ms RTT" is orange in the distributions and in the round-trip scatter alike).  Labels not in
#: the table take :data:`OTHER_COLOURS` in the order a figure meets them, so they never borrow a link's colour.
RUN_COLOURS = {
    "loopback": "#1f77b4",
    "20 ms RTT": "#ff7f0e",
    "20 ms RTT, jitter 2 ms": "#2ca02c",
    "20 ms RTT, 2% loss": "#d62728",
}
OTHER_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#264653", "#f4a261")
SIZE = (7.0, 3.6)
WIDE = (10.0, 3.6)


def _runs(m_or_list) -> list:
    return list(m_or_list) if isinstance(m_or_list, (list, tuple)) else [m_or_list]


def run_colours(labels) -> dict:
    """``{label: colour}`` for the runs of one figure: a label of :data:`RUN_COLOURS` gets its own colour,
    any other the next of :data:`OTHER_COLOURS` (cycling after eight)."""
    colours, others = {}, 0
    for label in labels:
        if label in colours:
            continue
        if label in RUN_COLOURS:
            colours[label] = RUN_COLOURS[label]
        else:
            colours[label] = OTHER_COLOURS[others % len(OTHER_COLOURS)]
            others += 1
    return colours


def _figure(size=SIZE, ncols: int = 1):
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def histogram(m_or_list, *, column: str = "handshake_ms", log_x: bool = False, bins: int = 40,
              title: str | None = None) -> Figure:
    """Histogram of handshake times (ms), several runs overlaid as outlines."""
    import numpy as np

    runs = _runs(m_or_list)
    fig, ax = _figure()
    values = [m.array(column) for m in runs]
    everything = np.concatenate([v for v in values if v.size] or [np.zeros(1)])
    lo, hi = float(everything.min()), float(everything.max())
    if log_x:
        lo = max(lo, 1e-4)
        edges = np.geomspace(lo, max(hi, lo * 1.01), bins + 1)
        ax.set_xscale("log")
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    colours = run_colours(m.label for m in runs)
    for m, v in zip(runs, values):
        ax.hist(v, bins=edges, histtype="bar" if len(runs) == 1 else "step", linewidth=1.5, color=colours[m.label],
                alpha=0.8 if len(runs) == 1 else 1.0, label=f"{m.label} (n={v.size})")
    ax.set_xlabel(_axis_label(column))
    ax.set_ylabel("connects")
    ax.set_title(title or "handshake-time distribution")
    ax.legend(fontsize="small")
    return fig


def _axis_label(column: str) -> str:
    return {"handshake_ms": "handshake time: connect() to decision (ms)",
            "tcpi_rtt_ms": "TCP_INFO tcpi_rtt (ms)"}.get(column, column)


def ecdf(m_or_list, *, column: str = "handshake_ms", percentiles=(50, 90, 99), log_x: bool = False,
         title: str | None = None, ax=None) -> Figure:
    """Empirical CDF: the share of connects decided within x ms, with percentile markers."""
    import numpy as np

    runs = _runs(m_or_list)
    fig, ax = (ax.figure, ax) if ax is not None else _figure()
    colours = run_colours(m.label for m in runs)
    for m in runs:
        v = np.sort(m.array(column))
        if not v.size:
            continue
        y = np.arange(1, v.size + 1) / v.size
        marks = [(p, percentile(v, p)) for p in percentiles]
        # percentile values go into the legend: text next to the curves overprints when runs sit close together
        label = f"{m.label} (n={v.size}" + "".join(f", p{p:g} {_fmt_ms(x)}" for p, x in marks) + ")"
        (line,) = ax.step(v, y, where="post", label=label, color=colours[m.label])
        for p, x in marks:
            ax.plot([x], [p / 100], marker="o", color=line.get_color(), markersize=4)
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(_axis_label(column))
    ax.set_ylabel("share of connects")
    ax.set_title(title or "ECDF of handshake times")
    if ax.get_legend_handles_labels()[0]:  # a run with no decided connect (all stopped) draws nothing
        ax.legend(fontsize="small", loc="lower right")
    return fig


def _share_hist(ax, runs, column, edges, *, label_p50: bool = True) -> None:
    """Overlaid outline histograms, each bar the *share* of its run (runs of different n compare)."""
    import numpy as np

    colours = run_colours(m.label for m in runs)
    for m in runs:
        v = m.array(column)
        if not v.size:
            continue
        label = m.label
        if label_p50:
            p50 = float(percentile(np.sort(v), 50))
            label = f"{m.label}: p50 {_fmt_ms(p50)} (n={v.size})"
        ax.hist(v, bins=edges, weights=np.full(v.size, 1 / v.size), histtype="step", linewidth=1.5, label=label,
                color=colours[m.label])
    ax.set_ylabel("share of connects per bin")


def _fmt_ms(ms: float) -> str:
    """A time for a label: µs below 1 ms, ms above (the units a reader reads without counting digits)."""
    return f"{ms * 1e3:.0f} µs" if ms < 1 else f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"


def compare(runs, *, column: str = "handshake_ms", log_x: bool = False, title: str | None = None) -> Figure:
    """Several runs side by side: overlaid histograms as shares of each run (left) and ECDFs (right)."""
    import numpy as np

    runs = _runs(runs)
    fig, (left, right) = _figure(WIDE, ncols=2)
    everything = np.concatenate([m.array(column) for m in runs] or [np.zeros(1)])
    lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    edges = np.geomspace(max(lo, 1e-4), max(hi, 2e-4), 41) if log_x else np.linspace(lo, max(hi, lo + 1e-3), 41)
    _share_hist(left, runs, column, edges, label_p50=False)
    if log_x:
        left.set_xscale("log")
    left.set_xlabel(_axis_label(column))
    left.legend(fontsize="small")
    ecdf(runs, column=column, log_x=log_x, ax=right, title="ECDF", percentiles=())
    fig.suptitle(title or "comparison")
    return fig


def distributions(runs, *, zoom_ms=(15.0, 25.0), title: str | None = None) -> Figure:
    """Handshake times of several runs, three ways (one row, fixed size):

    left, every run on a log axis as the share of its connects per bin (runs of different
    n compare); middle, a linear zoom on ``zoom_ms`` where the round trip and its jitter
    live; right, the share of connects slower than x (1 - ECDF) on log axes, where a
    tail of a few percent -- a retransmitted SYN -- stands out.  Each run's p50 is in
    the legend, not on the curves, so labels never overprint.
    """
    import numpy as np

    runs = _runs(runs)
    # A fixed layout: the constrained-layout solver measures every tick label of three log axes
    # several times over, which made this figure take seconds to draw.
    fig = Figure(figsize=(12.0, 3.8))
    left, mid, right = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.055, right=0.99, top=0.86, bottom=0.32, wspace=0.28)
    everything = np.concatenate([m.array("handshake_ms") for m in runs] or [np.ones(1)])
    lo, hi = max(float(everything.min()), 1e-3), max(float(everything.max()), 1e-2)
    _share_hist(left, runs, "handshake_ms", np.geomspace(lo, hi * 1.05, 49))
    left.set_xscale("log")
    left.set_xlabel("handshake time (ms, log)")
    left.set_title("all of it", fontsize="medium")
    _share_hist(mid, runs, "handshake_ms", np.linspace(zoom_ms[0], zoom_ms[1], 41), label_p50=False)
    mid.set_xlim(*zoom_ms)
    mid.set_xlabel(f"handshake time (ms), {zoom_ms[0]:g}-{zoom_ms[1]:g} ms only")
    mid.set_title("the round trip, linear", fontsize="medium")
    colours = run_colours(m.label for m in runs)
    for m in runs:
        v = np.sort(m.array("handshake_ms"))
        if not v.size:
            continue
        slower = 1 - np.arange(1, v.size + 1) / v.size
        keep = slower > 0  # the slowest connect has nothing slower: log(0) has no place on the axis
        right.step(v[keep], slower[keep], where="post", label=m.label, color=colours[m.label])
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("handshake time x (ms, log)")
    right.set_ylabel("share slower than x")
    right.set_title("the tail", fontsize="medium")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 3), fontsize="small")
    fig.suptitle(title or "handshake-time distributions")
    return fig


def timeline(result, *, title: str | None = None) -> Figure:
    """One connect, step by step: one row per recorded step, each call a bar from the moment it was called to
    the moment it returned (as ``strace -T`` times it), on a time axis in µs since ``socket()`` was called;
    the timer's events (armed, fired) are instants, a tick and a cross.

    The steps before the handshake take microseconds and a timer can take a second, so
    one linear axis would pile their labels up at 0: each step has its own row (its
    name is the row's label), and the axis is linear up to 10 µs and logarithmic beyond.
    """
    steps = result.steps
    fig, ax = _figure((10.0, 1.4 + 0.32 * max(len(steps), 1)))
    t0 = result.started_ns
    for row, s in enumerate(steps):
        number = s.ngx_step.number if s.ngx_step else None
        colour = SEED_STEP_COLOURS.get(number, SEED_STEP_COLOURS[None])
        start, end = (s.t_start_ns - t0) / 1e3, (s.t_ns - t0) / 1e3
        if s.name in ("timer", "timeout"):  # events, not calls: no duration to draw
            ax.plot([start], [row], marker="|" if s.name == "timer" else "X", markersize=10, markeredgewidth=2,
                    color=colour, zorder=3, gid="event")
        else:  # a 0.3 µs call still shows: drawn at least 0.3 µs wide (linear part) or 5% of its time (log part)
            ax.plot([start, max(end, start + 0.3, start * 1.05)], [row, row], color=colour, linewidth=8,
                    solid_capstyle="butt", zorder=2, gid="call")
    ax.set_yticks(range(len(steps)), [s.name if not s.ngx_step else f"{s.ngx_step.number}. {s.name}" for s in steps],
                  fontsize="small")
    ax.set_ylim(len(steps) - 0.5, -0.5)
    connect = next((s for s in steps if s.name == "connect"), None)
    if connect is not None and result.handshake_ns is not None:
        start = (connect.t_start_ns - t0) / 1e3
        ax.axvspan(start, start + result.handshake_ns / 1e3, color=OUTCOME_COLOURS.get(result.outcome, "grey"),
                   alpha=0.15, label=f"handshake: {result.outcome} in {_fmt_ms(result.handshake_ns / 1e6)}")
        fig.legend(fontsize="small", loc="outside lower center")
    ax.set_xscale("symlog", linthresh=10.0, linscale=0.5)
    ax.set_xlim(left=0)
    ax.set_xlabel("time since socket() was called (µs; linear to 10 µs, logarithmic beyond)\n"
                  "bar: a call, from its start to its return")
    ax.set_title(title or f"one connect to {result.target}: {result.outcome}" +
                 (f" ({result.errno})" if result.errno else ""))
    return fig


def gantt(results, *, title: str | None = None, max_rows: int = 200) -> Figure:
    """A concurrent batch: one bar per connect from socket() to its decision, coloured by outcome.

    A loopback connect is decided in tens of microseconds, which would be a bar
    thinner than a pixel: every bar is drawn at least 0.5% of the time axis wide.
    """
    results = [r for r in results if r.started_ns][:max_rows]
    fig, ax = _figure((10.0, 4.5))
    if results:
        t0 = min(r.started_ns for r in results)
        span = max((r.finished_ns - t0) / 1e6 for r in results) or 1.0
        seen = set()
        for row, r in enumerate(results):
            start = (r.started_ns - t0) / 1e6
            width = max((r.finished_ns - r.started_ns) / 1e6, span * 0.005)
            label = r.outcome if r.outcome not in seen else None
            seen.add(r.outcome)
            ax.barh(row, width, left=start, height=0.8, color=OUTCOME_COLOURS.get(r.outcome, "grey"), label=label)
        ax.invert_yaxis()
        fig.legend(fontsize="small", loc="outside right upper", title="outcome")
    ax.set_xlabel("time since the first socket() (ms)")
    ax.set_ylabel("connect # (target order)")
    ax.set_title(title or f"{len(results)} connects on one loop")
    return fig


def outcomes(m_or_list, *, title: str | None = None) -> Figure:
    """How each run ended: counts per outcome, runs side by side."""
    runs = _runs(m_or_list)
    fig, ax = _figure()
    names = [o for o in OUTCOME_COLOURS if any(o in m.outcome_counts() for m in runs)]
    width = 0.8 / max(len(runs), 1)
    colours = run_colours(m.label for m in runs)
    for i, m in enumerate(runs):
        counts = m.outcome_counts()
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, [counts.get(n, 0) for n in names], width=width, label=m.label,
                      color=[OUTCOME_COLOURS[n] for n in names] if len(runs) == 1 else colours[m.label])
        ax.bar_label(bars, fontsize="x-small")
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("connects")
    ax.set_title(title or "outcomes")
    if len(runs) > 1:
        ax.legend(fontsize="small")
    return fig


def syn_timeline(runs, *, title: str | None = None) -> Figure:
    """SYN (re)transmissions of connects that get no answer: measured (dots) vs predicted (ticks).

    ``runs``: dicts with "label", "sent_s" (measured SYN send times, s after
    connect()), optionally "predicted_s", "predicted_failed_s", "predicted_late_s"
    (how much later the timer wheel may make the end) and "failed_s" (when the
    kernel gave up with ETIMEDOUT).  The time axis is linear up to 1 s and
    logarithmic beyond (symlog), so the 1 s steps at the start and the minutes at
    the end are both readable.
    """
    fig, ax = _figure((10.0, 1.6 + 0.55 * max(len(runs), 1)))
    for row, run in enumerate(runs):
        sent = run.get("sent_s", [])
        ax.plot(sent, [row] * len(sent), "o", color="#264653", label="SYN sent (measured)" if row == 0 else None)
        predicted = run.get("predicted_s") or []
        ax.plot(predicted, [row - 0.25] * len(predicted), "|", color="#e76f51", markersize=10,
                label="SYN sent (predicted)" if row == 0 else None)
        end = run.get("predicted_failed_s")
        if end is not None:
            late = run.get("predicted_late_s") or 0.0
            ax.plot([end, end + late], [row - 0.25] * 2, color="#e76f51", linewidth=4, solid_capstyle="butt",
                    label="ETIMEDOUT predicted (bar: how late the timer wheel may be)" if row == 0 else None)
        failed = run.get("failed_s")
        if failed is not None:
            ax.plot([failed], [row], "X", color=ALERT_COLOUR, markersize=9,
                    label="ETIMEDOUT measured" if row == 0 else None)
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
    ticks = [t for t in (0, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200) if t <= max(
        [max(r.get("sent_s") or [0]) for r in runs] + [r.get("failed_s") or 0 for r in runs]
        + [r.get("predicted_failed_s") or 0 for r in runs] + [1]) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_yticks(range(len(runs)), [r["label"] for r in runs])
    ax.set_xlabel("time since connect() (s; linear to 1 s, logarithmic beyond)")
    ax.set_title(title or "SYN retransmissions against a host that never answers")
    ax.set_ylim(len(runs) - 0.5, -0.6)
    fig.legend(fontsize="small", loc="outside lower center", ncols=4)
    return fig


def timer_lateness(runs, *, title: str | None = None) -> Figure:
    """How late each application timer fired: decision time minus the timeout, one dot per connect.

    With five connects per timeout an ECDF or a p99 says nothing; the dots themselves do.
    """
    import numpy as np

    runs = _runs(runs)
    fig, ax = _figure()
    for row, m in enumerate(runs):
        late = m.array("handshake_ms") - m.timeout_s * 1e3
        ax.plot(late, row + np.linspace(-0.15, 0.15, late.size) if late.size > 1 else [row] * late.size, "o",
                color=OUTCOME_COLOURS["timed_out"], markersize=6, alpha=0.8)
    ax.axvline(0, color=ALERT_COLOUR, linewidth=1, linestyle=":")
    ax.set_yticks(range(len(runs)), [m.label for m in runs])
    ax.set_ylim(len(runs) - 0.5, -0.5)
    ax.set_xlim(left=min(-0.2, ax.get_xlim()[0]))
    ax.set_xlabel("how late the timer fired: decision time minus the timeout (ms)")
    ax.set_title(title or "each connect to the black hole, by how late its timer fired")
    return fig


def scaling(rows, *, ideal_rtt_ms: dict | None = None, title: str | None = None) -> Figure:
    """Throughput (left) and handshake p50/p99 (right) against concurrency, one line per label.

    ``rows`` as returned by :func:`nbconn.experiments.measure.scaling` (several runs may be
    concatenated).  ``ideal_rtt_ms``: ``{label: RTT}`` draws, for that label, the
    ideal throughput of a loop that keeps C connects in flight over that round trip,
    C / RTT (dashed).  The legend sits below the plots, where it hides no curve.
    """
    fig, (left, right) = _figure((10.0, 4.2), ncols=2)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colours = run_colours(labels)
    for label in labels:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in mine]
        (line,) = left.plot(cs, [r["connects_per_s"] for r in mine], marker="o", label=label, color=colours[label])
        if ideal_rtt_ms and label in ideal_rtt_ms:
            rtt_s = ideal_rtt_ms[label] / 1e3
            left.plot(cs, [c / rtt_s for c in cs], linestyle="--", color=line.get_color(), linewidth=1,
                      label=f"{label}: ideal C / RTT ({ideal_rtt_ms[label]:g} ms)")
        right.plot(cs, [r["p50_ms"] for r in mine], marker="o", color=line.get_color(), label=f"{label} p50")
        right.plot(cs, [r["p99_ms"] for r in mine], marker="^", linestyle=":", color=line.get_color(),
                   label=f"{label} p99")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}), [str(c) for c in sorted({r["concurrency"] for r in rows})])
        ax.set_xlabel("connects in flight (concurrency)")
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    left.set_yscale("log")
    left.set_ylabel("connects per second")
    right.set_yscale("log")
    right.set_ylabel("handshake time (ms)")
    fig.suptitle(title or "what concurrency buys")
    return fig


def rtt_vs_handshake(m_or_list, *, title: str | None = None) -> Figure:
    """How much longer the measured handshake is than the kernel's own estimate (TCP_INFO tcpi_rtt), in µs.

    One dot per connect: x the kernel's tcpi_rtt (ms), y the difference measured
    handshake - tcpi_rtt (µs) -- the time spent outside the round trip (waking the
    loop, epoll_wait returning, SO_ERROR).  Only connects without a retransmission
    are drawn: after a resent SYN the kernel's estimate no longer describes one
    round trip.
    """
    import numpy as np

    runs = _runs(m_or_list)
    fig, ax = _figure()
    colours = run_colours(m.label for m in runs)
    for m in runs:
        pairs = [(h, r) for h, r, t in zip(m.handshake_ms, m.tcpi_rtt_ms, m.tcpi_total_retrans)
                 if h is not None and r is not None and not t]
        if not pairs:
            continue
        h, r = np.asarray(pairs).T
        gap_us = (h - r) * 1e3
        ax.scatter(r, gap_us, s=8, alpha=0.6, color=colours[m.label],
                   label=f"{m.label}: p50 {percentile(np.sort(gap_us), 50):.0f} µs (n={len(pairs)})")
    ax.axhline(0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("TCP_INFO tcpi_rtt (ms)")
    ax.set_ylabel("handshake - tcpi_rtt (µs)")
    ax.set_title(title or "what the loop adds to the kernel's round trip")
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)
    return fig


def accept_queue(b: dict, *, title: str | None = None) -> Figure:
    """A burst against a small accept queue (:func:`nbconn.experiments.acceptq.burst`), both ends on one clock.

    Three running counts over time: connects the *client* calls connected, connections
    the *server*'s accept() returned, and requests whose answer's first byte arrived.
    Where the first line runs ahead of the second, clients believe in connections the
    server does not have.
    """
    import numpy as np

    fig, ax = _figure((10.0, 4.0))
    c, s = b["client"], b["server"]

    def running(times, **style):
        t = np.sort(np.asarray([x for x in times if x is not None], dtype=float)) * 1e3
        if t.size:
            ax.step(np.concatenate([[0.0], t]), np.arange(t.size + 1), where="post", linewidth=2, **style)

    running([t for t, o in zip(c["decided_s"], c["outcomes"]) if o == "connected"],
            color=OUTCOME_COLOURS["connected"], label="client: connect() decided 'connected'")
    running(s["accepted_s"], color="#264653", linestyle="--", label="server: accept() returned a connection")
    running(c.get("first_byte_s", []), color="#e76f51", linestyle=":",
            label="client: first byte of the answer to its request")
    ax.axhline(b["count"], color="grey", linewidth=0.8)
    ax.set_xlabel("time since the burst began (ms)")
    ax.set_ylabel("connections (running count)")
    ax.set_ylim(0, b["count"] * 1.08)
    ax.set_title(title or f"{b['count']} connects against listen({b['backlog']}): the client's view and the server's")
    fig.legend(fontsize="small", loc="outside lower center", ncols=3)
    return fig


# -- one connect's syscalls next to its packets (notebook 11) ---------------------------------------

#: The rows of a packet panel, top to bottom: which recorded steps each row draws (only rows with something to
#: draw are shown).  The setup calls share a row: they take microseconds and tell no story of their own.
PACKET_ROWS = (
    ("socket() .. epoll_ctl()", ("socket", "setsockopt", "getsockopt", "nonblocking", "bind", "epoll_ctl")),
    ("connect()", ("connect",)),
    ("timer", ("timer", "timeout")),
    ("epoll_wait()", ("epoll_wait",)),
    ("SO_ERROR", ("so_error",)),
)
PACKET_OUT, PACKET_IN, PACKET_AGAIN = "#264653", "#2a9d8f", ALERT_COLOUR
#: what a seed step's colour means, for the legend
SEED_STEP_NAMES = {1: "1 socket()", 2: "2 options", 3: "3 non-blocking", 4: "4 epoll add", 5: "5 connect, decide"}
#: the decision: SO_ERROR read, or the timer fired (a connect() that failed at once decides itself)
_DECISIONS = ("so_error", "timeout")


def shot_events(result, packets) -> tuple[list, list]:
    """The steps and segments of one connect up to its decision, as (steps, packets).

    What comes after the decision (TCP_INFO, EPOLL_CTL_DEL, close; the FIN that close sends) is the
    connection's end, not its handshake.
    """
    steps = list(result.steps)
    decided = next((i for i, s in enumerate(steps) if s.name in _DECISIONS), None)
    if decided is None:
        decided = next((i for i, s in enumerate(steps) if s.name == "connect"), len(steps) - 1)
    steps = steps[:decided + 1]
    last = max((s.t_ns for s in steps), default=0)
    return steps, [p for p in packets if p.t_ns <= last]


def time_segments(instants) -> list[tuple[int, int]]:
    """The stretches of one time axis to draw: one ``(lo, hi)``, or two when one axis would squeeze a part.

    ``instants``: times (ns since socket()) of every call's start and end and every segment.  A SYN sent
    50 µs after socket() and its SYN-ACK 20 ms later do not fit one linear axis: the calls before the
    gap would be one pixel.  The axis breaks at the first gap of at least 30% of the span when what comes
    before it is squeezed into a tenth of the axis (three instants or more: the setup and connect()), or
    at a gap of at least 85% of the span (a socket() made by the lab's helper, long beside the handshake).
    A pure function: the decision is testable without a figure.
    """
    t = sorted(set(int(x) for x in instants))
    if not t:
        return [(0, 0)]
    span = t[-1] - t[0]
    for i in range(len(t) - 1):
        gap = t[i + 1] - t[i]
        if span and gap >= 0.3 * span:
            squeezed = i + 1 >= 3 and t[i] - t[0] < 0.1 * span
            if squeezed or gap >= 0.85 * span:
                return [(t[0], t[i]), (t[i + 1], t[-1])]
            break  # only the first large gap is a candidate: later ones are the story (SYNs a second apart)
    return [(t[0], t[-1])]


def _time_unit(hi_ns: int) -> tuple[str, float]:
    return ("µs", 1e3) if hi_ns < 2e6 else ("ms", 1e6) if hi_ns < 2e9 else ("s", 1e9)


def packets(shots, *, title: str | None = None, width: float = 5.6) -> Figure:
    """Syscalls and packets of connects, one panel per connect, each on its own time axis since socket().

    ``shots``: objects with ``scenario``, ``result`` (a :class:`nbconn.result.Result`), ``packets`` (segments
    with ``t_ns``, ``dir`` "out"/"in", ``flags``, ``retransmission``) and ``note`` -- the
    :class:`nbconn.experiments.nb11.Shot` of :func:`nbconn.experiments.nb11.shoot`.

    Each call is a bar from the moment it was called to the moment it returned (as ``strace -T`` times
    it), so a segment the kernel sent *during* connect() sits inside connect()'s bar.  Time 0 is the
    call to socket(), for root and normal users alike (a normal user's socket() is made by the lab's
    helper and takes longer: its bar says so).  Where one linear axis would squeeze the calls into a
    pixel (a 20 ms link, a SYN sent again a second later) the panel breaks its axis in two
    (:func:`time_segments`), each part linear in its own unit.  ``width`` (inches): the figure is
    narrow and tall, so a phone showing it 360 px wide still shows text.
    """
    import textwrap

    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    shots = list(shots)
    prepared = []
    for shot in shots:
        steps, segs = shot_events(shot.result, shot.packets)
        t0 = shot.result.started_ns  # right before socket(): the first step's t_start_ns
        rows = [(name, kinds) for name, kinds in PACKET_ROWS if any(s.name in kinds for s in steps)]
        heading = textwrap.fill(f"{shot.scenario}: {shot.result.summary()}", 56)
        if getattr(shot, "note", ""):
            heading += "\n" + textwrap.fill(shot.note, 60)
        prepared.append((shot, steps, segs, t0, rows, heading))
    heights = [1.0 + 0.3 * (len(rows) + 2) + 0.19 * heading.count("\n") for *_, rows, heading in prepared]
    fig = Figure(figsize=(width, 0.55 + sum(heights)), layout="constrained")
    subfigs = fig.subfigures(len(shots), 1, height_ratios=heights, squeeze=False)[:, 0] if shots else []
    seen_steps: set = set()
    seen_events: set = set()
    seen_again = False
    for sub, (shot, steps, segs, t0, rows, heading) in zip(subfigs, prepared):
        instants = [x - t0 for s in steps for x in (s.t_start_ns, s.t_ns)] + [p.t_ns - t0 for p in segs]
        parts = time_segments(instants)
        span = max(hi - lo for lo, hi in parts) or 1
        windows = []
        for lo, hi in parts:  # a part that is one instant (socket() called, then a long wait): a sliver after it
            windows.append((lo - (hi - lo) * 0.04, hi + (hi - lo) * 0.04) if hi > lo else (lo - span * 0.004,
                                                                                          lo + span * 0.1))
        ratios = [1.0] if len(parts) == 1 else [0.35 if parts[0][1] == parts[0][0] else 1.0, 1.3]
        axes = sub.subplots(1, len(parts), sharey=True, width_ratios=ratios, squeeze=False)[0]
        n_rows = len(rows) + 2
        y_out, y_in = len(rows), len(rows) + 1
        for k, (ax, (lo, hi)) in enumerate(zip(axes, windows)):
            unit, scale = _time_unit(max(abs(hi), abs(lo)))
            for row, (_, kinds) in enumerate(rows):
                for s in steps:
                    if s.name not in kinds:
                        continue
                    number = s.ngx_step.number if s.ngx_step else None
                    seen_steps.add(number)
                    seen_events.add(s.name)
                    colour = SEED_STEP_COLOURS.get(number, SEED_STEP_COLOURS[None])
                    a, b = (s.t_start_ns - t0) / scale, (s.t_ns - t0) / scale
                    if s.name == "timer":  # armed: an instant, no call of its own
                        ax.plot([a], [row], marker="|", markersize=12, markeredgewidth=2, color=colour, gid="timer")
                    elif s.name == "timeout":
                        ax.plot([a], [row], marker="X", markersize=9, color=colour, gid="timeout")
                    else:  # at least 0.6% of the window wide: a 0.3 µs getsockopt next to a 20 ms wait is still seen
                        b = max(b, a + (hi - lo) * 0.006 / scale)
                        ax.plot([a, b], [row, row], color=colour, linewidth=7, solid_capstyle="butt", gid=s.name)
            for p in segs:
                x = (p.t_ns - t0) / scale
                y = y_out if p.dir == "out" else y_in
                colour = PACKET_AGAIN if p.retransmission else PACKET_OUT if p.dir == "out" else PACKET_IN
                seen_again |= p.retransmission
                ax.plot([x], [y], marker=">" if p.dir == "out" else "<", color=colour, markersize=9, zorder=3,
                        gid=f"segment {p.dir} {p.flags}")
                if lo <= p.t_ns - t0 <= hi:
                    ax.annotate(p.flags, (x, y), xytext=(0, 6), textcoords="offset points", ha="center",
                                va="bottom", fontsize=10, color=colour, gid="packet-flags", in_layout=False)
            ax.set_xlim(lo / scale, hi / scale)
            ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
            if parts[k][0] == parts[k][1]:
                ax.set_xticks([parts[k][0] / scale])
            else:  # half a panel holds three labels like "1012.75" side by side, not four
                ax.locator_params(axis="x", nbins=4 if len(parts) == 1 else 3)
            ax.tick_params(labelsize=10)
            ax.set_xlabel(f"{unit} since socket()", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            if len(axes) == 2:  # the break: no spine between the parts, a slash on each side
                side = "right" if k == 0 else "left"
                ax.spines[side].set_visible(False)
                x_mark = 1 if k == 0 else 0
                ax.plot([x_mark, x_mark], [0, 1], transform=ax.transAxes, linestyle="none", marker=[(-1, -1), (1, 1)],
                        markersize=10, color="k", clip_on=False, mec="k", mew=1)
                if k == 1:
                    ax.tick_params(axis="y", left=False)
        axes[0].set_yticks(range(n_rows), [name for name, _ in rows] + ["segment out", "segment in"], fontsize=10)
        axes[0].set_ylim(n_rows - 0.4, -0.7)
        sub.suptitle(heading, fontsize=10, x=0.02, ha="left")
    handles = [Line2D([], [], color=SEED_STEP_COLOURS[n], linewidth=7, label=f"step {SEED_STEP_NAMES[n]}")
               for n in sorted(k for k in seen_steps if k is not None)]
    if "timer" in seen_events:
        handles.append(Line2D([], [], color="k", linewidth=0, marker="|", markersize=12, markeredgewidth=2,
                              label="timer armed"))
    if "timeout" in seen_events:
        handles.append(Line2D([], [], color="k", linewidth=0, marker="X", markersize=8, label="timer fired"))
    handles += [Line2D([], [], color=PACKET_OUT, linewidth=0, marker=">", markersize=9, label="segment out"),
                Line2D([], [], color=PACKET_IN, linewidth=0, marker="<", markersize=9, label="segment in")]
    if seen_again:
        handles.append(Line2D([], [], color=PACKET_AGAIN, linewidth=0, marker=">", markersize=9, label="sent again"))
    fig.legend(handles=handles, loc="outside upper center", ncols=2, fontsize=9,
               title="bar: a call, from its start to its return", title_fontsize=9)
    if title:
        fig.suptitle(title)
    # the flags go where they overprint nothing, measured once the layout is final (they take no part in it)
    fig.draw_without_rendering()
    _unpile_labels(fig)
    return fig


#: where a segment's flags may go, in points from its marker, in order of preference: above, below, beside,
#: then further up, a step at a time
_LABEL_SPOTS = ((0, 6, "center", "bottom"), (0, -6, "center", "top"), (8, 0, "left", "center"),
                (-8, 0, "right", "center"), *((0, 6 + 12 * k, "center", "bottom") for k in range(1, 6)))


def _unpile_labels(fig) -> None:
    """Flags of segments close in time would overprint: each label takes the first spot of
    :data:`_LABEL_SPOTS` where it touches no label already placed in its panel."""
    renderer = fig._get_renderer()  # the figure's own (Agg) renderer, as savefig and the inline backend use
    for ax in fig.axes:
        placed: list = []
        for text in sorted((t for t in ax.texts if t.get_gid() == "packet-flags"), key=lambda t: t.xy[0]):
            for dx, dy, ha, va in _LABEL_SPOTS:
                text.set_position((dx, dy))
                text.set_ha(ha)
                text.set_va(va)
                box = text.get_window_extent(renderer)
                if not any(box.overlaps(other) for other in placed):
                    break
            placed.append(text.get_window_extent(renderer))


# -- notebook 12: one name, several addresses ------------------------------------------------------------------

def races(*races, title: str | None = None) -> Figure:
    """Each race's attempts as bars from start to decision, coloured by outcome: one panel per race.

    ``races``: :class:`nbconn.experiments.eyeballs.Race` objects (notebook 12).
    """
    fig = Figure(figsize=(9.0, 1.2 + 0.9 * sum(max(len(r.attempts), 1) for r in races)), layout="constrained")
    axes = fig.subplots(len(races), 1, sharex=True, squeeze=False)[:, 0]
    for ax, race in zip(axes, races):
        for row, (result, start) in enumerate(zip(race.attempts, race.started_ns)):
            begin = start / 1e6
            end = (result.finished_ns - result.started_ns) / 1e6 + begin
            label = "cancelled" if result.errno == "ECANCELED" else result.outcome
            colour = "#adb5bd" if label == "cancelled" else OUTCOME_COLOURS.get(result.outcome, "grey")
            ax.barh(row, end - begin, left=begin, height=0.5, color=colour, alpha=0.6)
            # the start (socket()) and the decision as markers, so a 0.2 ms connect is visible too
            ax.plot([begin], [row], marker="|", markersize=16, color="black")
            ax.plot([end], [row], marker="o", markersize=8, color=colour, markeredgecolor="black")
            ax.text(end, row, f"  {label} at {end:.0f} ms", va="center", fontsize="small")
        ax.set_yticks(range(len(race.attempts)), [c_escape(r.target) for r in race.attempts], fontsize="small")
        ax.invert_yaxis()
        how = "nginx's sequential walk" if race.delay_s is None else f"happy eyeballs, delay {race.delay_s * 1e3:.0f} ms"
        ax.set_title(f"{how}: {race.winner or 'nobody'} after {race.elapsed_ms:.0f} ms", fontsize="medium")
        ax.margins(x=0.25)
    axes[-1].set_xlabel("ms since the race started")
    if title:
        fig.suptitle(title)
    return fig


def time_to_connected(samples: dict, *, marks: dict | None = None, title: str | None = None) -> Figure:
    """Time to connected, one row of dots per client (``samples``: label -> list of ms), median marked.

    ``marks``: label -> ms, drawn as dashed vertical lines (the delay, the connect timeout).
    """
    fig = Figure(figsize=(9.0, 1.0 + 0.7 * len(samples)), layout="constrained")
    ax = fig.subplots()
    for row, (label, values) in enumerate(samples.items()):
        values = sorted(values)
        if not values:
            continue
        # a small fixed spread around the row so equal values stay visible (deterministic, no RNG)
        offsets = [((i * 7) % 11 - 5) * 0.035 for i in range(len(values))]
        ax.scatter(values, [row + o for o in offsets], s=18, alpha=0.75, zorder=3)
        median = percentile(values, 50)  # nbconn's one percentile rule (nearest rank; values are sorted)
        ax.plot([median, median], [row - 0.3, row + 0.3], color="black", linewidth=2, zorder=4)
        ax.text(max(values), row, f"   p50 {median:.1f} ms (n={len(values)})", va="center", fontsize="small")
    for label, ms in (marks or {}).items():
        ax.axvline(ms, color="grey", linestyle="--", linewidth=1)
        ax.text(ms, -0.75, f" {label}", fontsize="small", color="dimgrey", va="bottom")
    ax.set_yticks(range(len(samples)), list(samples), fontsize="small")
    ax.set_ylim(len(samples) - 0.4, -0.9)
    longest = max((max(v) for v in samples.values() if v), default=1.0)
    ax.set_xlim(0, max([longest, *(marks or {}).values()]) * 1.3)  # room for the p50 labels on the right
    ax.set_xlabel("time to connected (ms): first address black-holed, second accepting")
    ax.set_title(title or "one name, two addresses: time to a connected socket")
    return fig
