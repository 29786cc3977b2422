"""Seed step 2: the socket options a connect can set, checked up front and read back after.

What nginx 1.22.1 sets on an upstream socket, in ``ngx_event_connect_peer``
(``src/event/ngx_event_connect.c``), and nothing else:

* right after ``socket()``: SO_RCVBUF when ``pc->rcvbuf`` is non-zero (lines 66-74) -- a
  failure is NGX_ERROR: logged at alert, the connection closed, no other peer tried.
  No directive of 1.22.1 sets ``pc->rcvbuf`` (``listen ... rcvbuf=`` is for listening
  sockets; no in-tree module assigns the peer's field), so stock nginx makes this call
  only from a third-party module; nbconn's ``rcvbuf=`` shows what it would do.
  Then SO_KEEPALIVE when ``proxy_socket_keepalive on`` (lines 76-86;
  ngx_http_upstream.c line 642) -- a failure is logged at alert
  "setsockopt(SO_KEEPALIVE) failed, ignored" and the connect goes on;
* after ``ngx_nonblocking()`` (ioctl FIONBIO), only when a local address is
  configured (``proxy_bind``): IP_TRANSPARENT for ``proxy_bind ... transparent``
  (lines 97-103, via ngx_event_connect_set_transparent, lines 335-413: a failure is
  NGX_ERROR; IPV6_TRANSPARENT for an IPv6 address, which nbconn does not offer),
  then IP_BIND_ADDRESS_NO_PORT = 1 *by itself* when the address has no port and the
  peer is not AF_UNIX (lines 109-131: a failure is "failed, ignored", silent for
  EOPNOTSUPP/ENOPROTOOPT), then ``bind()``.

nginx 1.22.1 never sets SO_SNDBUF, SO_REUSEADDR (only for a SOCK_DGRAM bind with a
port), SO_LINGER, TCP_SYNCNT or TCP_USER_TIMEOUT on an upstream socket, and
TCP_NODELAY only after the connect, on an SSL upstream with session reuse
(ngx_http_upstream.c, ngx_http_upstream_ssl_init_connection, line 1720).  nbconn offers them to show what they
change; their failures are ignored like SO_KEEPALIVE's (:mod:`nbconn.errors` holds
the table).  nbconn applies the options in :data:`OPTIONS` order at nginx's place
(``transparent`` and ``bind_address_no_port`` between ioctl and bind(), see
:mod:`nbconn.flow`).

The kernel does not always keep what you ask for: SO_RCVBUF/SO_SNDBUF are
doubled (socket(7): "the kernel doubles this value ... to allow space for
bookkeeping overhead") and capped by ``net.core.rmem_max``/``wmem_max``.  That
is why every option is *read back* with getsockopt and both values are kept
(nginx reads nothing back, and neither does nginx-exact mode).

Each option is described once in :data:`OPTIONS` (name, level, optname, value
kind, range).  :func:`check_options` validates a user's keyword arguments
against that table -- a ValueError/TypeError naming the bad value, before any
socket exists -- and returns the ordered list the flow applies; it runs once, when a
:class:`nbconn.settings.Settings` is made.  :func:`fit_family` adds the checks that
need the target's family, when :func:`nbconn.flow.make_plan` compiles the Settings.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from . import validate
from .validate import shown

# Constants Python's socket module does not export on every version.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
TCP_SYNCNT = getattr(socket, "TCP_SYNCNT", 7)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)

_INT_MAX = 2**31 - 1
_INET = (socket.AF_INET, socket.AF_INET6)
_ALL = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


@dataclass(frozen=True)
class OptionSpec:
    """One socket option: how to validate it, set it and read it back."""

    name: str  # the keyword users pass: rcvbuf=65536
    level: int
    optname: int
    level_name: str  # as strace prints it
    opt_name: str
    kind: str  # "bool", "int" or "linger"
    low: int = 0
    high: int = _INT_MAX
    families: tuple = _ALL
    doc: str = ""

    def validate(self, value: object) -> object:
        """Return the normalised value or raise ValueError/TypeError naming it (nbconn.validate's rule)."""
        if self.kind == "bool":
            return validate.flag(self.name, value)
        return validate.integer(self.name, value, self.low, self.high)

    def encode(self, value: object) -> int | bytes:
        if self.kind == "linger":
            return struct.pack("ii", 1, value)
        return int(value)

    def read(self, sock: socket.socket) -> object:
        """getsockopt: the value the kernel actually holds."""
        if self.kind == "linger":
            onoff, secs = struct.unpack("ii", sock.getsockopt(self.level, self.optname, 8))
            return secs if onoff else None
        raw = sock.getsockopt(self.level, self.optname)
        return bool(raw) if self.kind == "bool" else raw

    def show(self, value: object) -> str:
        """The value as strace shows the option argument."""
        if self.kind == "linger":
            return "{l_onoff=0, l_linger=0}" if value is None else f"{{l_onoff=1, l_linger={value}}}"
        return f"[{int(value)}]"

    @property
    def size(self) -> int:
        return 8 if self.kind == "linger" else 4


_S, _T, _IP = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP

#: Every option nbconn knows, in the order the flow applies them (nginx's order first).
OPTIONS: dict[str, OptionSpec] = {
    spec.name: spec
    for spec in (
        OptionSpec("rcvbuf", _S, socket.SO_RCVBUF, "SOL_SOCKET", "SO_RCVBUF", "int", 1,
                   doc="receive buffer bytes; the kernel doubles it, capped by net.core.rmem_max"),
        OptionSpec("sndbuf", _S, socket.SO_SNDBUF, "SOL_SOCKET", "SO_SNDBUF", "int", 1,
                   doc="send buffer bytes; the kernel doubles it, capped by net.core.wmem_max"),
        OptionSpec("keepalive", _S, socket.SO_KEEPALIVE, "SOL_SOCKET", "SO_KEEPALIVE", "bool",
                   doc="TCP keepalive probes on an idle connection (nginx: proxy_socket_keepalive)"),
        OptionSpec("reuseaddr", _S, socket.SO_REUSEADDR, "SOL_SOCKET", "SO_REUSEADDR", "bool",
                   doc="allow bind() to a local address in TIME_WAIT"),
        OptionSpec("linger", _S, socket.SO_LINGER, "SOL_SOCKET", "SO_LINGER", "linger", 0, 3600,
                   doc="seconds close() waits for unsent data; 0 = close() sends RST, no TIME_WAIT"),
        OptionSpec("nodelay", _T, socket.TCP_NODELAY, "SOL_TCP", "TCP_NODELAY", "bool", families=_INET,
                   doc="disable Nagle's algorithm"),
        OptionSpec("syncnt", _T, TCP_SYNCNT, "SOL_TCP", "TCP_SYNCNT", "int", 1, 127, families=_INET,
                   doc="SYN retransmissions before connect fails with ETIMEDOUT"),
        OptionSpec("user_timeout", _T, TCP_USER_TIMEOUT, "SOL_TCP", "TCP_USER_TIMEOUT", "int", 0, _INT_MAX,
                   families=_INET, doc="ms unacknowledged data (or SYNs) may wait before ETIMEDOUT; 0 = off"),
        OptionSpec("transparent", _IP, IP_TRANSPARENT, "SOL_IP", "IP_TRANSPARENT", "bool", families=(socket.AF_INET,),
                   doc="bind() may take an address this host lacks (nginx: proxy_bind ... transparent; needs "
                       "CAP_NET_RAW or CAP_NET_ADMIN; a failure is NGX_ERROR)"),
        OptionSpec("bind_address_no_port", _IP, IP_BIND_ADDRESS_NO_PORT, "SOL_IP", "IP_BIND_ADDRESS_NO_PORT",
                   "bool", families=_INET,
                   doc="bind() picks no port; connect() picks it (nginx sets it before bind when proxy_bind has no port)"),
    )
}

@dataclass(frozen=True)
class Bind:
    """A local address to bind() before connect() (nginx: proxy_bind)."""

    family: int
    address: object
    text: str


def parse_bind(value: object, family: int | None) -> Bind:
    """``"127.0.0.2"``, ``"127.0.0.2:0"``, ``"[::1]:0"``, ``"[::1]"`` or ``(host, port)`` -> Bind for ``family``
    (``None``: the address's own family; :func:`check_bind_family` then checks it against a target's)."""
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
    elif isinstance(value, str):
        if value.startswith("["):
            host, bracket, rest = value[1:].partition("]")
            if not bracket:
                raise ValueError(f"option bind={shown(value)}: no closing ']' after the IPv6 address")
            if rest and not rest.startswith(":"):
                raise ValueError(f"option bind={shown(value)}: expected '[V6ADDR]' or '[V6ADDR]:PORT', "
                                 f"not {shown(rest)} after ']'")
            port = rest[1:] if rest else "0"
        elif value.count(":") == 1:
            host, port = value.split(":")
        else:
            host, port = value, "0"
    else:
        raise TypeError(f"option bind must be 'HOST', 'HOST:PORT' or (host, port), got {shown(value)}")
    try:
        ip = ipaddress.ip_address(host)
    except (ValueError, TypeError):
        raise ValueError(f"option bind={shown(value)}: {shown(host)} is not an IP address") from None
    if isinstance(port, str):
        if not (port.isascii() and port.isdigit()):
            raise ValueError(f"option bind={shown(value)}: port {shown(port)} is not a number")
        if len(port) > 5:
            raise ValueError(f"option bind={shown(value)}: port {shown(port)} is outside 0..65535")
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"option bind={shown(value)}: port must be a whole number, got {shown(port)}")
    if not 0 <= port <= 65535:
        raise ValueError(f"option bind={shown(value)}: port {shown(port)} is outside 0..65535")
    want = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    if family is not None and family != want:
        raise ValueError(f"option bind={shown(value)} is {want.name} but the target is "
                         f"{socket.AddressFamily(family).name}")
    # text: the address as nginx names it in "bind(...) failed" -- proxy_bind's value as written
    # (ngx_http_upstream_bind_set_slot: local->addr->name = value[1]), so "127.0.0.2", not "127.0.0.2:0"
    if ip.version == 4:
        text = value if isinstance(value, str) else f"{ip}:{port}"
        return Bind(want, (str(ip), port), text)
    text = value if isinstance(value, str) else f"[{ip}]:{port}"
    return Bind(want, (str(ip), port, 0, 0), text)


