"""``python -m nbconn connect TARGET [TARGET...]``: one connect, nginx's way, with every step shown.

With several targets (the addresses of one name) it walks them in order as an nginx request
walks its peers under ``proxy_next_upstream``; with ``--happy-eyeballs SECONDS`` it races them
RFC 8305's way instead (:mod:`nbconn.experiments.eyeballs`).  ``--json`` then prints
``{"winner": "HOST:PORT" or null, "elapsed_ms": ..., "attempts": [Result dicts]}``.

With ``--tls`` the connect is followed by the upstream TLS handshake nginx runs for ``proxy_pass https://``
(:mod:`nbconn.cli.connect_tls`, :mod:`nbconn.nginx.tls`).

Exit 0 connected, 1 the connect failed or timed out (the trace says how).
"""

from __future__ import annotations

import argparse
import json

from . import EXIT_FAILED, EXIT_OK, add_socket_options, connect_tls, float_arg, settings_from_args

NAME = "connect"


def add(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="connect once, nginx's way, and show every step",
                              description="Run the steps of ngx_event_connect_peer against TARGET "
                                          "and print the trace.")
    p.add_argument("target", nargs="+", help="HOST:PORT, [V6ADDR]:PORT or unix:/path; several: tried in order, "
                                             "nginx's way (one peer after another)")
    add_socket_options(p)
    p.add_argument("--happy-eyeballs", type=float_arg("--happy-eyeballs"), default=None, metavar="SECONDS",
                   help="race the targets RFC 8305's way: start the next one after SECONDS (0.25 is the RFC's "
                        "default) or as soon as one fails; the first to connect wins")
    p.add_argument("--json", action="store_true", help="print Result.to_dict() as JSON (several targets: winner, "
                                                       "elapsed_ms, attempts)")
    connect_tls.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    connect_tls.check(args)
    if args.tls:
        return connect_tls.run(args)
    if len(args.target) > 1 or args.happy_eyeballs is not None:
        return run_race(args)
    from ..api import connect

    result = connect(args.target[0], settings_from_args(args, keep=False))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.trace())
        if result.ngx_log:
            print(f"nginx would log [{result.ngx_level}]: {result.ngx_log}")
    return EXIT_OK if result.connected else EXIT_FAILED


def run_race(args: argparse.Namespace) -> int:
    """Several addresses: nginx's walk, or happy eyeballs with --happy-eyeballs."""
    from ..experiments import eyeballs
    from .. import validate
    from ..strace import c_escape

    settings = settings_from_args(args, keep=False)
    if args.happy_eyeballs is not None:
        validate.number("--happy-eyeballs", args.happy_eyeballs, 0, validate.MAX_TIMEOUT_S)
    if args.happy_eyeballs is None:
        race = eyeballs.sequential(args.target, settings)
    else:
        race = eyeballs.happy_eyeballs(args.target, settings, delay=args.happy_eyeballs)
    if args.json:
        print(json.dumps(race.to_dict(), indent=2))
    else:
        print(race.timeline())
        for result in race.attempts:
            print(f"\n{c_escape(result.target)}:")  # a unix: path with a newline stays one line
            print(result.trace())
        print(f"\n{race.summary()}")
    return EXIT_OK if race.connected else EXIT_FAILED
