"""nbconn.Settings (issue 20, "Settings validated once, passed down"): one frozen, validated value that every
entry point takes, or builds once from its keywords; nginx_exact works through each of them.

Real sockets on loopback only.  An nginx-exact attempt is recognised by what it leaves out: its socket() has no
SOCK_CLOEXEC (nginx's ngx_socket() is plain socket(2)) and it reads no TCP_INFO.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import pytest

import nbconn
from nbconn.experiments import eyeballs, measure
from nbconn.nginx import tls
from nbconn import validate
from nbconn.flow import make_plan
from nbconn.lab import blackhole, listening, refused
from nbconn.settings import Settings

from .conftest import open_fds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exact(result) -> bool:
    """Whether a Result's socket() was nginx's (no SOCK_CLOEXEC); its trace must show a socket() at all."""
    text = result.trace()
    assert "socket(AF_INET, SOCK_STREAM" in text, text
    return "SOCK_CLOEXEC" not in text


# -- the value -----------------------------------------------------------------------------------------

def test_defaults_and_a_readable_repr_that_builds_it_again():
    assert repr(Settings()) == "Settings()"
    s = Settings(timeout=1, rcvbuf=4096, keepalive=True, bind="127.0.0.2", nginx_exact=True)
    assert repr(s) == "Settings(timeout=1.0, nginx_exact=True, rcvbuf=4096, keepalive=True, bind='127.0.0.2')"
    assert eval(repr(s), {"Settings": Settings}) == s
    assert (s.timeout, s.nonblocking, s.trigger, s.keep, s.trace, s.tcp_info) == (1.0, "ioctl", "edge", False,
                                                                                   True, True)
    assert dict(s.options) == {"rcvbuf": 4096, "keepalive": True}  # in the order the flow sets them
    assert s.local.address == ("127.0.0.2", 0)


def test_immutable_and_replace_makes_a_checked_copy():
    s = Settings(timeout=1.0, rcvbuf=4096)
    with pytest.raises(AttributeError, match=r"immutable: use settings.replace\(timeout=...\)"):
        s.timeout = 2.0
    with pytest.raises(AttributeError):
        del s.trigger
    with pytest.raises(TypeError):
        s.options["rcvbuf"] = 1  # a read-only view
    t = s.replace(timeout=2.0, rcvbuf=None)
    assert (t.timeout, dict(t.options), s.timeout, dict(s.options)) == (2.0, {}, 1.0, {"rcvbuf": 4096})
    with pytest.raises(ValueError, match="timeout=0 must be > 0"):
        s.replace(timeout=0)


def test_equal_hashable_copyable_picklable():
    s = Settings(timeout=0.5, syncnt=2, bind=("127.0.0.2", 0))
    assert s == Settings(timeout=0.5, syncnt=2, bind=("127.0.0.2", 0)) and hash(s) == hash(s.replace())
    assert s != s.replace(syncnt=3) and s != "Settings(timeout=0.5)"
    assert copy.copy(s) == s and copy.deepcopy(s) == s and pickle.loads(pickle.dumps(s)) == s
    assert len({s, s.replace(), Settings()}) == 2


@pytest.mark.parametrize(
    "keywords, error, words",
    [
        ({"timeout": 0}, ValueError, "timeout=0"),
        ({"timeout": 10**400}, ValueError, "timeout=<an integer of about 401 digits>"),
        ({"timeout": "1"}, TypeError, "timeout must be a number, got '1'"),
        ({"nonblocking": "O_NONBLOCK"}, ValueError, "nonblocking='O_NONBLOCK' must be one of"),
        ({"trigger": "EPOLLET"}, ValueError, "trigger='EPOLLET'"),
        ({"keep": 1}, TypeError, "keep must be True or False, got 1"),
        ({"trace": None}, TypeError, "trace must be True or False"),
        ({"tcp_info": "no"}, TypeError, "tcp_info must be True or False"),
        ({"nginx_exact": "yes"}, TypeError, "nginx_exact must be True or False"),
        ({"nginx_exact": True, "nonblocking": "fcntl"}, ValueError, "nginx_exact=True makes nginx's calls"),
        ({"nginx_exact": True, "trigger": "level"}, ValueError, "trigger='level'"),
        ({"rcvbuf": 0}, ValueError, "rcvbuf=0 is outside 1.."),
        ({"bind": "nope"}, ValueError, "bind='nope': 'nope' is not an IP address"),
        ({"bind": "127.0.0.1:99999"}, ValueError, "99999"),
        ({"nginxexact": True}, TypeError, "unknown setting 'nginxexact' (settings: timeout, nonblocking"),
    ],
)
def test_every_bad_value_is_named_in_the_constructor(keywords, error, words):
    before = open_fds()
    with pytest.raises(error) as info:
        Settings(**keywords)
    assert words in str(info.value)
    assert open_fds() <= before  # refused before any socket exists


# -- every entry point: a Settings, or its keywords, never both -------------------------------------------

def _entry_points(target):
    return {
        "connect": lambda *a, **k: nbconn.connect(target, *a, **k),
        "connect_many": lambda *a, **k: nbconn.connect_many([target], *a, **k),
        "measure.run": lambda *a, **k: measure.run(target, *a, count=1, **k),
        "sequential": lambda *a, **k: eyeballs.sequential([target], *a, **k),
        "happy_eyeballs": lambda *a, **k: eyeballs.happy_eyeballs([target], *a, **k),
        "connect_tls": lambda *a, **k: tls.connect_tls(target, None, *a, **k),
    }


@pytest.mark.parametrize("name", list(_entry_points("127.0.0.1:9")))
def test_a_settings_and_keywords_together_is_a_type_error(name, no_fd_leak):
    call = _entry_points("127.0.0.1:9")[name]
    with pytest.raises(TypeError, match=rf"{name}: pass a Settings or keywords \(timeout\), not both"):
        call(Settings(), timeout=1.0)
    with pytest.raises(TypeError, match="settings must be a nbconn.Settings, got {'timeout': 1.0}"):
        call({"timeout": 1.0})


def test_each_entry_point_checks_the_settings_once(monkeypatch, no_fd_leak):
    """measure.run -> connect_many -> make_plan checked timeout, trigger and options up to four times (issue 20);
    now only Settings' constructor checks them, once per call."""
    seen = []
    real = validate.choice
    monkeypatch.setattr(validate, "choice", lambda name, *a: (seen.append(name), real(name, *a))[1])
    with refused() as target:
        for call in _entry_points(target).values():
            seen.clear()
            call(timeout=2.0)
            assert seen.count("trigger") == 1, seen
        seen.clear()
        measure.run("refused", count=2, concurrency=2)
        assert seen.count("trigger") == 1, seen