def check_options(options: dict) -> list[tuple[OptionSpec, object]]:
    """Each socket option given, validated by its spec, as (spec, value) pairs in :data:`OPTIONS` order.

    The names must be OPTIONS' (:class:`nbconn.settings.Settings` refuses any other first).  ``None`` means
    "leave the kernel's default": nothing is set, just as nginx skips an option it was not configured with.
    ``False`` sets 0.  What needs the target's family is :func:`fit_family`'s.
    """
    return [(spec, spec.validate(options[name])) for name, spec in OPTIONS.items() if options.get(name) is not None]


def fit_family(planned: list, bind: Bind | None, family: int) -> tuple[list[tuple[OptionSpec, object]], Bind | None]:
    """The checks that need the target's family, on options already validated: ValueError naming the option."""
    for spec, _ in planned:
        if family not in spec.families:
            raise ValueError(f"option {spec.name} does not apply to a {socket.AddressFamily(family).name} target")
    if bind is not None:
        if family == socket.AF_UNIX:
            raise ValueError(f"option bind={shown(bind.text)} does not apply to an AF_UNIX target")
        if bind.family != family:
            raise ValueError(f"option bind={shown(bind.text)} is {socket.AddressFamily(bind.family).name} but the "
                             f"target is {socket.AddressFamily(family).name}")
    return planned, bind
