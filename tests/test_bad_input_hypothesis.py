"""Property tests: whatever a user passes, nbconn answers with a Result or a ValueError/TypeError
naming the bad value -- never another exception, never a leaked descriptor.

Targets that are spelled like host names would become DNS queries (this machine's
resolver is not on loopback), so generated names are filtered out; the one
name-resolution failure case runs in an empty network namespace (test_cli.py).
"""

import socket

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nbconn

from .conftest import open_fds, would_query_dns

_LISTENER = socket.socket()
_LISTENER.bind(("127.0.0.1", 0))
_LISTENER.listen(4096)
OPEN_PORT = _LISTENER.getsockname()[1]




targets = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"127\.0\.0\.1:-?[0-9]{0,6}", fullmatch=True),
    st.from_regex(r"\[[0-9a-f:]{0,12}\]:[0-9]{0,6}", fullmatch=True),
    st.builds(lambda s: "unix:" + s, st.text(max_size=30)),
    st.tuples(st.sampled_from(["127.0.0.1", "::1", "", "x y", "300.1.1.1"]),
              st.one_of(st.integers(-5, 70000), st.text(max_size=5), st.none(), st.booleans())),
    st.just(f"127.0.0.1:{OPEN_PORT}"),
    st.none(), st.integers(), st.floats(),
)
timeouts = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3),
                     st.none(), st.just(0.05))
option_values = st.one_of(st.integers(-2, 2**32), st.booleans(), st.none(), st.text(max_size=4), st.floats())
options = st.dictionaries(
    st.sampled_from(["rcvbuf", "sndbuf", "keepalive", "nodelay", "reuseaddr", "linger", "syncnt", "user_timeout",
                     "bind_address_no_port", "bind", "bogus"]),
    option_values, max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=targets, timeout=timeouts, opts=options)
def test_any_input_gives_result_or_named_error(target, timeout, opts):
    assume(not would_query_dns(target))
    before = open_fds()
    try:
        res = nbconn.connect(target, timeout=timeout, keep=False, **opts)
    except (ValueError, TypeError) as exc:
        assert str(exc), "error without a message"
    else:
        assert res.outcome in ("connected", "refused", "timed_out", "reset", "unreachable", "error")
        assert res.sock is None
    assert open_fds() == before


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(st.sampled_from(["connect", "--timeout", "--rcvbuf", "--syncnt", "--nodelay",
                                                  "--json", "--bind", "--trigger", "level", "--nonblocking",
                                                  f"127.0.0.1:{OPEN_PORT}", "-1", "0.05", "x"]),
                               st.text(max_size=8)), max_size=6))
def test_cli_never_tracebacks(argv, capsys):
    from nbconn.cli import main

    assume(not any(would_query_dns(a) for a in argv if ":" in a))
    assume(not any(a.startswith("-") and a.lstrip("-") in ("h", "help") for a in argv))
    before = open_fds()
    code = main(argv)
    out = capsys.readouterr()
    assert code in (0, 1, 2)
    if code == 2:
        assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err
    assert open_fds() == before