def test_a_settings_object_is_used_as_given(no_fd_leak):
    s = Settings(timeout=0.05, rcvbuf=4096, trace=True)
    with blackhole() as hole:
        res = nbconn.connect(hole, s)
        assert res.timer_fired and res.requested == {"rcvbuf": 4096} and "SO_RCVBUF, [4096]" in res.trace()
        m = measure.run(hole, s, count=2)
    assert m.timeout_s == 0.05 and m.settings == {"timeout": 0.05, "nonblocking": "ioctl", "trigger": "edge",
                                                  "rcvbuf": 4096}
    assert m.outcome == ["timed_out", "timed_out"]


def test_family_checks_stay_in_make_plan_before_any_socket(no_fd_leak):
    s = Settings(bind="127.0.0.2", nodelay=True)  # fine on its own; the target decides the rest
    with pytest.raises(ValueError, match="bind='127.0.0.2' is AF_INET but the target is AF_INET6"):
        nbconn.connect("[::1]:9", s)
    with pytest.raises(ValueError, match="option nodelay does not apply to a AF_UNIX target"):
        make_plan(1, s.replace(bind=None))
    with pytest.raises(ValueError, match="bind='127.0.0.2' does not apply to an AF_UNIX target"):
        measure.run("unix-listening", s.replace(nodelay=None), count=1)


def test_what_an_entry_point_cannot_do_is_refused_by_name(no_fd_leak):
    with pytest.raises(ValueError, match="connect_tls runs on edge-triggered epoll only.*trigger='level'"):
        tls.connect_tls("127.0.0.1:9", trigger="level")
    with pytest.raises(TypeError, match=r"client must be a TLSClient, got Settings\(\) \(a Settings goes third"):
        tls.connect_tls("127.0.0.1:9", Settings())
    with pytest.raises(ValueError, match="measure.run keeps no socket"):
        measure.run("127.0.0.1:9", keep=True)


# -- nginx_exact through every entry point -------------------------------------------------------------

def test_nginx_exact_through_connect_and_connect_many(no_fd_leak):
    with listening() as target:
        assert _exact(nbconn.connect(target, Settings(nginx_exact=True)))
        assert not _exact(nbconn.connect(target))
        many = nbconn.connect_many([target] * 3, nginx_exact=True)
    assert all(r.connected and _exact(r) and r.tcp_info is None for r in many)


