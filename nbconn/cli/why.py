"""``python -m nbconn why 'LINE' ...`` / ``why --log FILE``: nginx error-log lines decoded (nbconn.nginx.why).

The decoding is :mod:`nbconn.nginx.why` (pure); this module reads the input -- arguments, a
file, ``-`` for stdin, a rotated ``.gz`` -- in bounded memory, and prints.  Every input
is checked before anything else happens: an empty or binary argument, a missing,
unreadable or directory path is one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import os
import stat
import sys

from . import EXIT_OK, UsageError, int_arg

NAME = "why"

MAX_LINE = 65536  # a longer line is read in pieces and counted as not an nginx line (bounded memory)
_CHUNK = 1 << 16


def add(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="decode nginx error-log lines: which step of the connect flow, and why",
                              description="For each upstream-related nginx error-log line: the step of the connect "
                                          "flow it comes from, the errno and what the kernel did, nginx's code and "
                                          "next-upstream kind, whether nginx tries another peer and counts it "
                                          "against max_fails, the level, and the notebook that teaches it.")
    p.add_argument("lines", nargs="*", metavar="LINE", help="an error-log line: the whole line as nginx writes it (date, [level], "
                   "pid#tid: *conn, message), or just its message")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="summarise an error log: counts per cause and per upstream, first/last seen, bursts; "
                        "'-' reads stdin; gzip files (rotated .gz) are read as such")
    p.add_argument("--burst", type=int_arg("--burst"), default=10, metavar="N",
                   help="with --log: N or more lines of one cause in one second make a burst; default 10")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.add_argument("--reproduce", action="store_true",
                   help="for each decoded LINE: build the situation with the lab's peers on loopback/AF_UNIX, run "
                        "nbconn's upstream model and a real nginx on it, and print the lines they wrote")
    p.set_defaults(func=run)


def check_line(i: int, text: str) -> str:
    """A command-line LINE, or UsageError naming it: empty, or not text (NUL, control bytes, undecodable)."""
    if not text.strip():
        raise UsageError(f"LINE {i} is empty")
    if any(c in text for c in "\x00") or any(0xDC80 <= ord(c) <= 0xDCFF for c in text) \
            or any(not c.isprintable() and c not in "\t\r\n" for c in text):
        raise UsageError(f"LINE {i} is not text (it holds binary or control bytes)")
    return text


def open_log(path: str):
    """The log as a binary stream, or UsageError: missing, a directory, unreadable, not a file."""
    import gzip

    if path == "-":
        stream = sys.stdin.buffer
    else:
        if not path:
            raise UsageError("--log needs a file name (or - for stdin)")
        try:
            info = os.stat(path)
        except OSError as exc:
            raise UsageError(f"--log {path!r}: {exc.strerror}") from None
        import stat

        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"--log {path!r} is a directory")
        try:
            stream = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"--log {path!r}: cannot read it ({exc.strerror})") from None
    try:
        magic = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    except OSError as exc:
        stream.close()
        raise UsageError(f"--log {path!r}: cannot read it ({exc.strerror})") from None
    if magic == b"\x1f\x8b":  # gzip's magic: a rotated error.log.1.gz, whatever its name
        return gzip.GzipFile(fileobj=stream, mode="rb"), stream
    return stream, stream


def log_lines(stream):
    """Lines as text, each at most MAX_LINE bytes read at a time: a longer one yields its first piece, marked
    with a NUL so it is never an nginx line, and the rest is skipped."""
    while True:
        raw = stream.readline(MAX_LINE)
        if not raw:
            return
        if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
            while True:  # skip to the end of this overlong line
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith(b"\n"):
                    break
            yield "\x00(overlong line)"
            continue
        yield raw.decode("utf-8", "replace")


def _stdin_is_piped() -> bool:
    """A pipe or a file redirected into stdin (not a terminal, not /dev/null, not closed)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # closed, or replaced by an object without a descriptor
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def run(args) -> int:
    if args.log is not None and args.lines:
        raise UsageError("give LINEs or --log FILE, not both")
    if args.log is None and not args.lines:
        if not _stdin_is_piped():
            raise UsageError("give at least one LINE, or --log FILE (- for stdin)")
        args.log = "-"  # `tail error.log | nbconn why`: what a pipe into it means
    if not 1 <= args.burst <= 1_000_000:
        raise UsageError(f"--burst {args.burst} is outside 1..1000000")
    if args.reproduce and args.log is not None:
        raise UsageError("--reproduce works on LINEs, not on --log")
    for i, text in enumerate(args.lines, 1):
        check_line(i, text)
    from ..nginx import why

    if args.log is not None:
        return _summarise(args, why)
    answers = [why.decode(text) for text in args.lines]
    reproduced = None
    if args.reproduce:
        from ..nginx import reproduce

        reproduced = [reproduce.reproduce(a) for a in answers]
    if args.json:
        out = answers if reproduced is None else [dict(a, reproduced=r) for a, r in zip(answers, reproduced)]
        print(json.dumps({"lines": out}, indent=2))
    else:
        for i, answer in enumerate(answers):
            print(("\n" if i else "") + why.render(answer))
            if reproduced:
                print(reproduce_text(reproduced[i]))
    return EXIT_OK


def reproduce_text(rep: dict) -> str:
    if not rep.get("made"):
        return f"  reproduce:  not here: {rep['reason']}"
    out = [f"  reproduce:  {rep['situation']}", f"    given:    {rep['given']}"]
    for who in ("model", "nginx"):
        value = rep.get(who)
        if isinstance(value, str):
            out.append(f"    {who + ':':<9} {value}")
        else:
            mark = "same cause" if value and value.get("same") else "differs"
            shown = value.get("line") if value else None
            out.append(f"    {who + ':':<9} {shown or '(no line)'}   ({mark})")
            if value and value.get("note"):
                out.append(f"              {value['note']}")
    return "\n".join(out)


def _summarise(args, why) -> int:
    import gzip
    import zlib

    stream, raw = open_log(args.log)
    summary = why.Summary(burst=args.burst)
    try:
        for text in log_lines(stream):
            summary.add(text)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UsageError(f"--log {args.log!r}: not a readable gzip file ({exc or type(exc).__name__}) after "
                         f"{summary.lines} lines") from None
    finally:
        if raw is not sys.stdin.buffer:
            stream.close()
            raw.close()
    result = summary.finish()
    print(json.dumps(result, indent=2) if args.json else why.render_summary(result))
    return EXIT_OK
