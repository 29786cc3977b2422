"""Seed step 2: each option is applied with setsockopt and read back with getsockopt."""

import errno
import socket

import pytest

import nbconn
from nbconn.flow import make_plan
from nbconn.lab import listening
from nbconn.options import OPTIONS
from nbconn.settings import Settings


def _rmem_max() -> int:
    with open("/proc/sys/net/core/rmem_max") as f:
        return int(f.read())


def test_every_option_applied_and_read_back(no_fd_leak):
    with listening() as target:
        res = nbconn.connect(target, rcvbuf=65536, sndbuf=32768, keepalive=True, nodelay=True, reuseaddr=True,
                             linger=0, syncnt=3, user_timeout=2500, bind_address_no_port=True, bind="127.0.0.2",
                             timeout=2, keep=True)
        with res:
            assert res.outcome == "connected", res.trace()
            eff = res.effective
            # socket(7): the kernel doubles SO_RCVBUF/SO_SNDBUF (capped by rmem_max/wmem_max)
            assert eff["rcvbuf"] == min(2 * 65536, 2 * _rmem_max())
            assert eff["sndbuf"] >= 32768
            assert eff["keepalive"] is True and eff["nodelay"] is True and eff["reuseaddr"] is True
            assert eff["linger"] == 0 and eff["syncnt"] == 3 and eff["user_timeout"] == 2500
            assert eff["bind_address_no_port"] is True
            assert res.sock.getsockname()[0] == "127.0.0.2"
    names = [s.name for s in res.steps]
    assert names.count("setsockopt") == 9 and names.count("getsockopt") == 9
    assert names.index("bind") > names.index("nonblocking")  # nginx: ngx_nonblocking, then bind()


def test_rcvbuf_above_rmem_max_is_capped():
    with listening() as target:
        res = nbconn.connect(target, rcvbuf=2**30, keep=False)
    assert res.effective["rcvbuf"] == 2 * _rmem_max()


def test_false_sets_zero_and_none_leaves_default():
    with listening() as target:
        res = nbconn.connect(target, keepalive=False, nodelay=None, keep=False)
    assert res.effective == {"keepalive": False}
    assert res.requested == {"keepalive": False}


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"rcvbuf": 0}, "rcvbuf=0"),
        ({"rcvbuf": "big"}, "rcvbuf must be a whole number"),
        ({"rcvbuf": 10**400}, "rcvbuf=<an integer of about 401 digits> is outside"),
        ({"keepalive": 1}, "keepalive must be True or False"),
        ({"bind": "[::1"}, "bind='[::1': no closing ']'"),
        ({"bind": "[::1]junk"}, "bind='[::1]junk': expected '[V6ADDR]'"),
        ({"bind": "127.0.0.1:" + "5" * 5000}, "is outside 0..65535"),
        ({"syncnt": 128}, "syncnt=128"),
        ({"keepalive": "yes"}, "keepalive must be True or False"),
        ({"linger": -1}, "linger=-1"),
        ({"nosuch": 1}, "unknown setting 'nosuch'"),
        ({"bind": "::1"}, "AF_INET6 but the target is AF_INET"),
        ({"bind": "127.0.0.1:99999"}, "99999"),
        ({"bind": "nope"}, "'nope' is not an IP address"),
    ],
)
def test_bad_options_are_named(opts, words, no_fd_leak):
    with pytest.raises((ValueError, TypeError)) as info:
        nbconn.connect("127.0.0.1:9", **opts)
    assert words in str(info.value) and len(str(info.value)) < 300


def test_bind_rule_types():
    for bad in ("[::1", "[::1]junk"):
        with pytest.raises(ValueError, match="bind"):
            nbconn.connect("[::1]:9", bind=bad)
    with pytest.raises(ValueError, match=r"timeout=<an integer of about 401 digits>"):
        nbconn.connect("127.0.0.1:9", timeout=10**400)


def test_tcp_options_rejected_for_unix():
    with pytest.raises(ValueError, match="nodelay does not apply to a AF_UNIX"):
        nbconn.connect("unix:/nonexistent", nodelay=True)


def test_plan_order_is_table_order():
    settings = Settings(syncnt=2, rcvbuf=1024)
    assert list(settings.options) == ["rcvbuf", "syncnt"]
    assert [s.name for s, *_ in make_plan(socket.AF_INET, settings).setsockopt_args] == ["rcvbuf", "syncnt"]
    assert list(OPTIONS)[:3] == ["rcvbuf", "sndbuf", "keepalive"]  # nginx's order in ngx_event_connect_peer


def test_bind_failure_is_ngx_error_and_closes(no_fd_leak):
    with listening() as target, socket.socket() as holder:
        holder.bind(("127.0.0.3", 0))
        port = holder.getsockname()[1]
        res = nbconn.connect(target, bind=f"127.0.0.3:{port}")
    assert (res.outcome, res.errno, res.ngx_connect) == ("error", "EADDRINUSE", "NGX_ERROR")
    assert errno.errorcode[res.errno_number] == "EADDRINUSE"
    assert res.steps[-1].name == "close"


