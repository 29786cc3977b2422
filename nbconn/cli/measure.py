"""``python -m nbconn measure SCENARIO_OR_TARGET``: N connects, summarised (nbconn.measure)."""

from __future__ import annotations

import json
import sys

from .. import validate
from . import EXIT_OK, EXIT_USAGE, add_socket_options, float_arg, int_arg, socket_options

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
    from ..measure import run as measure_run

    try:
        m = measure_run(args.target, count=args.count, concurrency=args.concurrency, timeout=args.timeout,
                        nonblocking=args.nonblocking, trigger=args.trigger, delay_ms=args.delay_ms,
                        jitter_ms=args.jitter_ms, loss=args.loss, seed=args.seed, **socket_options(args))
    except RuntimeError as exc:  # the wire cannot run here: say why in one line
        print(f"nbconn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        s = m.summary()
        keep = ("p50", "p90", "p99", "max")
        print(json.dumps({"scenario": m.scenario, "count": s["count"], "outcomes": s["outcomes"],
                          "handshake_ms": {k: v for k, v in s["handshake_ms"].items() if k in keep},
                          "tcpi_rtt_ms": {k: v for k, v in s["tcpi_rtt_ms"].items() if k in keep}}, indent=2))
    else:
        print(m.describe())
    return EXIT_OK
