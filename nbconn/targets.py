"""Where to connect: parse and resolve a target before any socket exists.

nginx resolves upstream addresses when it reads its configuration
(``ngx_parse_url`` in ``src/core/ngx_inet.c``), so ``ngx_event_connect_peer``
only ever sees a ready ``sockaddr``.  nbconn does the same: :func:`parse_target`
turns what a user typed into a :class:`Target` holding the address family and
the exact address tuple Python's ``socket.connect`` wants.  Every mistake is
reported here as a ``ValueError``/``TypeError`` naming the bad value, so the flow
itself never has to clean up after bad input.

Accepted forms::

    "127.0.0.1:8080"        IPv4 literal and port
    "[::1]:8080"            IPv6 literal in brackets and port
    "localhost:8080"        a name, resolved with getaddrinfo (first answer)
    "unix:/run/app.sock"    an AF_UNIX path ("unix:@name" = Linux abstract socket)
    ("127.0.0.1", 8080)     a (host, port) tuple
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

from .strace import sockaddr_len, sockaddr_text
from .validate import shown

_UNIX_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux

# A host name as RFC 1123 allows it (labels of letters, digits and hyphens; "_" is
# tolerated as resolvers do).  Checked before getaddrinfo so that garbage never
# becomes a DNS query.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


#: the port a URL's scheme implies, for the hint when a URL is given as a target
_URL_PORTS = {"http": 80, "https": 443}


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def is_hostname(text: str) -> bool:
    """True when ``text`` is spelled like a DNS name (it may still not resolve)."""
    return _HOSTNAME.fullmatch(text) is not None and not text.replace(".", "").isdigit()


@dataclass(frozen=True)
class Target:
    """A resolved connect target: family, the sockaddr for connect(), and how to show it."""

    family: int
    address: object  # (host, port) for IPv4, (host, port, 0, 0) for IPv6, str/bytes for AF_UNIX
    text: str  # as nginx would name the peer: 127.0.0.1:80, [::1]:80, unix:/path

    @property
    def family_name(self) -> str:
        return socket.AddressFamily(self.family).name

    @functools.cached_property
    def c_sockaddr(self) -> bytes:
        """The struct sockaddr connect() is given, as bytes (nginx-exact mode calls the C library's connect())."""
        return sockaddr_bytes(self.family, self.address)

    @functools.cached_property
    def sockaddr(self) -> tuple[str, int]:
        """The sockaddr as strace prints it and its length: computed once per Target, shown by every connect."""
        return sockaddr_text(self.family, self.address), sockaddr_len(self.family, self.address)

    def __str__(self) -> str:
        return self.text


def sockaddr_bytes(family: int, address: object) -> bytes:
    """struct sockaddr_in / sockaddr_in6 / sockaddr_un for ``address`` as Python's socket module takes it.

    sa_family is in host byte order, the port (and IPv6 flow info) in network byte order (ip(7), ipv6(7));
    an AF_UNIX path ends with a NUL, an abstract name (leading NUL) does not (unix(7)).
    """
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H", address[1]) + socket.inet_pton(family, address[0]) \
            + bytes(8)
    if family == socket.AF_INET6:
        return (struct.pack("=H", family) + struct.pack("!HI", address[1], address[2] if len(address) > 2 else 0)
                + socket.inet_pton(family, address[0]) + struct.pack("=I", address[3] if len(address) > 3 else 0))
    raw = address if isinstance(address, bytes) else address.encode()
    return struct.pack("=H", family) + raw + (b"" if raw.startswith(b"\x00") else b"\x00")


def _check_port(port: object, original: object) -> int:
    """A port 1..65535 as an int or ASCII digits; never converts a huge value first (a 5000-digit port is named)."""
    if isinstance(port, bool) or not isinstance(port, (int, str)):
        raise TypeError(f"port must be a whole number, got {shown(port)} in target {shown(original)}")
    if isinstance(port, str):
        if not (port.isascii() and port.isdigit()):
            raise ValueError(f"port {shown(port)} is not a number in target {shown(original)}")
        if len(port) > 5:
            raise ValueError(f"port {shown(port)} is outside 1..65535 in target {shown(original)}")
        port = int(port)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {shown(port)} is outside 1..65535 in target {shown(original)}")
    return port


def _resolve(host: str, port: int, original: object) -> Target:
    if not host:
        raise ValueError(f"empty host in target {shown(original)}")
    if "\x00" in host:
        raise ValueError(f"host contains a NUL byte in target {shown(original)}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 4:
            return Target(socket.AF_INET, (str(ip), port), f"{ip}:{port}")
        if ip.scope_id:
            raise ValueError(f"scoped IPv6 address {shown(host)} is not supported in target {shown(original)}")
        return Target(socket.AF_INET6, (str(ip), port, 0, 0), f"[{ip}]:{port}")
    if not is_hostname(host):
        raise ValueError(f"{shown(host)} is neither an IP address nor a host name in target {shown(original)}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host {shown(host)} in target {shown(original)}: {exc}") from None
    if not infos:
        raise ValueError(f"host {shown(host)} has no address in target {shown(original)}")
    return _resolve(infos[0][4][0], port, original)  # getaddrinfo's first answer, an IP literal


def _unix(path: str, original: object) -> Target:
    if not path:
        raise ValueError(f"empty AF_UNIX path in target {shown(original)}")
    if path == "@":
        raise ValueError(f"empty abstract AF_UNIX name in target {shown(original)} (write unix:@NAME)")
    if "\x00" in path:
        raise ValueError(f"AF_UNIX path contains a NUL byte in target {shown(original)}")
    try:
        raw = path.encode()
    except UnicodeEncodeError:  # a str holding surrogates: bytes that were not UTF-8
        raise ValueError(f"AF_UNIX path {shown(path)} is not valid UTF-8 in target {shown(original)}") from None
    if len(raw) > _UNIX_PATH_MAX:
        raise ValueError(f"AF_UNIX path is longer than {_UNIX_PATH_MAX} bytes in target {shown(original)}")
    # "@name": the Linux abstract namespace, as `ss` prints it
    address: object = b"\x00" + raw[1:] if path.startswith("@") else path
    return Target(socket.AF_UNIX, address, f"unix:{path}")


def parse_target(target: object) -> Target:
    """Parse and resolve ``target``; raise ValueError/TypeError naming what is wrong."""
    if isinstance(target, Target):
        return target
    if isinstance(target, bytes) and target.startswith(b"unix:"):  # a path as the file system gives it
        try:
            path = target[5:].decode()
        except UnicodeDecodeError:
            raise ValueError(f"AF_UNIX path in target {shown(target)} is not valid UTF-8") from None
        return _unix(path, target)  # errors show the bytes the caller passed, b'unix:', not a decoded copy
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError(f"target tuple must be (host, port), got {shown(target)}")
        host, port = target
        if not isinstance(host, str):
            raise TypeError(f"host must be a str, got {shown(host)} in target {shown(target)}")
        return _resolve(host.strip("[]"), _check_port(port, target), target)
    if not isinstance(target, str):
        raise TypeError(f"target must be 'HOST:PORT', '[V6]:PORT', 'unix:/path' or (host, port), got {shown(target)}")
    if target.startswith("unix:"):
        return _unix(target[5:], target)
    scheme, sep, rest = target.partition("://")
    if sep and scheme.isalpha():  # a URL pasted from a browser: say what to type, not a bracket hint
        authority = rest.split("/", 1)[0].rpartition("@")[2]
        port = authority.rpartition(":")[2] if authority.rpartition(":")[2].isdigit() else None
        example = authority if port else f"{authority}:{_URL_PORTS.get(scheme.lower(), 'PORT')}"
        raise ValueError(f"target {shown(target)} is a URL; nbconn connects to HOST:PORT, e.g. {shown(example)}")
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"malformed target {shown(target)}: expected '[V6ADDR]:PORT'")
        port = _check_port(rest[1:], target)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{shown(host)} is not an IPv6 address in target {shown(target)}") from None
        return _resolve(host, port, target)
    host, sep, port_text = target.rpartition(":")
    if not sep:
        raise ValueError(f"malformed target {shown(target)}: expected 'HOST:PORT', '[V6ADDR]:PORT' or 'unix:/path'")
    if ":" in host:
        if _is_ipv6(host):
            raise ValueError(f"malformed target {shown(target)}: put an IPv6 address in brackets, "
                             f"'[{host[:40]}]:{port_text[:8]}'")
        raise ValueError(f"malformed target {shown(target)}: expected 'HOST:PORT', '[V6ADDR]:PORT' or 'unix:/path'")
    return _resolve(host, _check_port(port_text, target), target)
