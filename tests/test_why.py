"""``nbconn why``: every line issue 22 lists decodes to the right step, errno, verdict, next peer and level,
as text and JSON, HTTP and stream; ``--log`` summarises a mixed log (plain, .gz, stdin, junk); bad input is one
line, exit 2.  The decoder is pure, so most of this runs without a socket."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from nbconn.nginx import why

from .conftest import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = "2026/12/03 03:00:00"
HTTP_TAIL = ', client: 192.0.2.7, server: _, request: "GET / HTTP/1.1", upstream: "http://{up}/", host: "example"'
STREAM_TAIL = ', client: 192.0.2.7, server: 0.0.0.0:9000, upstream: "{up}", bytes from/to client:0/0, ' \
              'bytes from/to upstream:0/0'
WHILE = " while connecting to upstream"


def http(level, message, up="192.0.2.9:8080", action=WHILE):
    shown = up if not up.startswith("unix:") else up + ":"  # ngx_http_log_error_handler's uri_separator
    return f"{T} [{level}] 811#811: *52 {message}{action}" + HTTP_TAIL.format(up=shown)


def stream(level, message, up="192.0.2.9:8080", action=WHILE):
    return f"{T} [{level}] 811#811: *52 {message}{action}" + STREAM_TAIL.format(up=up)


UNIX = "unix:/run/app.sock"
# (line, cause, step, errno, expected level, tries another peer, counts against max_fails, notebook prefix)
CASES = [
    (http("error", "connect() failed (111: Connection refused)"), "so_error:ECONNREFUSED", why.STEP_SO_ERROR, 111,
     "error", True, True, "05"),
    (http("error", "connect() to 127.0.0.1:8080 failed (111: Connection refused)", "127.0.0.1:8080"),
     "connect:ECONNREFUSED", why.STEP_AT_ONCE, 111, "error", True, True, "04"),
    (http("error", "connect() failed (110: Connection timed out)"), "so_error:ETIMEDOUT", why.STEP_SO_ERROR, 110,
     "error", True, True, "05"),
    (http("error", "connect() failed (113: No route to host)"), "so_error:EHOSTUNREACH", why.STEP_SO_ERROR, 113,
     "error", True, True, "05"),
    (http("error", "connect() to 198.18.0.1:80 failed (113: No route to host)", "198.18.0.1:80"),
     "connect:EHOSTUNREACH", why.STEP_AT_ONCE, 113, "error", True, True, "04"),
    (http("error", "connect() to 198.18.0.1:80 failed (101: Network is unreachable)", "198.18.0.1:80"),
     "connect:ENETUNREACH", why.STEP_AT_ONCE, 101, "error", True, True, "04"),
    (http("error", "connect() failed (101: Network is unreachable)"), "so_error:ENETUNREACH", why.STEP_SO_ERROR, 101,
     "error", True, True, "05"),
    (http("crit", "connect() to 127.0.0.1:8080 failed (99: Cannot assign requested address)", "127.0.0.1:8080"),
     "connect:EADDRNOTAVAIL", why.STEP_AT_ONCE, 99, "crit", True, True, "04"),
    (http("error", f"connect() to {UNIX} failed (11: Resource temporarily unavailable)", UNIX),
     "connect:EAGAIN", why.STEP_AT_ONCE, 11, "error", True, True, "04"),
    (http("crit", f"connect() to {UNIX} failed (2: No such file or directory)", UNIX),
     "connect:ENOENT", why.STEP_AT_ONCE, 2, "crit", True, True, "04"),
    (http("crit", f"connect() to {UNIX} failed (13: Permission denied)", UNIX),
     "connect:EACCES", why.STEP_AT_ONCE, 13, "crit", True, True, "04"),
    (http("alert", "socket() failed (24: Too many open files)"), "socket:EMFILE", why.STEP_SOCKET, 24, "alert",
     False, False, "01"),
    (http("error", "upstream timed out (110: Connection timed out)"), "timeout", why.STEP_TIMER, 110, "error",
     True, True, "06"),
    (http("error", "no live upstreams", "backend"), "no_live", why.STEP_PICK, None, "error", False, False, "10"),
    (http("warn", "upstream server temporarily disabled"), "disabled", why.STEP_ACCOUNTING, None, "warn", None, True,
     "10"),
    (http("alert", "1024 worker_connections are not enough"), "worker_connections", why.STEP_SOCKET, None, "alert",
     False, False, "07"),
    (http("error", "upstream prematurely closed connection", action=" while reading response header from upstream"),
     "closed", why.STEP_HEADER, None, "error", True, True, "13"),
    (http("error", "recv() failed (104: Connection reset by peer)",
          action=" while reading response header from upstream"),
     "recv:ECONNRESET", why.STEP_HEADER, 104, "error", True, True, "10"),
    # the stream module: the same connect lines, its own context; after the connect it is proxying, not reading
    (stream("error", "connect() failed (111: Connection refused)"), "so_error:ECONNREFUSED", why.STEP_SO_ERROR, 111,
     "error", True, True, "05"),
    (stream("error", f"connect() to {UNIX} failed (11: Resource temporarily unavailable)", UNIX), "connect:EAGAIN",
     why.STEP_AT_ONCE, 11, "error", True, True, "04"),
    (stream("error", "upstream timed out (110: Connection timed out)"), "timeout", why.STEP_TIMER, 110, "error",
     True, True, "06"),
    (stream("error", "no live upstreams", "backend"), "no_live", why.STEP_PICK, None, "error", False, False, "10"),
    (stream("warn", "upstream server temporarily disabled"), "disabled", why.STEP_ACCOUNTING, None, "warn", None,
     True, "10"),
    (stream("error", "recv() failed (104: Connection reset by peer)", action=" while proxying and reading from upstream"),
     "recv:ECONNRESET", why.STEP_PROXYING, 104, "error", False, False, "10"),
]


def _stream_twins():
    """Every HTTP connect-flow case above again with the stream module's context (ngx_stream_proxy_log_error): the
    same texts from the same functions, so the same cause, step, level, next peer and max_fails accounting."""
    twins = []
    for case in CASES:
        line, cause = case[0], case[1]
        if "bytes from/to" in line or cause in ("closed", "recv:ECONNRESET"):
            continue  # already stream, or an HTTP-only line (the stream module proxies bytes, reads no header)
        head, _, rest = line.partition(", client: ")
        up = re.search(r'upstream: "http://(.*?):?/"', rest).group(1)
        twins.append((head + STREAM_TAIL.format(up=up),) + case[1:])
    return twins


CASES += _stream_twins()


def run_cli(*args, stdin=None, timeout=60):
    # no input: stdin is /dev/null, not whatever pytest was given (a pipe into `why` is read as the log)
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "nbconn", "why", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **feed)


@pytest.mark.parametrize("line, cause, step, err, level, tries, counts, notebook", CASES,
                         ids=[f"{c[1]}-{'stream' if 'bytes from/to' in c[0] else 'http'}" for c in CASES])
def test_every_listed_line_decodes(line, cause, step, err, level, tries, counts, notebook):
    answer = why.decode(line)
    assert answer["cause"] == cause
    assert answer["step"] == step
    assert answer["errno"] == err
    assert answer["expected_level"] == level
    assert answer["level_note"] is None  # each line above is at nginx 1.22.1's own level
    assert answer["tries_another"] is tries
    assert answer["counts_against_max_fails"] is counts
    assert answer["notebook"].startswith(notebook)
    assert answer["module"] == ("stream" if "bytes from/to" in line else "http")
    assert answer["kernel"] and answer["source"].startswith("nginx 1.22.1 ")
    # the same line without date, level and context (as people paste it) names the same cause
    bare = line.split("*52 ", 1)[1].split(", client:")[0]
    assert why.decode(bare)["cause"] == cause


def test_upstream_and_module_are_read_from_the_context():
    assert why.decode(CASES[0][0])["upstream"] == "192.0.2.9:8080"
    assert why.decode(CASES[9][0])["upstream"] == UNIX  # "http://unix:/run/app.sock:/"
    assert why.decode(http("error", "connect() failed (111: Connection refused)", "[::1]:8080"))["upstream"] \
        == "[::1]:8080"
    assert why.decode(stream("error", "no live upstreams", "backend"))["upstream"] == "backend"
    # the stream module has no 504 and one on/off switch; HTTP names the kinds
    assert "504" in why.decode(CASES[12][0])["detail"]
    assert "proxy_next_upstream is on" in why.decode(CASES[20][0])["detail"]


def test_the_verdict_comes_from_errors_py():
    from nbconn import errors

    answer = why.decode(CASES[1][0])
    v = errors.verdict("connect", 111, detail="127.0.0.1:8080")
    assert (answer["ngx_code"], answer["ngx_next"], answer["outcome"]) == (v.ngx_code, v.ngx_next, v.outcome)
    assert why.decode(CASES[11][0])["ngx_code"] == errors.NGX_ERROR  # socket(): 500, no next peer


@pytest.mark.parametrize("line, expected", [
    (http("crit", "connect() failed (111: Connection refused)"), "error"),
    (http("error", "connect() to 127.0.0.1:8080 failed (99: Cannot assign requested address)"), "crit"),
    (http("error", f"connect() to {UNIX} failed (2: No such file or directory)", UNIX), "crit"),
    (http("error", "socket() failed (24: Too many open files)"), "alert"),
    (http("error", "upstream server temporarily disabled"), "warn"),
])
def test_a_line_at_an_unexpected_level_is_pointed_out(line, expected):
    answer = why.decode(line)
    assert answer["expected_level"] == expected
    assert answer["level_note"] and f"[{expected}]" in answer["level_note"]


@pytest.mark.parametrize("line", [
    f'{T} [error] 811#811: *1 open() "/usr/share/nginx/html/x" failed (2: No such file or directory), client: 1.2.3.4',
    f"{T} [notice] 811#811: signal process started",
    f"{T} [error] 811#811: *1 upstream timed out (110: Connection timed out) while reading upstream, client: 1.2.3.4",
    f"{T} [error] 811#811: *1 connect() failed (111: Connection refused) while SSL handshaking to upstream",
    f"{T} [error] 811#811: *1 upstream prematurely closed connection while connecting to upstream",
    "connection refused",
    "the upstream is down",
])
def test_anything_else_is_outside_the_connect_flow(line):
    answer = why.decode(line)
    assert answer["cause"] == "outside"
    assert answer["step"] == why.OUTSIDE
    assert "errno" not in answer  # nothing guessed


def test_cli_text_and_json_for_every_listed_line():
    lines = [c[0] for c in CASES]
    proc = run_cli("--json", *lines)
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)["lines"]
    assert [a["cause"] for a in answers] == [c[1] for c in CASES]
    assert [a["step"] for a in answers] == [c[2] for c in CASES]
    assert [a["expected_level"] for a in answers] == [c[4] for c in CASES]
    text = run_cli(*lines)
    assert text.returncode == 0, text.stderr
    for c in CASES:
        assert f"cause:      {c[1]}" in text.stdout
    assert text.stdout.count("  step:       ") == len(CASES)


# -- --log ------------------------------------------------------------------------------------------------

def mixed_log(n_bursty: int = 12) -> tuple[list[str], dict]:
    """A log of mixed causes, other nginx lines and junk; returns the lines and what the summary must say."""
    lines = []
    for i in range(n_bursty):  # a burst: 12 refusals in one second from one upstream
        lines.append(http("error", "connect() failed (111: Connection refused)").replace(T, "2026/12/03 03:00:01"))
    lines.append(http("error", "upstream timed out (110: Connection timed out)", "192.0.2.10:8080")
                 .replace(T, "2026/12/03 03:00:02"))
    lines.append("this is not an nginx line")
    lines.append("\x00\x01\x02 binary junk \xff")
    lines.append(f'{T[:-2]}09 [error] 811#811: *1 open() "/x" failed (2: No such file or directory), client: 1.2.3.4')
    lines.append(http("crit", f"connect() to {UNIX} failed (2: No such file or directory)", UNIX)
                 .replace(T, "2026/12/03 03:00:05"))
    lines.append(stream("error", "no live upstreams", "backend").replace(T, "2026/12/03 03:00:07"))
    lines.append(http("error", "connect() failed (111: Connection refused)").replace(T, "2026/12/03 03:00:09"))
    expected = {"lines": len(lines), "not_nginx_lines": 2, "outside_connect_flow": 1,
                "so_error:ECONNREFUSED": n_bursty + 1, "timeout": 1, "connect:ENOENT": 1, "no_live": 1}
    return lines, expected


def check_summary(summary: dict, expected: dict) -> None:
    assert summary["lines"] == expected["lines"]
    assert summary["not_nginx_lines"] == expected["not_nginx_lines"]
    assert summary["outside_connect_flow"] == expected["outside_connect_flow"]
    for cause in ("so_error:ECONNREFUSED", "timeout", "connect:ENOENT", "no_live"):
        assert summary["causes"][cause]["count"] == expected[cause], cause
    refused = summary["causes"]["so_error:ECONNREFUSED"]
    assert (refused["first"], refused["last"]) == ("2026/12/03 03:00:01", "2026/12/03 03:00:09")
    assert summary["upstreams"]["192.0.2.9:8080"] == {"so_error:ECONNREFUSED": expected["so_error:ECONNREFUSED"]}
    assert summary["upstreams"][UNIX] == {"connect:ENOENT": 1}
    assert summary["upstreams"]["backend"] == {"no_live": 1}
    assert summary["bursts"] == [{"count": 12, "second": "2026/12/03 03:00:01", "cause": "so_error:ECONNREFUSED"}]


def test_summary_counts_causes_upstreams_times_and_bursts():
    lines, expected = mixed_log()
    s = why.Summary(burst=10)
    for line in lines:
        s.add(line + "\n")
    check_summary(s.finish(), expected)
    s = why.Summary(burst=13)  # one short of the burst: none reported
    for line in lines:
        s.add(line)
    assert s.finish()["bursts_seen"] == 0


@pytest.mark.parametrize("form", ["plain", "gz", "stdin", "gz-stdin"])
def test_cli_log_plain_gz_and_stdin(tmp_path, form):
    lines, expected = mixed_log()
    data = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n"
    data = data.replace(b"binary junk", b"binary junk \xfe\xff")
    if form.startswith("gz"):
        data = gzip.compress(data)
    path = tmp_path / ("error.log.1.gz" if form.startswith("gz") else "error.log")
    path.write_bytes(data)
    if form.endswith("stdin"):
        proc = subprocess.run([sys.executable, "-m", "nbconn", "why", "--json", "--log", "-"], input=data,
                              capture_output=True, timeout=60, cwd=ROOT)
        stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    else:
        proc = run_cli("--json", "--log", str(path))
        stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr
    check_summary(json.loads(stdout), expected)
    if form == "plain":
        text = run_cli("--log", str(path))
        assert text.returncode == 0 and "so_error:ECONNREFUSED" in text.stdout and "bursts" in text.stdout


def test_cli_log_overlong_line_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "error.log"
    good = http("error", "connect() failed (111: Connection refused)")
    path.write_text(good + "\n" + "x" * 300_000 + "\n" + good + "\n")
    proc = run_cli("--json", "--log", str(path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["not_nginx_lines"] == 1 and summary["causes"]["so_error:ECONNREFUSED"]["count"] == 2


# -- bad input ------------------------------------------------------------------------------------------------

def assert_one_line_exit_2(proc, *words):
    stderr = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, stderr)
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, stderr


def test_a_pipe_into_why_is_read_as_the_log():
    """`tail error.log | nbconn why` summarises, as --log - does; with nothing piped in it is a usage error."""
    lines, expected = mixed_log()
    piped = run_cli("--json", stdin="\n".join(lines) + "\n")
    assert piped.returncode == 0, piped.stderr
    check_summary(json.loads(piped.stdout), expected)
    assert_one_line_exit_2(run_cli(), "give at least one LINE")


@pytest.mark.parametrize("args, words", [
    ([""], ["LINE 1 is empty"]),
    (["   "], ["LINE 1 is empty"]),
    ([CASES[0][0], "a\x01b"], ["LINE 2", "not text"]),
    ([], ["give at least one LINE"]),
    (["--log", "/"], ["'/'", "directory"]),
    (["--log", "/nonexistent/error.log"], ["/nonexistent/error.log", "No such file"]),
    (["--log", ""], ["--log needs a file name"]),
    (["x", "--log", "-"], ["not both"]),
    (["--burst", "0", "x"], ["--burst 0"]),
    (["--log", "-", "--reproduce"], ["--reproduce"]),
])
def test_bad_input_one_line_exit_2(args, words):
    assert_one_line_exit_2(run_cli(*args), *words)


def test_binary_argument_bytes_exit_2():
    # an argument that is not UTF-8 reaches Python as surrogate escapes
    proc = subprocess.run([sys.executable.encode(), b"-m", b"nbconn", b"why", b"connect\xff\xfe"], capture_output=True,
                          timeout=60, cwd=ROOT)
    assert_one_line_exit_2(proc, "LINE 1", "not text")


def test_corrupt_gz_exit_2(tmp_path):
    path = tmp_path / "error.log.2.gz"
    path.write_bytes(gzip.compress(b"line\n" * 1000)[:40])
    assert_one_line_exit_2(run_cli("--log", str(path)), "gzip")


def test_unreadable_file_exit_2(tmp_path):
    """A file the caller may not read.  As root every mode bit is overridden, so the CLI runs as 'nobody' after
    importing what it needs (the interpreter lives where nobody cannot read)."""
    path = tmp_path / "error.log"
    path.write_text("x\n")
    path.chmod(0)
    if os.geteuid() != 0:
        assert_one_line_exit_2(run_cli("--log", str(path)), "cannot read", "Permission denied")
        return
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="nbconn-why-")  # pytest's tmp_path sits under a 0700 directory
    try:
        os.chmod(where, 0o711)
        path = os.path.join(where, "error.log")
        with open(path, "w") as f:
            f.write("x\n")
        os.chmod(path, 0)
        proc = _run_as_nobody(path)
    finally:
        shutil.rmtree(where)
    assert_one_line_exit_2(proc, "cannot read", "Permission denied")


def _run_as_nobody(path: str):
    code = ("import os, sys, gzip, zlib, json, stat\n"
            "import nbconn.cli as cli, nbconn.nginx.why\n"
            "cli.build_parser()\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            f"sys.exit(cli.main(['why', '--log', {str(path)!r}]))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


# -- --reproduce ----------------------------------------------------------------------------------------------

REPRODUCIBLE = [
    "connect() failed (111: Connection refused) while connecting to upstream",
    f"connect() to {UNIX} failed (111: Connection refused) while connecting to upstream",
    f"connect() to {UNIX} failed (11: Resource temporarily unavailable) while connecting to upstream",
    f"connect() to {UNIX} failed (2: No such file or directory) while connecting to upstream",
    f"connect() to {UNIX} failed (13: Permission denied) while connecting to upstream",
    "upstream timed out (110: Connection timed out) while connecting to upstream",
    "no live upstreams while connecting to upstream",
    "upstream server temporarily disabled while connecting to upstream",
    "recv() failed (104: Connection reset by peer) while reading response header from upstream",
    "upstream prematurely closed connection while reading response header from upstream",
]


@pytest.mark.parametrize("line", REPRODUCIBLE, ids=[why.decode(x)["cause"] for x in REPRODUCIBLE])
def test_reproduce_makes_the_same_cause_in_the_model_and_a_real_nginx(line, no_fd_leak, monkeypatch):
    import shutil
    import tempfile

    from nbconn.nginx import reproduce

    require_tool("nginx")
    # a temporary directory of this test's own (other work shares /tmp), passable for nginx's worker
    private = tempfile.mkdtemp(prefix="why-")
    os.chmod(private, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", private)
    try:
        answer = why.decode(line)
        rep = reproduce.reproduce(answer)
        left = os.listdir(private)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert rep["made"], rep
    assert rep["nginx"]["same"], rep
    produced = rep["nginx"]["line"].split("] ", 1)[1]
    assert why.decode(produced)["cause"] == answer["cause"]
    if answer["cause"] == "connect:EACCES" and os.geteuid() == 0:
        assert "root" in rep["model"]["note"]  # the model's connect runs as root: no mode stops it
    else:
        assert rep["model"]["same"], rep
    assert left == []  # its peers' directories and nginx's prefix are gone


IN_A_NAMESPACE = [
    "connect() to 192.0.2.9:80 failed (101: Network is unreachable) while connecting to upstream",
    "connect() to 192.0.2.9:80 failed (113: No route to host) while connecting to upstream",
    "connect() to 192.0.2.9:80 failed (99: Cannot assign requested address) while connecting to upstream",
    "connect() failed (110: Connection timed out) while connecting to upstream",
]


@pytest.mark.parametrize("line", IN_A_NAMESPACE, ids=[why.decode(x)["cause"] for x in IN_A_NAMESPACE])
def test_reproduce_in_a_lab_namespace_runs_the_model_and_a_real_nginx_in_there(line, no_fd_leak, monkeypatch):
    import shutil
    import tempfile

    from nbconn.nginx import reproduce
    from nbconn.lab import namespace_unavailable_reason

    reason = namespace_unavailable_reason()
    if reason:
        pytest.skip(reason)
    require_tool("nginx")
    private = tempfile.mkdtemp(prefix="why-")  # nginx's prefix goes here: gone afterwards
    os.chmod(private, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", private)
    try:
        answer = why.decode(line)
        rep = reproduce.reproduce(answer)
        left = os.listdir(private)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert left == []
    assert rep["made"], rep
    assert rep["model"]["same"], rep
    assert isinstance(rep["nginx"], dict) and rep["nginx"]["same"], rep  # nginx ran inside the namespace
    produced = rep["nginx"]["line"].split("] ", 1)[1]
    assert why.decode(produced)["cause"] == answer["cause"]
    assert f"({answer['errno']}: " in produced, produced  # the same errno, from nginx's own connect


def test_reproduce_worker_connections_with_a_real_nginx(no_fd_leak):
    from nbconn.nginx import reproduce

    require_tool("nginx")
    rep = reproduce.reproduce(why.decode(CASES[15][0]))  # "1024 worker_connections are not enough"
    assert rep["made"] and rep["nginx"]["same"], rep
    assert "worker_connections are not enough while connecting to upstream" in rep["nginx"]["line"]
    # the model counts nginx's connection pool too (Upstream(worker_connections=)): the same line, not "not run"
    assert isinstance(rep["model"], dict) and rep["model"]["same"], rep
    assert rep["model"]["line"] == "[alert] 64 worker_connections are not enough while connecting to upstream"


def test_reproduce_says_what_it_cannot_make_here():
    from nbconn.nginx import reproduce

    for line in ("connect() failed (113: No route to host) while connecting to upstream",
                 "connect() failed (101: Network is unreachable) while connecting to upstream",
                 "connect() to 192.0.2.1:80 failed (13: Permission denied) while connecting to upstream",
                 "socket() failed (24: Too many open files) while connecting to upstream",
                 'open() "/x" failed (2: No such file or directory)'):
        rep = reproduce.reproduce(why.decode(line))
        assert rep["made"] is False and rep["reason"]


def test_cli_reproduce_prints_both_lines_next_to_the_given_one():
    require_tool("nginx")
    proc = run_cli("--reproduce", "connect() failed (111: Connection refused) while connecting to upstream")
    assert proc.returncode == 0, proc.stderr
    assert "given:" in proc.stdout and proc.stdout.count("(same cause)") == 2, proc.stdout


@pytest.mark.parametrize("line, cause, step, tries", [
    ("setsockopt(SO_KEEPALIVE) failed, ignored (22: Invalid argument) while connecting to upstream",
     "setsockopt:EINVAL", why.STEP_OPTIONS, False),
    ("setsockopt(SO_RCVBUF) failed (22: Invalid argument) while connecting to upstream", "setsockopt:EINVAL",
     why.STEP_OPTIONS, False),
    ("bind(192.0.2.99) failed (99: Cannot assign requested address) while connecting to upstream", "bind:EADDRNOTAVAIL",
     why.STEP_BIND, False),
    ("ioctl(FIONBIO) failed (9: Bad file descriptor) while connecting to upstream", "nonblocking:EBADF",
     why.STEP_OPTIONS, False),
    ("epoll_ctl(EPOLL_CTL_ADD, 17) failed (12: Cannot allocate memory) while connecting to upstream",
     "epoll_ctl:ENOMEM", why.STEP_REGISTER, False),
    ("the new socket has number 1024, but only 1024 files are available while connecting to upstream", "files",
     why.STEP_SOCKET, False),
    ("upstream timed out (110: Connection timed out) while reading response header from upstream", "timeout_header",
     why.STEP_HEADER, True),
    ("writev() failed (32: Broken pipe) while sending request to upstream", "writev:EPIPE", why.STEP_SEND, True),
    ("upstream timed out (110: Connection timed out) while sending request to upstream", "timeout_send",
     why.STEP_SEND, True),
])
def test_the_other_steps_decode(line, cause, step, tries):
    answer = why.decode(line)
    assert (answer["cause"], answer["step"], answer["tries_another"]) == (cause, step, tries)
    assert answer["counts_against_max_fails"] is tries


def test_bad_input_makes_no_socket_and_no_process():
    """Rejected before anything exists, --reproduce included: strace sees no socket(), no clone/fork, no unshare."""
    strace = require_tool("strace")
    for args in (["--reproduce", ""], ["--reproduce", CASES[0][0], "a\x01b"], ["--log", "/"], ["--burst", "x", "y"]):
        proc = subprocess.run([strace, "-f", "-qq", "-e", "trace=socket,clone,clone3,fork,vfork,unshare,setns",
                               sys.executable, "-m", "nbconn", "why", *args], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        calls = [line for line in proc.stderr.splitlines() if re.match(r"(\[pid +\d+\] )?\w+\(", line)]
        assert proc.returncode == 2 and calls == [], (args, calls)
        assert proc.stderr.strip().splitlines()[-1].startswith("nbconn: error: ")


def test_summary_memory_is_bounded(monkeypatch):
    """What --log keeps does not grow with the log: upstream names past the cap count as "(other)", the decode
    cache is cleared when full, and only the largest bursts are kept."""
    monkeypatch.setattr(why, "MAX_UPSTREAMS", 50)
    s = why.Summary(burst=2)
    for i in range(5000):  # more distinct messages than the cache holds (4096)
        up = f"127.0.{i // 250}.{i % 250}:80"
        second = f"2026/12/03 03:{i // 600:02d}:{(i // 10) % 60:02d}"  # ten lines a second: a burst every second
        s.add(f"{second} [error] 1#1: *{i} connect() to {up} failed (111: Connection refused) while connecting to "
              f'upstream, client: 127.0.0.1, server: _, request: "GET / HTTP/1.1", upstream: "http://{up}/"')
        assert len(s._cache) <= 4096
    summary = s.finish()
    assert len(summary["upstreams"]) == 51 and summary["upstreams"]["(other)"] == {"connect:ECONNREFUSED": 4950}
    assert summary["bursts_seen"] == 500 and len(summary["bursts"]) == why.MAX_BURSTS
    assert summary["causes"]["connect:ECONNREFUSED"]["count"] == 5000


# -- the kernel-cause texts: issue 19's kernel review (findings 1, 2, 4, 5, 9, 10) -------------------------------

def kernel_text(line: str) -> str:
    return why.decode(line)["kernel"]


def test_eperm_at_connect_is_bpf_lsm_or_xfrm_not_netfilter():
    """Finding 1: tcp_connect passes on only ECONNREFUSED from sending the SYN, so a netfilter DROP is a lost SYN."""
    text = kernel_text("connect() to 192.0.2.9:80 failed (1: Operation not permitted) while connecting to upstream")
    assert "cgroup BPF" in text and "security_socket_connect" in text and "xfrm" in text
    assert "Not a netfilter rule" in text and "looks like a lost SYN" in text and "EINPROGRESS" in text
    assert "netfilter OUTPUT DROP/REJECT" not in text


def test_etimedout_via_so_error_names_131_s_and_every_knob():
    """Finding 2: the kernel gives up at 131 s (+ wheel lateness), nginx has no 75 s cap."""
    text = kernel_text("connect() failed (110: Connection timed out) while connecting to upstream")
    for word in ("131 s", "133.68 s", "no 75 s cap", "tcp_syn_linear_timeouts", "tcp_rto_max_ms",
                 "proxy_connect_timeout is longer"):
        assert word in text, word
    assert "at most 75 s" not in text and "means the SYN retries were lowered" not in text


@pytest.mark.parametrize("err, name", [(101, "Network is unreachable"), (113, "No route to host")])
def test_unreachable_via_so_error_names_a_route_lost_between_resends(err, name):
    """Finding 4: no ICMP needed: the resend's failed route lookup is kept in sk_err_soft."""
    text = kernel_text(f"connect() failed ({err}: {name}) while connecting to upstream")
    assert "ICMP" in text and "between SYN resends" in text and "sk_err_soft" in text
    assert "inet_sk_rebuild_header" in text and "tcp_write_err" in text


