"""Target parsing: every accepted form, and every bad one named in the error."""

import re
import socket
import subprocess
import sys

import pytest

from nbconn.strace import c_escape, sockaddr_text
from nbconn.targets import is_hostname, parse_target
from nbconn.validate import shown

from .conftest import require_tool


@pytest.mark.parametrize(
    "text, family, address, shown",
    [
        ("127.0.0.1:80", socket.AF_INET, ("127.0.0.1", 80), "127.0.0.1:80"),
        ("[::1]:8080", socket.AF_INET6, ("::1", 8080, 0, 0), "[::1]:8080"),
        (("127.0.0.2", 443), socket.AF_INET, ("127.0.0.2", 443), "127.0.0.2:443"),
        (("::1", "22"), socket.AF_INET6, ("::1", 22, 0, 0), "[::1]:22"),
        ("unix:/run/x.sock", socket.AF_UNIX, "/run/x.sock", "unix:/run/x.sock"),
        ("unix:@abstract", socket.AF_UNIX, b"\x00abstract", "unix:@abstract"),
        ("localhost:1", socket.AF_INET, ("127.0.0.1", 1), "127.0.0.1:1"),  # /etc/hosts, no DNS query
    ],
)
def test_accepted_forms(text, family, address, shown):
    tgt = parse_target(text)
    assert (tgt.family, tgt.address, tgt.text) == (family, address, shown)


