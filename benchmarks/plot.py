"""Figures from a benchmark result file, for notebook 07 and the README.

Every function takes the dict ``benchmarks/run.py`` writes (``load()`` reads the
newest ``benchmarks/results/*.json``) and returns a matplotlib ``Figure`` built
with the object API (no pyplot state, fixed sizes, so nbval sees the same
"<Figure size ...>" text every time).  matplotlib is imported inside the
functions: importing this module costs nothing.

    import sys; sys.path.insert(0, "../benchmarks")
    import plot
    data = plot.load()
    fig = plot.storm_figure(data); fig
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: str | Path | None = None) -> dict:
    """A result file; by default the newest one in benchmarks/results/."""
    if path is None:
        files = sorted(RESULTS.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no results in {RESULTS}: run ./dev bench first")
        path = files[-1]
    return json.loads(Path(path).read_text())


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def storm_figure(data: dict, baseline: str = "c"):
    """Connect storm: each variant's storm time as a multiple of ``baseline``'s, one panel per C.

    Bars are the ratio of medians; the whiskers span min..max over the rounds.
    """
    rows = data["storm"]
    cs = sorted({r["c"] for r in rows})
    fig = _figure(4.0 * len(cs), 4.0)
    axes = fig.subplots(1, len(cs), squeeze=False)[0]
    for ax, c in zip(axes, cs):
        group = [r for r in rows if r["c"] == c]
        base = next((r for r in group if r["variant"] == baseline), None)
        if base is None:
            ax.set_title(f"C = {c}: no {baseline} run")
            continue
        names = [r["variant"] for r in group]
        ratio = [r["median_ms"] / base["median_ms"] for r in group]
        low = [(r["median_ms"] - r["min_ms"]) / base["median_ms"] for r in group]
        high = [(r["max_ms"] - r["median_ms"]) / base["median_ms"] for r in group]
        colors = ["tab:green" if n.startswith("nbconn") else "tab:gray" if n == baseline else "tab:blue"
                  for n in names]
        ax.barh(range(len(names)), ratio, xerr=[low, high], color=colors, capsize=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"storm time / {baseline}'s")
        ax.set_title(f"C = {c}, K = {group[0]['k']}")
    return fig


def idle_figure(data: dict):
    """Idle handshake (C = 1): p50 and p99 of the time each variant measures."""
    rows = [r for r in data["storm"] if r["c"] == 1]
    fig = _figure(6.0, 3.5)
    ax = fig.subplots()
    names = [r["variant"] for r in rows]
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r["handshake_p50_us"] for r in rows], height=0.4, label="p50")
    ax.barh([i + 0.2 for i in y], [r["handshake_p99_us"] for r in rows], height=0.4, label="p99")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("handshake time as the variant reports it (µs)")
    ax.legend(loc="lower right")
    return fig


def wire_figure(data: dict):
    """Over the impairment wire: connects/s against concurrency, nbconn and asyncio (log-log)."""
    fig = _figure(5.0, 3.5)
    ax = fig.subplots()
    rows = (data.get("wire") or {}).get("rows") or []
    if not rows:
        ax.set_title("impairment wire: not run")
        return fig
    for name in sorted({r["variant"] for r in rows}):
        cs = sorted({r["c"] for r in rows if r["variant"] == name})
        rates = [statistics.median(r["connects_per_s"] for r in rows if r["variant"] == name and r["c"] == c)
                 for c in cs]
        ax.plot(cs, rates, marker="o", label=name)
    rtt = 2 * data["wire"].get("delay_ms_each_way", 10.0)
    cs = sorted({r["c"] for r in rows})
    ax.plot(cs, [c / (rtt / 1000) for c in cs], linestyle=":", color="gray", label=f"C / RTT ({rtt:.0f} ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("connects in flight (C)")
    ax.set_ylabel("connects per second")
    ax.legend()
    return fig