def test_refused_via_so_error_names_every_epoll_bit():
    """Finding 5 (why.py side): a refusal is EPOLLIN|EPOLLOUT|EPOLLERR|EPOLLHUP|EPOLLRDHUP, not EPOLLOUT|EPOLLERR."""
    text = kernel_text("connect() failed (111: Connection refused) while connecting to upstream")
    assert "EPOLLIN|EPOLLOUT|EPOLLERR|EPOLLHUP|EPOLLRDHUP" in text and "read handler" in text
    assert "woke epoll with EPOLLOUT|EPOLLERR" not in text


def test_eagain_for_tcp_names_no_routing_cache():
    """Finding 9: the IPv4 routing cache went in Linux 3.6; out of ports is EADDRNOTAVAIL."""
    text = kernel_text("connect() to 192.0.2.9:80 failed (11: Resource temporarily unavailable) while connecting to "
                       "upstream")
    assert "3.6" in text and "EADDRNOTAVAIL" in text and "ran out of routing-cache" not in text


def test_econnreset_at_connect_is_not_a_handshake_reply():
    """Finding 10: replies wait for release_sock; an RST in SYN-SENT is ECONNREFUSED (tcp_reset)."""
    text = kernel_text("connect() to 192.0.2.9:80 failed (104: Connection reset by peer) while connecting to upstream")
    assert "release_sock" in text and "tcp_reset" in text and "ECONNREFUSED, not ECONNRESET" in text
    assert "a reset met the handshake before connect() returned" not in text


