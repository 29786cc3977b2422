"""``python -m nbconn measure SCENARIO_OR_TARGET``: N connects, summarised (nbconn.experiments.measure)."""

from __future__ import annotations

import json
import sys

from .. import validate
from . import EXIT_FAILED, EXIT_OK, add_socket_options, float_arg, int_arg, one_line, settings_from_args

NAME = "measure"


def add(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="connect N times and summarise handshake times and outcomes",
                              description="Run N connects against a lab scenario or a target and summarise them.")
    p.add_argument("target", metavar="SCENARIO_OR_TARGET",
                   help=f"one of {', '.join(validate.SCENARIOS)}, or HOST:PORT / [V6]:PORT / unix:/path")
    p.add_argument("--count", type=int_arg("--count"), default=100, metavar="N")
    p.add_argument("--concurrency", type=int_arg("--concurrency"), default=1, metavar="C")
    p.add_argument("--delay-ms", type=float_arg("--delay-ms"), default=None, metavar="D")
    p.add_argument("--jitter-ms", type=float_arg("--jitter-ms"), default=None, metavar="J")
    p.add_argument("--loss", type=float_arg("--loss"), default=None, metavar="P")
    p.add_argument("--seed", type=int_arg("--seed"), default=None)
    add_socket_options(p, timeout=1.0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.measure import run as measure_run

    try:
        m = measure_run(args.target, settings_from_args(args), count=args.count, concurrency=args.concurrency,
                        delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=args.loss, seed=args.seed)
    except RuntimeError as exc:  # the lab or the wire cannot run here: the input was fine, so 1 (2 is bad input)
        print(f"nbconn: cannot measure here: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        s = m.summary()
        keep = ("p50", "p90", "p99", "max")
        data = {"scenario": m.scenario, "count": s["count"], "outcomes": s["outcomes"],
                "handshake_ms": {k: v for k, v in s["handshake_ms"].items() if k in keep},
                "tcpi_rtt_ms": {k: v for k, v in s["tcpi_rtt_ms"].items() if k in keep}}
        if "error" in s["outcomes"]:
            data["errors"] = m.error_counts()  # errno -> count of the "error" outcomes, e.g. {"EMFILE": 275}
        print(json.dumps(data, indent=2))
    else:
        print(m.describe())
    short = m.ended_before_connect()
    if short:
        # Connects that never reached connect() (EMFILE: out of descriptors) measured nothing: the summary above
        # is of fewer connects than asked for.  The machine refused something while running: exit 1, one line.
        print(f"nbconn: failed: {sum(short.values())} of {len(m)} connects ended before connect(): "
              + ", ".join(_errno_text(name, n) for name, n in short.items()), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _errno_text(name: str, count: int) -> str:
    """``EMFILE 275 (Too many open files; the open-file limit, ulimit -n, is 32)``."""
    import errno
    import os
    import resource

    number = getattr(errno, str(name), None)
    detail = os.strerror(number) if isinstance(number, int) else ""
    if number == errno.EMFILE:
        detail += f"; the open-file limit, ulimit -n, is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
    return f"{name} {count}" + (f" ({detail})" if detail else "")
