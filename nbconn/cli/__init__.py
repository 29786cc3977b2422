"""The command line: ``python -m nbconn COMMAND ...`` and the ``nbconn`` console script.

Exit codes, one meaning each: 0 connected (or the command succeeded); 1 the
connect failed or timed out, or the machine refused something while running (an
OSError such as EMFILE, connects of a measurement that never reached connect(),
the lab or the wire cannot run here: one line, no traceback); 2 bad input only --
one line on stderr naming the bad value, before any socket, namespace or process
exists; 130 interrupted.

This package owns every subcommand; the library modules (``nbconn.experiments.measure``,
``nbconn.nginx.upstream``, ``nbconn.experiments.record``, ...) know nothing about it and never
import it.  One module per subcommand, each with::

    NAME = "connect"                       # the word typed on the command line
    def add(subparsers) -> None: ...       # register the parser, set func=run
    def run(args) -> int: ...              # do it, return the exit code

Adding a subcommand = a new module here and its name in :data:`SUBCOMMANDS`.
The modules import the library lazily inside ``run`` so ``--help`` and bad
input stay fast and touch nothing.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from .. import validate

#: subcommand modules (nbconn.cli.<name>), in the order ``--help`` lists them
SUBCOMMANDS = ("connect", "measure", "upstream", "record", "capture", "why")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input on the command line; printed as one line, exit 2."""


# -- flags given once --------------------------------------------------------------
# argparse lets a later `--timeout 9` silently replace an earlier `--timeout 1`; a typo
# or a pasted command line then runs with a value the user did not mean.  Every
# single-valued flag goes through one of these actions, which refuse a second use.

def _once(base):
    class Once(base):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string is not None:
                seen = namespace.__dict__.setdefault("_given", set())
                if self.dest in seen:
                    raise argparse.ArgumentError(None, f"{option_string} given twice")
                seen.add(self.dest)
            super().__call__(parser, namespace, values, option_string)

    Once.__name__ = f"Once{base.__name__}"
    return Once


_ONCE_ACTIONS = {None: _once(argparse._StoreAction), "store": _once(argparse._StoreAction),
                 "store_true": _once(argparse._StoreTrueAction), "store_false": _once(argparse._StoreFalseAction),
                 "store_const": _once(argparse._StoreConstAction)}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--time 3` must not quietly mean --timeout
        super().__init__(*args, **kwargs)
        # argparse takes "-1:80" for an unknown option (only "-1" and "-.5" look like negative numbers to it) and
        # then says "target required"; nbconn has no option that starts with "-" and a digit, so a word that does
        # is a value, and the target parser names what is wrong with it.
        self._negative_number_matcher = re.compile(r"-\.?[0-9]")
        for name, action in _ONCE_ACTIONS.items():
            self.register("action", name, action)

    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message and exits by default)
        raise UsageError(message)


# -- values ---------------------------------------------------------------------------
# One rule for numbers typed on a command line: nbconn.validate (ASCII digits only,
# at most 30 of them, no inf/nan).  Range checks happen where the value is used.

def _typed_arg(flag: str, parse_text):
    """An argparse ``type=`` that parses with ``parse_text(flag, text)`` and says what was wrong in one line."""
    def parse(text: str):
        try:
            return parse_text(flag, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def int_arg(flag: str):
    """An argparse ``type=`` for a whole number (``--count 10``)."""
    return _typed_arg(flag, validate.int_text)


def float_arg(flag: str):
    """An argparse ``type=`` for a number (``--timeout 0.2``)."""
    return _typed_arg(flag, validate.float_text)


def add_socket_options(parser: argparse.ArgumentParser, *, timeout: float = 5.0) -> None:
    """--rcvbuf N, --keepalive, ... one flag per entry of nbconn.options.OPTIONS, plus the flow settings."""
    from ..options import OPTIONS

    group = parser.add_argument_group("socket options (ngx_event_connect_peer, step 2)")
    for spec in OPTIONS.values():
        flag = "--" + spec.name.replace("_", "-")
        if spec.kind == "bool":
            group.add_argument(flag, dest=spec.name, action="store_true", default=None, help=spec.doc)
        else:
            group.add_argument(flag, dest=spec.name, type=int_arg(flag), default=None, metavar="N", help=spec.doc)
    group.add_argument("--bind", default=None, metavar="HOST[:PORT]", help="local address to bind() (proxy_bind)")
    flow = parser.add_argument_group("the flow")
    flow.add_argument("--timeout", type=float_arg("--timeout"), default=timeout, metavar="S",
                      help=f"connect timer in seconds (proxy_connect_timeout); default {timeout:g}")
    flow.add_argument("--nonblocking", choices=validate.NONBLOCKING_METHODS, default="ioctl",
                      help="how to make the socket non-blocking (step 3); default ioctl(FIONBIO)")
    flow.add_argument("--trigger", choices=validate.TRIGGERS, default="edge",
                      help="epoll EPOLLET (nginx) or level-triggered (step 4)")
    flow.add_argument("--nginx-exact", action="store_true",
                      help="exactly nginx's syscalls: no SOCK_CLOEXEC, no option read-back, no TCP_INFO, "
                           "no EPOLL_CTL_DEL before close")


def settings_from_args(args: argparse.Namespace, **fixed):
    """The :class:`nbconn.settings.Settings` the flags of :func:`add_socket_options` describe, plus what the
    command fixes (``keep=False``): the CLI's one constructor; Settings checks every value (exit 2)."""
    from ..options import OPTIONS
    from ..settings import Settings

    options = {name: getattr(args, name) for name in (*OPTIONS, "bind") if getattr(args, name, None) is not None}
    return Settings(timeout=args.timeout, nonblocking=args.nonblocking, trigger=args.trigger,
                    nginx_exact=args.nginx_exact, **options, **fixed)


# -- entry point ------------------------------------------------------------------------

def one_line(text: str) -> str:
    """Escape control characters (a newline or CR typed into an argument) so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m nbconn",
                     description="nginx's non-blocking TCP connect flow, run for real and measured.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, TypeError) as exc:
        print(f"nbconn: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            # Ctrl-C while a class body was being set up: Python 3.10 wraps it ("Error calling __set_name__")
            print("nbconn: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        # The lab or the wire cannot run here, a lab helper is gone: the inputs were fine, so exit 1 (2 is bad
        # input only), in one line.
        print(f"nbconn: failed: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # The machine said no while running (EMFILE under a low `ulimit -n`, ENOSPC, EACCES...):
        # the inputs were fine, so exit 1, and say what failed in one line.
        print(f"nbconn: failed: {one_line(_os_error_text(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("nbconn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _os_error_text(exc: OSError) -> str:
    import errno as errno_names

    if exc.errno is None:
        return str(exc) or type(exc).__name__
    name = errno_names.errorcode.get(exc.errno, str(exc.errno))
    where = f": {exc.filename!r}" if exc.filename is not None else ""
    if exc.errno == errno_names.EMFILE:
        import resource

        where += f" (the open-file limit, ulimit -n, is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
    return f"{name} ({exc.strerror}){where}"
