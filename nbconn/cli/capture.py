"""``python -m nbconn capture SCENARIO``: one connect with its packets, on the trace's clock.

``--json`` prints ``{"packets": [{"t_ns", "dir": "out"|"in", "flags": "S"|"SA"|"A"|"R"|"RA"|...}, ...],
"steps": [...the Result's steps...]}``, every ``t_ns`` in ns since the connect's socket() call.
Needs CAP_NET_RAW (root) for the packet socket; the reason is printed when it is missing.

Exit 0 the scenario ran (whatever the connect's outcome: refused is what "refused" shows),
1 it could not run here, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import validate
from . import EXIT_FAILED, EXIT_OK, float_arg, int_arg

NAME = "capture"


def add(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="capture a connect's packets (SYN, SYN-ACK, RST...) next to its syscalls",
                              description="Run one lab scenario with an AF_PACKET capture around it and print "
                                          "syscalls and packets on one clock.")
    p.add_argument("scenario", choices=validate.CAPTURE_SCENARIOS)
    p.add_argument("--delay-ms", type=float_arg("--delay-ms"), default=10.0, metavar="MS",
                   help="one-way delay of the impaired link (default 10: a 20 ms round trip)")
    p.add_argument("--timeout", type=float_arg("--timeout"), default=None, metavar="S",
                   help="the connect timer (default 2.5 s for blackhole: three SYNs; else 3 s)")
    p.add_argument("--burst", type=int_arg("--burst"), default=20, metavar="N",
                   help="connects at once for slow-accept and syncookie (default 20)")
    p.add_argument("--json", action="store_true", help="print packets and steps as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments import nb11

    # every value checked before anything is opened
    validate.number("--delay-ms", args.delay_ms, 0, 1000)
    if args.timeout is not None:
        validate.number("--timeout", args.timeout, 0, 60, low_open=True)
    validate.integer("--burst", args.burst, 2, 200)
    try:
        shot = nb11.shoot(args.scenario, delay_ms=args.delay_ms, timeout=args.timeout, burst=args.burst)
    except (PermissionError, RuntimeError) as exc:
        print(f"nbconn: cannot capture here: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(shot.to_dict(), indent=2))
    else:
        print(f"{shot.scenario}: {shot.where}")
        print(shot.timeline())
        print(f"-> {shot.result.summary()}; on the wire: {shot.story()}")
        if shot.note:
            print(f"   {shot.note}")
    return EXIT_OK
