"""``python -m nbconn connect TARGET``: one connect, nginx's way, with every step shown.

Exit 0 connected, 1 the connect failed or timed out (the trace says how).
"""

from __future__ import annotations

import argparse
import json

from . import EXIT_FAILED, EXIT_OK, add_socket_options, socket_options

NAME = "connect"


def add(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="connect once, nginx's way, and show every step",
                              description="Run the steps of ngx_event_connect_peer against TARGET "
                                          "and print the trace.")
    p.add_argument("target", help="HOST:PORT, [V6ADDR]:PORT or unix:/path")
    add_socket_options(p)
    p.add_argument("--json", action="store_true", help="print Result.to_dict() as JSON")
    p.set_defaults(func=run)


def connect_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments for nbconn.connect / connect_many from parsed arguments (one place for both)."""
    return {"timeout": args.timeout, "nonblocking": args.nonblocking, "trigger": args.trigger, **socket_options(args)}


def run(args: argparse.Namespace) -> int:
    from ..api import connect

    result = connect(args.target, keep=False, **connect_kwargs(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.trace())
        if result.ngx_log:
            print(f"nginx would log [{result.ngx_level}]: {result.ngx_log}")
    return EXIT_OK if result.connected else EXIT_FAILED