def test_nginx_exact_through_measure_run(no_fd_leak):
    """issue 20: measure.run("listening", nginx_exact=True) raised "unknown socket option" once; an
    nginx-exact run reads no TCP_INFO, so its tcpi_rtt column is empty where the default run's is full."""
    exact = measure.run("listening", count=5, nginx_exact=True)
    default = measure.run("listening", Settings(timeout=1.0), count=5)
    assert exact.outcome == default.outcome == ["connected"] * 5
    assert exact.tcpi_rtt_ms == [None] * 5 and None not in default.tcpi_rtt_ms
    assert exact.settings["nginx_exact"] is True and "nginx_exact" not in default.settings


def test_nginx_exact_through_the_races(no_fd_leak):
    with listening() as up, blackhole() as hole:
        walk = eyeballs.sequential([up, up], nginx_exact=True, timeout=5.0)
        with eyeballs.happy_eyeballs([hole, up], Settings(nginx_exact=True, keep=True), delay=0.01) as race:
            assert race.connected and race.sock is not None
    assert walk.connected and all(_exact(r) for r in walk.attempts)
    assert len(race.attempts) == 2 and all(_exact(r) for r in race.attempts)


def test_nginx_exact_through_connect_tls(no_fd_leak):
    from nbconn.lab import tlspeers

    with tlspeers.test_pki() as pki, tlspeers.tls_server(pki=pki) as peer:
        result = tls.connect_tls(peer, tls.TLSClient(), Settings(nginx_exact=True))
    assert result.outcome == tls.HANDSHAKED, result.trace()
    assert _exact(result.connect)


def test_nginx_exact_through_the_panel():  # (the timeline's figure opens matplotlib's fonts for good)
    from nbconn.view import widgets

    given = Settings(timeout=2.0, nginx_exact=True, rcvbuf=8192, nodelay=True)
    panel = widgets.LabPanel(settings=given)
    try:
        assert panel.settings() == given and panel.nginx_exact.value and panel.rcvbuf.value == "8192"
        panel.connect()
        assert panel.result is not None and panel.result.connected, panel.status_text
        assert _exact(panel.result) and "nginx-exact" in panel.result_header.value
        panel.count.value, panel.concurrency.value = "4", "2"
        panel.run()  # Run N: connect_many with the same Settings
        run = panel.runs[-1]
        assert run.outcome == ["connected"] * 4, panel.status_text
        assert run.settings["nginx_exact"] is True and run.tcpi_rtt_ms == [None] * 4  # nginx reads no TCP_INFO
    finally:
        panel.stop()
        assert panel.wait(15)
    with pytest.raises(ValueError, match="the panel has no control for linger"):
        widgets.LabPanel(settings=Settings(linger=0))
    with pytest.raises(ValueError, match="keepalive=False has no control"):
        widgets.LabPanel(settings=Settings(keepalive=False))
    with pytest.raises(TypeError, match="LabPanel: pass a Settings or timeout=, not both"):
        widgets.LabPanel(settings=Settings(), timeout=2.0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nbconn", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_nginx_exact_through_the_cli(no_fd_leak):
    """--nginx-exact was refused with several targets and --happy-eyeballs, and measure had no such flag."""
    with listening() as target:
        one = _cli("connect", target, "--nginx-exact", "--json")
        walk = _cli("connect", target, target, "--nginx-exact", "--json")
        race = _cli("connect", target, target, "--happy-eyeballs", "0.25", "--nginx-exact", "--json")
        many = _cli("measure", target, "--count", "3", "--nginx-exact", "--json")
    for proc in (one, walk, race, many):
        assert proc.returncode == 0, proc.stderr
    calls = [step["call"] for step in json.loads(one.stdout)["steps"]]
    assert calls[0].startswith("socket(AF_INET, SOCK_STREAM, IPPROTO_IP)"), calls
    for proc in (walk, race):
        attempts = json.loads(proc.stdout)["attempts"]
        assert attempts and all(a["steps"][0]["call"].startswith("socket(AF_INET, SOCK_STREAM, IPPROTO_IP)")
                                for a in attempts)
    data = json.loads(many.stdout)
    assert data["outcomes"] == {"connected": 3} and data["tcpi_rtt_ms"] == {}  # no TCP_INFO: nginx reads none
