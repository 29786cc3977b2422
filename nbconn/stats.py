"""The one percentile rule of nbconn: nearest rank.

The p-th percentile of n sorted values is the smallest value with at least p% of
the values at or below it: the value at rank ceil(p/100 * n), counting from 1.
It is always one of the measured values (no interpolation between two handshakes
that never happened), and it is the rule the C client of the benchmarks uses.
Every percentile nbconn shows -- measure's summaries, the plots' markers, the
widgets, synretry, the lab wire's lateness stats, the benchmarks -- comes from here.

This module imports nothing (the lab wire's child process may use it).
"""

from __future__ import annotations

import math

#: The percentiles a summary shows.
PERCENTILES = (50, 90, 99, 99.9)


def percentile(ordered, p: float):
    """The ``p``-th percentile (0 < p <= 100) of ``ordered``, a non-empty sequence sorted ascending."""
    n = len(ordered)
    if not n:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"p={p!r} must be > 0 and at most 100")
    return ordered[max(1, math.ceil(p / 100 * n)) - 1]


def percentiles(values, points=PERCENTILES) -> dict:
    """{"p50": .., "p90": .., "p99": .., "p99.9": .., "max": ..} of the values that are not None or NaN (none -> {})."""
    data = sorted(v for v in values if v is not None and v == v)
    if not data:
        return {}
    out = {f"p{p:g}": percentile(data, p) for p in points}
    out["max"] = data[-1]
    return out