def _local_steps(res):
    """The calls from ioctl(FIONBIO) to bind(), as "name" or "setsockopt(OPT)"."""
    names = [s.name + (f"({s.call.split(', ')[2]})" if s.name in ("setsockopt", "getsockopt") else "")
             for s in res.steps]
    return names[names.index("nonblocking"):names.index("bind") + 1]


@pytest.mark.parametrize("exact", [False, True])
def test_portless_bind_sets_ip_bind_address_no_port_after_ioctl_as_nginx(exact, no_fd_leak):
    """nginx 1.22.1 sets IP_BIND_ADDRESS_NO_PORT by itself for a proxy_bind without a port, after
    ngx_nonblocking and right before bind() (ngx_event_connect_peer, lines 88-157)."""
    with listening() as target:
        with nbconn.connect(target, bind="127.0.0.2", keepalive=True, nginx_exact=exact, keep=True) as res:
            assert res.connected and res.sock.getsockname()[0] == "127.0.0.2"
    names = [s.name for s in res.steps]
    assert names.index("setsockopt") < names.index("nonblocking")  # SO_KEEPALIVE comes before ioctl
    if exact:
        assert _local_steps(res) == ["nonblocking", "setsockopt(IP_BIND_ADDRESS_NO_PORT)", "bind"]
    else:  # nbconn reads the value back, the one extra call
        assert _local_steps(res) == ["nonblocking", "setsockopt(IP_BIND_ADDRESS_NO_PORT)",
                                     "getsockopt(IP_BIND_ADDRESS_NO_PORT)", "bind"]
        assert res.effective["bind_address_no_port"] is True and "bind_address_no_port" not in res.requested


def test_bind_with_a_port_or_a_given_value_follows_nginx(no_fd_leak):
    with listening() as target:
        with socket.socket() as probe:  # a free port on 127.0.0.2
            probe.bind(("127.0.0.2", 0))
            port = probe.getsockname()[1]
        res = nbconn.connect(target, bind=f"127.0.0.2:{port}", nginx_exact=True)  # a port: nginx sets nothing
        assert res.connected and _local_steps(res) == ["nonblocking", "bind"]
        res = nbconn.connect(target, bind="127.0.0.2", bind_address_no_port=False, nginx_exact=True)
    assert res.connected and _local_steps(res) == ["nonblocking", "setsockopt(IP_BIND_ADDRESS_NO_PORT)", "bind"]
    assert next(s for s in res.steps if s.name == "setsockopt").call.endswith("IP_BIND_ADDRESS_NO_PORT, [0], 4) = 0")


def test_bind_failure_names_the_address_as_proxy_bind_wrote_it(no_fd_leak):
    """nginx logs bind(%V) with proxy_bind's value as written (ngx_http_upstream_bind_set_slot): an address
    this host lacks gives EADDRNOTAVAIL, and the line says bind(198.18.0.5), not bind(198.18.0.5:0)."""
    res = nbconn.connect("127.0.0.1:9", bind="198.18.0.5")
    assert (res.outcome, res.errno, res.ngx_connect, res.ngx_level) == ("error", "EADDRNOTAVAIL", "NGX_ERROR", "crit")
    assert res.ngx_log == "bind(198.18.0.5) failed (99: Cannot assign requested address) while connecting to upstream"


def test_transparent_comes_first_in_the_local_address_block_and_its_failure_is_ngx_error(no_fd_leak):
    """ngx_event_connect_set_transparent runs before IP_BIND_ADDRESS_NO_PORT, and a failing IP_TRANSPARENT is
    NGX_ERROR (500, no other peer).  The failure is a real kernel refusal: an empty optval (EINVAL: the IP
    level takes a 1-byte value, not a 0-byte one)."""
    import dataclasses

    from nbconn.flow import DONE, Attempt
    from nbconn.loop import Loop
    from nbconn.targets import parse_target

    plan = make_plan(socket.AF_INET, Settings(bind="127.0.0.2", transparent=True, nginx_exact=True))
    assert [spec.name for spec, *_ in plan.local_args] == ["transparent", "bind_address_no_port"]
    spec = OPTIONS["transparent"]
    bad = dataclasses.replace(plan, local_args=((spec, b"", "[]", 0), *plan.local_args[1:]))
    with listening() as target, Loop() as loop:
        attempt = Attempt(parse_target(target), bad, loop)
        attempt.start()
        for _ in range(100):  # bounded; were the call accepted, the connect would go on and end here
            if attempt.state is DONE:
                break
            loop.run_once()
    res = attempt.result
    assert (res.outcome, res.errno, res.ngx_connect, res.ngx_next, res.ngx_level) == (
        "error", "EINVAL", "NGX_ERROR", None, "alert")
    assert res.ngx_log.startswith("setsockopt(IP_TRANSPARENT) failed (22: ")
    assert [s.name for s in res.steps] == ["socket", "nonblocking", "setsockopt", "close"]
    with pytest.raises(ValueError, match="transparent does not apply to a AF_INET6"):
        nbconn.connect("[::1]:9", transparent=True)
