"""Run many connects and turn their Results into a table and a summary.

A single handshake time says little: on loopback it is ~20 µs one time and
300 µs the next (a cold cache, a timer interrupt, the scheduler).  What
readers need is the *distribution*: the median, the tail (p99, p99.9) and
the outcome counts.  :func:`run` connects N times -- one after another, or
with C in flight through :func:`nbconn.connect_many` -- against a target or a
named lab scenario, and returns a :class:`Measurement`: a few plain columns
(lists, one entry per connect) plus :meth:`Measurement.summary`.

No pandas: the columns are lists, and :meth:`Measurement.array` hands out a
numpy array when a plot or a percentile needs one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from .. import validate
from ..api import connect_many
from ..errors import OUTCOMES
from ..flow import make_plan
from ..settings import Settings, given
from ..stats import PERCENTILES, percentiles  # measure.percentiles: the one rule lives in nbconn.stats
from ..strace import c_escape
from ..validate import shown

MAX_COUNT = validate.MAX_COUNT


@dataclass
class Measurement:
    """One column per field, one row per connect (in the order they were started)."""

    label: str
    scenario: str
    timeout_s: float
    concurrency: int
    outcome: list = field(default_factory=list)
    errno: list = field(default_factory=list)
    connect_returned: list = field(default_factory=list)
    handshake_ms: list = field(default_factory=list)  # connect() call -> decision
    tcpi_rtt_ms: list = field(default_factory=list)  # None unless connected over TCP
    tcpi_total_retrans: list = field(default_factory=list)
    start_ms: list = field(default_factory=list)  # socket() time, relative to the first connect
    end_ms: list = field(default_factory=list)  # decision time, relative to the first connect
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # provenance when loaded from data/

    @classmethod
    def from_results(cls, results, *, label: str, scenario: str, timeout_s: float, concurrency: int,
                     settings: dict | Settings | None = None) -> "Measurement":
        m = cls(label=label, scenario=scenario, timeout_s=timeout_s, concurrency=concurrency,
                settings=settings.to_dict() if isinstance(settings, Settings) else dict(settings or {}))
        t0 = min((r.started_ns for r in results if r.started_ns), default=0)
        for r in results:
            m.outcome.append(r.outcome)
            m.errno.append(r.errno)
            m.connect_returned.append(r.connect_returned)
            m.handshake_ms.append(None if r.handshake_ns is None else r.handshake_ns / 1e6)
            info = r.tcp_info
            m.tcpi_rtt_ms.append(info["rtt_us"] / 1e3 if info else None)
            m.tcpi_total_retrans.append(info["total_retrans"] if info else None)
            m.start_ms.append((r.started_ns - t0) / 1e6 if r.started_ns else None)
            m.end_ms.append((r.finished_ns - t0) / 1e6 if r.finished_ns else None)
        return m

    def __len__(self) -> int:
        return len(self.outcome)

    @property
    def wall_s(self) -> float:
        """From the first socket() to the last decision, in seconds."""
        starts = [v for v in self.start_ms if v is not None]
        ends = [v for v in self.end_ms if v is not None]
        return (max(ends) - min(starts)) / 1e3 if starts and ends else 0.0

    @property
    def rate_per_s(self) -> float:
        """Connects decided per second of wall time."""
        return len(self) / self.wall_s if self.wall_s > 0 else float("nan")

    # -- columns ---------------------------------------------------------------
    def array(self, column: str, *, outcome: str | None = None):
        """A numpy float array of ``column`` (None -> dropped), optionally only rows with ``outcome``."""
        import numpy as np

        values = getattr(self, column)
        rows = [v for v, o in zip(values, self.outcome) if v is not None and (outcome is None or o == outcome)]
        return np.asarray(rows, dtype=float)

    def outcome_counts(self) -> dict:
        counts = {name: 0 for name in OUTCOMES}
        for o in self.outcome:
            counts[o] = counts.get(o, 0) + 1
        return {k: v for k, v in counts.items() if v}

    def error_counts(self) -> dict:
        """errno -> count among the connects whose outcome is "error" (EMFILE, EADDRNOTAVAIL, ENOENT...)."""
        counts: dict = {}
        for o, e in zip(self.outcome, self.errno):
            if o == "error":
                counts[e] = counts.get(e, 0) + 1
        return counts

    def ended_before_connect(self) -> dict:
        """errno -> count of the connects that never reached connect(): socket(), a socket option or epoll_ctl
        failed (EMFILE under a low ``ulimit -n``; ngx_event_connect_peer's NGX_ERROR).  They measured nothing
        about the peer: the run is short of what was asked, and the CLI says so (exit 1)."""
        counts: dict = {}
        for o, e, returned in zip(self.outcome, self.errno, self.connect_returned):
            if o == "error" and returned is None and e != "ECANCELED":
                counts[e] = counts.get(e, 0) + 1
        return counts

    def connect_returned_counts(self) -> dict:
        counts: dict = {}
        for value in self.connect_returned:
            key = "0" if value == 0 else str(value)
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- summary ---------------------------------------------------------------
    def summary(self) -> dict:
        """count, outcome counts, and percentiles (ms) of handshake time and of TCP_INFO's rtt."""
        return {
            "label": self.label,
            "scenario": self.scenario,
            "count": len(self),
            "outcomes": self.outcome_counts(),
            "connect_returned": self.connect_returned_counts(),
            "handshake_ms": percentiles(self.handshake_ms),
            "tcpi_rtt_ms": percentiles(self.tcpi_rtt_ms),
        }

    def describe(self) -> str:
        """A short human-readable table of the summary (what the CLI prints)."""
        s = self.summary()
        lines = [f"{self.label}: {s['count']} connects, timeout {self.timeout_s:g} s, concurrency {self.concurrency}",
                 "outcomes:  " + ", ".join(f"{k} {v}" + (self._errors_text() if k == "error" else "")
                                           for k, v in s["outcomes"].items()),
                 "connect(): " + ", ".join(f"{k} {v}" for k, v in s["connect_returned"].items())]
        for name, title in (("handshake_ms", "handshake"), ("tcpi_rtt_ms", "tcpi_rtt")):
            p = s[name]
            if p:
                cols = "  ".join(f"{k} {v:.3f} ms" for k, v in p.items())
                lines.append(f"{title:<10} {cols}")
        return "\n".join(lines)

    def _errors_text(self) -> str:
        """ " (EMFILE 275)": which errnos the "error" outcomes were -- a count alone hides a run out of descriptors."""
        return " (" + ", ".join(f"{e} {n}" for e, n in self.error_counts().items()) + ")"

    # -- JSON --------------------------------------------------------------------
    _COLUMNS = ("outcome", "errno", "connect_returned", "handshake_ms", "tcpi_rtt_ms", "tcpi_total_retrans",
                "start_ms", "end_ms")

    def to_dict(self) -> dict:
        return {"label": self.label, "scenario": self.scenario, "timeout_s": self.timeout_s,
                "concurrency": self.concurrency, "settings": self.settings, "meta": self.meta,
                "columns": {c: getattr(self, c) for c in self._COLUMNS}}

    @classmethod
    def from_dict(cls, data: dict) -> "Measurement":
        m = cls(label=data["label"], scenario=data["scenario"], timeout_s=data["timeout_s"],
                concurrency=data["concurrency"], settings=data.get("settings", {}), meta=data.get("meta", {}))
        for c in cls._COLUMNS:
            setattr(m, c, list(data["columns"].get(c, [None] * len(data["columns"]["outcome"]))))
        return m


# -- running -------------------------------------------------------------------

def scenario_target(scenario: str, **wire):
    """Thin alias of :func:`nbconn.lab.scenario` (the lab owns its scenarios): yields (target, client-side
    context); every wire argument is checked before the wire is probed or built."""
    from ..lab.scenarios import scenario as _scenario

    return _scenario(scenario, **wire)


def run(target_or_scenario, settings: Settings | None = None, *, count: int = 100, concurrency: int = 1,
        progress: bool = False, label: str | None = None, delay_ms=None, jitter_ms=None, loss=None, seed=None,
        **keywords) -> Measurement:
    """Connect ``count`` times and return the :class:`Measurement`.

    ``target_or_scenario``: a target ("127.0.0.1:8080", a lab Peer, ...) or a
    scenario name from :data:`nbconn.validate.SCENARIOS` (the peer is started and stopped
    around the run; "impaired" builds the wire with ``delay_ms``,
    ``jitter_ms``, ``loss``, ``seed``).  ``concurrency=1`` connects one after
    another; more runs them through :func:`nbconn.connect_many`.
    ``settings``: a :class:`~nbconn.settings.Settings` or its keywords, as for :func:`nbconn.connect`
    (here the timer defaults to 1 s, and no socket is kept: ``keep=True`` is refused).
    ``progress=True`` shows a tqdm bar (a widget in notebooks).  ``Measurement.settings`` keeps
    :meth:`Settings.to_dict` (``nginx_exact`` only when on) and the wire's arguments.
    """
    settings = given(settings, keywords, "measure.run", timeout=1.0)
    if settings.keep:
        raise ValueError("measure.run keeps no socket (a Measurement holds no Result): keep=True does not apply")
    count = validate.integer("count", count, 1, MAX_COUNT)
    concurrency = validate.integer("concurrency", concurrency, 1, validate.MAX_CONCURRENCY)
    validate.flag("progress", progress)
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str, got {shown(label)}")
    wire = {k: v for k, v in (("delay_ms", delay_ms), ("jitter_ms", jitter_ms), ("loss", loss), ("seed", seed))
            if v is not None}
    is_scenario = isinstance(target_or_scenario, str) and target_or_scenario in validate.SCENARIOS
    if wire and not (is_scenario and target_or_scenario == "impaired"):
        raise ValueError(f"{', '.join(wire)} only apply to the 'impaired' scenario, not {shown(target_or_scenario)}")
    if not is_scenario:
        from ..targets import parse_target

        try:
            parse_target(target_or_scenario)  # named errors before anything starts
        except ValueError as exc:
            raise ValueError(f"{shown(target_or_scenario)} is neither a scenario ({', '.join(validate.SCENARIOS)}) "
                             f"nor a target: {exc}") from None
    if is_scenario:
        # Family-dependent settings (bind, and TCP-only options such as syncnt on a unix- scenario) are checked
        # for the scenario's family now: connect_many would refuse them only after the peer -- sockets, a
        # temporary directory, an acceptor thread -- was built.
        from ..lab.scenarios import FAMILY

        make_plan(FAMILY[target_or_scenario], settings)
    scenario = target_or_scenario if is_scenario else getattr(target_or_scenario, "scenario", "target")
    # a target's own text as the default label, escaped as the trace escapes a path (a newline stays one line)
    label = label or (scenario if is_scenario else c_escape(str(target_or_scenario)))

    with contextlib.ExitStack() as stack:
        if is_scenario:
            target, client_side = stack.enter_context(scenario_target(target_or_scenario, **wire))
        else:
            target, client_side = target_or_scenario, contextlib.nullcontext
        bar = _progress_bar(count, label) if progress else None
        if bar is not None:
            stack.callback(bar.close)
        on_result = (lambda i, r: bar.update(1)) if bar is not None else None
        with client_side():
            results = connect_many([target] * count, settings, concurrency=concurrency, on_result=on_result)
    return Measurement.from_results(results, label=label, scenario=scenario, timeout_s=settings.timeout,
                                    concurrency=concurrency, settings={**settings.to_dict(), **wire})


def scaling(target_or_scenario, concurrencies, *, count: int = 1000, **kwargs) -> list[dict]:
    """Throughput and latency against concurrency: one :func:`run` per concurrency (``kwargs``: :func:`run`'s,
    a Settings included; the timer defaults to 2 s).

    Returns rows {"label", "concurrency", "count", "connects_per_s", "p50_ms", "p99_ms", "wall_s"}.
    """
    if kwargs.get("settings") is None:
        kwargs.setdefault("timeout", 2.0)
    rows = []
    for c in concurrencies:
        m = run(target_or_scenario, count=count, concurrency=c, **kwargs)
        p = percentiles(m.handshake_ms)
        rows.append({"label": m.label, "concurrency": c, "count": len(m), "connects_per_s": m.rate_per_s,
                     "p50_ms": p.get("p50"), "p99_ms": p.get("p99"), "wall_s": m.wall_s})
    return rows


def _progress_bar(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="connect", leave=False)
