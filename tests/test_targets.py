"""Target parsing: every accepted form, and every bad one named in the error."""

import socket

import pytest

from nbconn.targets import is_hostname, parse_target


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