# -- the same, measured: each probe runs in a user + network namespace of its own (`unshare -rn`) -----------------

# A silent peer: 198.18.77.9 behind a veth whose other end nobody reads; its neighbour entry is permanent, so every SYN
# leaves and nothing ever answers.  198.18.88.0/24 is routed through it.
_SILENT_PEER = r"""
import errno, select, socket, struct, subprocess
def run(*a): subprocess.run(a, check=True, timeout=20, capture_output=True)
def so_error(s): return errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0")
def pending(r): return errno.errorcode.get(r, "0")
def wait(s, seconds):
    with select.epoll() as ep:
        ep.register(s.fileno(), select.EPOLLOUT)
        return bool(ep.poll(seconds))
run("ip", "link", "set", "lo", "up")
run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
run("ip", "addr", "add", "198.18.77.1/24", "dev", "v0")
run("ip", "link", "set", "v0", "up")
run("ip", "link", "set", "v1", "up")
run("ip", "neigh", "add", "198.18.77.9", "lladdr", "02:00:00:00:00:09", "dev", "v0", "nud", "permanent")
run("ip", "route", "add", "198.18.88.0/24", "via", "198.18.77.9")
"""


def in_a_namespace(probe: str, *tools: str) -> subprocess.CompletedProcess:
    """Run ``probe`` (after _SILENT_PEER) in a user + network namespace of its own; skip where that cannot be."""
    import shutil

    from nbconn.lab import namespace_unavailable_reason

    reason = namespace_unavailable_reason()
    if reason:
        pytest.skip(reason)
    missing = [tool for tool in ("ip", "unshare") + tools if not shutil.which(tool)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    return subprocess.run(["unshare", "-rn", sys.executable, "-c", _SILENT_PEER + probe], capture_output=True,
                          text=True, timeout=180)


def test_eperm_from_an_ipsec_block_policy_at_connect_and_via_so_error():
    """Finding 1, measured: an xfrm block policy makes connect() fail with EPERM at once, and a policy added while
    the SYN is pending ends the connect with EPERM through SO_ERROR (the resend's route lookup fails, sk_err_soft,
    tcp_write_err) -- the EPERM nbconn.errors.SO_ERROR_ERRNOS lists."""
    proc = in_a_namespace(r"""
import time
block = ("xfrm", "policy", "add", "dir", "out", "dst", "198.18.77.9/32", "action", "block")
run("ip", *block)
s = socket.socket(); s.setblocking(False)
print("at-once", pending(s.connect_ex(("198.18.77.9", 80)))); s.close()
run("ip", "xfrm", "policy", "flush")
s = socket.socket(); s.setblocking(False); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
t = time.monotonic(); r = s.connect_ex(("198.18.77.9", 80))
run("ip", *block)  # after the first SYN left, before its resend (1 s later)
before = time.monotonic() - t
print("pending", pending(r), "%.3f" % before, wait(s, 30), so_error(s))
""")
    if proc.returncode != 0 and "xfrm" in proc.stderr:
        pytest.skip(f"no xfrm here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["at-once"] == "EPERM"
    result, before, ready, err = lines["pending"].split()
    assert result == "EINPROGRESS" and ready == "True"
    if float(before) >= 0.9:
        pytest.skip(f"the policy went in {before} s after connect(): too late for the first resend on this load")
    assert err == "EPERM"


def test_netfilter_verdicts_on_the_syn_never_make_eperm():
    """Finding 1, measured: an nftables output rule on the SYN never makes connect() fail at once.  drop: EINPROGRESS,
    the SYN is resent, SO_ERROR ETIMEDOUT (TCP_SYNCNT 1: about 3 s); reject: EINPROGRESS, then ECONNREFUSED (tcp
    reset) or EHOSTUNREACH (admin prohibited) through SO_ERROR."""
    proc = in_a_namespace(r"""
run("nft", "add", "table", "ip", "f")
run("nft", "add", "chain", "ip", "f", "out", "{ type filter hook output priority 0 ; }")
for name, verdict in (("drop", "drop"), ("reset", "reject with tcp reset"),
                      ("prohibited", "reject with icmp type admin-prohibited")):
    run("nft", "flush", "chain", "ip", "f", "out")
    run("nft", "add", "rule", "ip", "f", "out", "ip", "daddr", "198.18.77.9", "tcp", "dport", "80", *verdict.split())
    s = socket.socket(); s.setblocking(False); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
    r = s.connect_ex(("198.18.77.9", 80))
    print(name, pending(r), wait(s, 30), so_error(s))
    s.close()
""", "nft")
    if proc.returncode != 0 and "nft" in proc.stderr:
        pytest.skip(f"no nf_tables here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    got = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert got == {"drop": ["EINPROGRESS", "True", "ETIMEDOUT"], "reset": ["EINPROGRESS", "True", "ECONNREFUSED"],
                   "prohibited": ["EINPROGRESS", "True", "EHOSTUNREACH"]}, got


def test_tcp_rto_max_ms_shortens_the_syn_give_up():
    """Finding 2, measured: with tcp_rto_max_ms lowered to 1000 (Linux 6.15+) and tcp_syn_retries at its default (a new
    namespace has 6), the kernel ends a connect to a silent peer with ETIMEDOUT after six resends (about 7 s), not at
    131 s -- one way a "connect() failed (110: ...)" line appears with unchanged SYN retries."""
    if not os.path.exists("/proc/sys/net/ipv4/tcp_rto_max_ms"):
        pytest.skip("no net.ipv4.tcp_rto_max_ms before Linux 6.15")
    proc = in_a_namespace(r"""
with open("/proc/sys/net/ipv4/tcp_rto_max_ms", "w") as f:
    f.write("1000")
s = socket.socket(); s.setblocking(False)
r = s.connect_ex(("198.18.77.9", 80))
ready = wait(s, 60)  # the default schedule would need 131 s
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
print(pending(r), ready, so_error(s), struct.unpack_from("I", info, 100)[0])  # tcpi_total_retrans
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["EINPROGRESS", "True", "ETIMEDOUT", "6"], proc.stdout


def test_a_route_changed_between_syn_resends_ends_the_connect_with_its_errno():
    """Finding 4, measured: no ICMP needed.  The route changes after the SYN left; the resend's route lookup fails,
    sk_err_soft keeps the errno and tcp_write_err reports it at give-up (TCP_SYNCNT 1): deleted -> ENETUNREACH,
    unreachable -> EHOSTUNREACH, prohibit -> EACCES, blackhole -> EINVAL.  A blackhole route at connect() time: EINVAL
    at once.  Each errno has its cause text in why.py."""
    proc = in_a_namespace(r"""
for change in ("del", "unreachable", "prohibit", "blackhole"):
    s = socket.socket(); s.setblocking(False); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
    r = s.connect_ex(("198.18.88.5", 80))  # the SYN leaves via 198.18.77.9
    if change == "del":
        run("ip", "route", "del", "198.18.88.0/24")
    else:
        run("ip", "route", "replace", change, "198.18.88.0/24")
    print(change, pending(r), wait(s, 30), so_error(s))
    s.close()
    run("ip", "route", "replace", "198.18.88.0/24", "via", "198.18.77.9")
run("ip", "route", "replace", "blackhole", "198.18.88.0/24")
s = socket.socket(); s.setblocking(False)
print("at-once", pending(s.connect_ex(("198.18.88.5", 80))))
""")
    assert proc.returncode == 0, proc.stderr
    got = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    expected = {"del": "ENETUNREACH", "unreachable": "EHOSTUNREACH", "prohibit": "EACCES", "blackhole": "EINVAL"}
    for change, name in expected.items():
        assert got[change] == ["EINPROGRESS", "True", name], (change, got)
        err = getattr(__import__("errno"), name)
        text = kernel_text(f"connect() failed ({err}: {os.strerror(err)}) while connecting to upstream")
        assert "between SYN resends" in text and "sk_err_soft" in text, (name, text)
    assert got["at-once"] == ["EINVAL"]
    assert "blackhole" in kernel_text("connect() to 198.18.88.5:80 failed (22: Invalid argument) while connecting to "
                                      "upstream")


def test_ip_transparent_failure_is_in_the_flow_and_ends_with_500():
    """nginx review finding 8: nginx 1.22.1 writes this line (ngx_event_connect_set_transparent) and answers 500."""
    d = why.decode("setsockopt(IP_TRANSPARENT) failed (1: Operation not permitted) while connecting to upstream")
    assert d["cause"] == "setsockopt:EPERM" and d["step"] == why.STEP_OPTIONS
    assert d["tries_another"] is False and "500" in d["detail"] and "CAP_NET_RAW" in d["kernel"]


def test_disabled_says_fails_is_no_count_within_a_window():
    """nginx review finding 2: only a success after fail_timeout clears fails (accessed < checked)."""
    d = why.decode("upstream server temporarily disabled while connecting to upstream")
    assert "no count within a time window" in d["detail"] and "accessed < checked" in d["detail"]
