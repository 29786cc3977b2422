"""strace's way of printing things, in one place: sockaddrs, a call with its result, a duration.

The trace of a connect (:meth:`nbconn.result.Result.trace`) is meant to be read
next to ``strace -f -r -T`` of nginx's worker, so nbconn prints calls the way
strace does.  This module only formats; it imports nothing from nbconn.
"""

from __future__ import annotations

import socket

_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


def sockaddr_text(family: int, address: object) -> str:
    """A sockaddr as strace prints it (close enough to read side by side)."""
    if family == _AF_INET:
        host, port = address[:2]
        return f'{{sa_family=AF_INET, sin_port=htons({port}), sin_addr=inet_addr("{host}")}}'
    if family == _AF_INET6:
        host, port = address[:2]
        return f'{{sa_family=AF_INET6, sin6_port=htons({port}), inet_pton(AF_INET6, "{host}", &sin6_addr)}}'
    raw = address if isinstance(address, bytes) else address.encode("utf-8", "surrogateescape")
    if raw.startswith(b"\x00"):  # the abstract namespace: strace marks it with an @ before the quotes
        return f'{{sa_family=AF_UNIX, sun_path=@"{c_escape(raw[1:])}"}}'
    return f'{{sa_family=AF_UNIX, sun_path="{c_escape(raw)}"}}'


# strace's string_quote() (strace, src/util.c): the letter escapes of C, a backslash before '"' and
# '\\', printable ASCII as it is, every other byte in octal -- three digits only when an octal digit
# follows (else "\1" then "7" would read back as "\17").  A path with a newline or an ESC in it thus
# stays on its line and never reaches the terminal as a control sequence.
_LETTER_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v"}


def c_escape(value: str | bytes) -> str:
    """``value`` escaped as strace prints a string's bytes, without the quotes: ``a\\nb``, ``\\33[31m``, ``\\303``.

    A str is taken as the bytes the kernel sees (UTF-8, with surrogate escapes for bytes that were not).
    nbconn prints every AF_UNIX path through here: in a trace's sockaddr and in nginx's log line.
    """
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            return value  # the common case (an address, a plain path): nothing to do
        value = value.encode("utf-8", "surrogateescape")
    out = []
    for i, byte in enumerate(value):
        if byte in _LETTER_ESCAPES:
            out.append(_LETTER_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        elif i + 1 < len(value) and 0x30 <= value[i + 1] <= 0x37:
            out.append(f"\\{byte:03o}")
        else:
            out.append(f"\\{byte:o}")
    return "".join(out)


def sockaddr_len(family: int, address: object) -> int:
    """The addrlen argument: sizeof(struct sockaddr_in/_in6), or the AF_UNIX path's length + 2 (+1 for the NUL)."""
    if family == _AF_INET:
        return 16
    if family == _AF_INET6:
        return 28
    raw = address if isinstance(address, bytes) else address.encode()
    return 2 + len(raw) + (0 if raw.startswith(b"\x00") else 1)


def call_text(text: str, ret: object) -> str:
    """``connect(5, ...)`` and its result: ``= 0``, ``= 5`` or ``= -1 EINPROGRESS`` (an errno name is a str "E...")."""
    if isinstance(ret, str) and ret.startswith("E"):
        return f"{text} = -1 {ret}"
    return f"{text} = {ret}"


def format_ns(ns: float | None) -> str:
    """A duration for people: ``"85.2 µs"``, ``"200.3 ms"`` from 1 ms, ``"10.01 s"`` from 1 s; None -> ``"-"``.

    The one duration formatter of nbconn: Result.summary(), Result.trace(), the
    widgets and the plots' labels all use it, so one number reads the same everywhere.
    """
    if ns is None:
        return "-"
    size = abs(ns)
    if size >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if size >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.1f} µs"