@pytest.mark.parametrize(
    "bad, words",
    [
        ("127.0.0.1:0", "port 0"),
        ("127.0.0.1:65536", "port 65536"),
        ("127.0.0.1:http", "'http'"),
        ("127.0.0.1", "malformed target '127.0.0.1'"),
        ("::1:80", "brackets"),
        ("[::1]80", "malformed"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        (":80", "empty host"),
        ("unix:", "empty AF_UNIX path"),
        ("unix:/" + "x" * 200, "longer than 107"),
        ("bad host!:80", "neither an IP address nor a host name"),
        (("127.0.0.1",), "(host, port)"),
        (("127.0.0.1", 70000), "port 70000"),
        (("127.0.0.1", True), "port must be a whole number"),
        ("127.0.0.1:" + "9" * 5000, "(5002 characters) is outside 1..65535"),  # named, capped, not int()'d
        (("127.0.0.1", 10**5000), "an integer of about 5001 digits"),
        ("127.0.0.1:٣", "port '٣' is not a number"),  # int("٣") is 3; nginx would refuse it
        ("unix:@", "empty abstract AF_UNIX name"),
        (b"unix:", "empty AF_UNIX path in target b'unix:'"),  # the bytes given, not the str they decode to
        ("http://127.0.0.1:80", "is a URL; nbconn connects to HOST:PORT, e.g. '127.0.0.1:80'"),  # not '[http://...'
        ("https://localhost/x", "e.g. 'localhost:443'"),
        ("a:b:80", "expected 'HOST:PORT'"),  # not an IPv6 address: no bracket hint
        (b"unix:/tmp/\xff", "is not valid UTF-8"),
        ("unix:/tmp/\udcff", "'/tmp/\\udcff' is not valid UTF-8"),
        (42, "target must be"),
        (None, "target must be"),
    ],
)
def test_bad_targets_are_named(bad, words):
    with pytest.raises((ValueError, TypeError)) as info:
        parse_target(bad)
    assert words in str(info.value)
    assert len(str(info.value)) < 300  # a huge value is never echoed whole
    # the rule: a wrong type is a TypeError, a bad value of the right type a ValueError
    if isinstance(bad, (str, bytes)) or (isinstance(bad, tuple) and len(bad) == 2 and not isinstance(bad[1], bool)):
        assert type(info.value) is ValueError, info.value


def test_utf8_unix_path_as_bytes_is_accepted():
    assert parse_target(b"unix:/run/x.sock").address == "/run/x.sock"


def test_sockaddr_is_computed_once_per_target():
    tgt = parse_target("127.0.0.1:80")
    assert tgt.sockaddr is tgt.sockaddr
    assert tgt.sockaddr == ('{sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("127.0.0.1")}', 16)
    assert len(tgt.c_sockaddr) == 16 and len(parse_target("[::1]:80").c_sockaddr) == 28
    assert parse_target("unix:@x").c_sockaddr[2:] == b"\x00x"  # abstract: no trailing NUL


def test_hostname_syntax():
    assert is_hostname("localhost") and is_hostname("a-b.example.") and not is_hostname("a b")
    assert not is_hostname("-bad") and not is_hostname("1.2.3") and not is_hostname("x" * 64)


def test_a_value_whose_repr_raises_is_still_named():
    class Hostile:
        def __repr__(self):
            raise RuntimeError("no repr for you")

    with pytest.raises(TypeError, match="target must be .* got <a Hostile whose repr\\(\\) raised RuntimeError>"):
        parse_target(Hostile())
    assert shown(Hostile()) == "<a Hostile whose repr() raised RuntimeError>"


# -- AF_UNIX paths are printed as strace prints them (issue 24, item 12) ---------------------------------

PATHS = ["/tmp/a\nb", "/tmp/\x1b[31mred", '/tmp/q"b\\s\t', "/tmp/\u00e9\x017\x01x", "/tmp/plain.sock",
         "@nbconn-abstract\n"]  # "@": an abstract name (a leading NUL in the sockaddr)


@pytest.mark.parametrize("path, expected", [
    ("/tmp/a\nb", "/tmp/a\\nb"),
    ("/tmp/\x1b[31mred", "/tmp/\\33[31mred"),  # ESC never reaches the terminal
    ('/tmp/q"b\\s\t', '/tmp/q\\"b\\\\s\\t'),
    ("/tmp/\u00e9\x017\x01x", "/tmp/\\303\\251\\0017\\1x"),  # 3 octal digits only before an octal digit
    ("/tmp/plain.sock", "/tmp/plain.sock"),
])
def test_unix_paths_are_escaped_in_the_trace_and_the_nginx_line(path, expected):
    from nbconn import connect

    assert c_escape(path) == expected
    tgt = parse_target("unix:" + path)
    assert tgt.sockaddr[0] == f'{{sa_family=AF_UNIX, sun_path="{expected}"}}'
    result = connect(tgt, timeout=1)  # no such path: ENOENT, and nginx's [crit] line names the peer
    assert result.errno == "ENOENT"
    assert result.ngx_log == (f"connect() to unix:{expected} failed (2: No such file or directory) "
                              "while connecting to upstream")
    for text in (result.trace(), result.ngx_log):
        assert "\x1b" not in text and all(line.isprintable() for line in text.splitlines())
    assert len(result.ngx_log.splitlines()) == 1


def test_unix_path_escaping_matches_real_strace(tmp_path):
    """The same connect() under strace: nbconn's sockaddr text is strace's, byte for byte."""
    strace = require_tool("strace")
    code = ("import socket, sys\n"
            "for p in sys.argv[1:]:\n"
            "    p = '\\0' + p[1:] if p.startswith('@') else p\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try: s.connect(p)\n"
            "    except OSError: pass\n"
            "    s.close()\n")
    proc = subprocess.run([strace, "-qq", "-e", "trace=connect", "-o", str(tmp_path / "trace"), sys.executable, "-c",
                           code, *PATHS], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-500:]
    seen = re.findall(r"connect\(\d+, (\{sa_family=AF_UNIX, .*\}), \d+\) = ", (tmp_path / "trace").read_text())
    assert seen == [sockaddr_text(socket.AF_UNIX, parse_target("unix:" + p).address) for p in PATHS]
    assert seen[-1] == '{sa_family=AF_UNIX, sun_path=@"nbconn-abstract\\n"}'
