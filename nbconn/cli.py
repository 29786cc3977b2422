"""The command line: ``python -m nbconn connect TARGET [options]`` (and more subcommands).

Exit codes: 0 connected (or the command succeeded), 1 the connect failed or
timed out, 2 bad input -- one line on stderr naming the bad value, no
traceback, and no socket was ever created.

Subcommands live next to what they run: each module that offers one exposes
``add_subcommand(subparsers)`` which registers a parser whose ``func(args)``
returns the exit code.  :data:`SUBCOMMAND_MODULES` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .options import OPTIONS

#: modules (relative to nbconn) that add a subcommand, in the order `--help` shows them
SUBCOMMAND_MODULES = ("cli", "measure", "record", "upstream")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input on the command line; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message by default)
        raise UsageError(message)


def add_socket_options(parser: argparse.ArgumentParser) -> None:
    """--rcvbuf N, --keepalive, ... one flag per entry of nbconn.options.OPTIONS, plus the flow settings."""
    group = parser.add_argument_group("socket options (seed step 2)")
    for spec in OPTIONS.values():
        flag = "--" + spec.name.replace("_", "-")
        if spec.kind == "bool":
            group.add_argument(flag, dest=spec.name, action="store_true", default=None, help=spec.doc)
        else:
            group.add_argument(flag, dest=spec.name, type=_int_arg(flag), default=None, metavar="N", help=spec.doc)
    group.add_argument("--bind", default=None, metavar="HOST[:PORT]", help="local address to bind() (proxy_bind)")
    flow = parser.add_argument_group("the flow")
    flow.add_argument("--timeout", type=_float_arg("--timeout"), default=5.0, metavar="S",
                      help="connect timer in seconds (proxy_connect_timeout); default 5")
    flow.add_argument("--nonblocking", choices=("ioctl", "fcntl", "setblocking"), default="ioctl",
                      help="how to make the socket non-blocking (seed step 3); default ioctl(FIONBIO)")
    flow.add_argument("--trigger", choices=("edge", "level"), default="edge",
                      help="epoll EPOLLET (nginx) or level-triggered (seed step 4)")


def socket_options(args: argparse.Namespace) -> dict:
    """The keyword options for nbconn.connect from parsed arguments (None = leave the default)."""
    opts = {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}
    if getattr(args, "bind", None) is not None:
        opts["bind"] = args.bind
    return opts


def _int_arg(flag: str):
    def parse(text: str) -> int:
        try:
            return int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a whole number") from None

    return parse


def _float_arg(flag: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number") from None

    return parse


# -- connect ------------------------------------------------------------------

def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("connect", help="connect once, nginx's way, and show every step",
                              description="Run the five steps of ngx_event_connect_peer against TARGET "
                                          "and print the trace.")
    p.add_argument("target", help="HOST:PORT, [V6ADDR]:PORT or unix:/path")
    add_socket_options(p)
    p.add_argument("--nginx-exact", action="store_true",
                   help="exactly nginx's syscalls: no SOCK_CLOEXEC, no option read-back, no TCP_INFO, "
                        "no EPOLL_CTL_DEL before close")
    p.add_argument("--json", action="store_true", help="print Result.to_dict() as JSON")
    p.set_defaults(func=run_connect)


def run_connect(args: argparse.Namespace) -> int:
    from .api import connect

    result = connect(args.target, timeout=args.timeout, nonblocking=args.nonblocking, trigger=args.trigger,
                     keep=False, nginx_exact=args.nginx_exact, **socket_options(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.trace())
        if result.ngx_log:
            print(f"nginx would log [{result.ngx_level}]: {result.ngx_log}")
    return EXIT_OK if result.connected else EXIT_FAILED


# -- entry point ----------------------------------------------------------------

def one_line(text: str) -> str:
    """Escape control characters (a newline or CR typed into an argument) so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m nbconn",
                     description="nginx's non-blocking TCP connect flow, run for real and measured.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = sys.modules[__name__] if name == "cli" else importlib.import_module(f"nbconn.{name}")
        except ModuleNotFoundError as exc:  # a subcommand whose module is not part of this checkout
            if exc.name != f"nbconn.{name}":
                raise
            continue
        module.add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, TypeError) as exc:
        print(f"nbconn: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nbconn: interrupted", file=sys.stderr)
        return 130
