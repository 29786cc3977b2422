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
        (("127.0.0.1", True), "port must be an int"),
        (42, "target must be"),
        (None, "target must be"),
    ],
)
def test_bad_targets_are_named(bad, words):
    with pytest.raises((ValueError, TypeError)) as info:
        parse_target(bad)
    assert words in str(info.value)


def test_hostname_syntax():
    assert is_hostname("localhost") and is_hostname("a-b.example.") and not is_hostname("a b")
    assert not is_hostname("-bad") and not is_hostname("1.2.3") and not is_hostname("x" * 64)
