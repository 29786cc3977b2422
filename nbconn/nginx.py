"""A real nginx next to nbconn: same peers, same settings, compare what both do.

nbconn claims to do what nginx does.  The honest check is to run nginx itself
-- Debian's package, the binary readers run in production -- against the same
lab peers and read what it did from its own logs:

* the access log, with a log format of ``$status``, ``$upstream_addr`` (every
  peer tried, "A, B"), ``$upstream_connect_time`` ("-" for a failed try) and
  ``$upstream_status``;
* the error log: "connect() failed (111: Connection refused) while connecting to
  upstream", "upstream timed out (110: Connection timed out) while connecting to
  upstream", "upstream server temporarily disabled", "no live upstreams";
* optionally ``strace`` of the worker: the syscalls of one upstream connect.

:class:`Nginx` runs a private instance from a temporary prefix: its own
configuration, pid file, logs and temp directories, ``daemon off``, listening on
a free 127.0.0.1 port.  It never touches the system service.  It is stopped
(SIGQUIT, then SIGKILL) and its prefix removed on every exit path.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from . import systools, validate
from .upstream import Peer

LOG_FORMAT = "$status|$upstream_addr|$upstream_connect_time|$upstream_status"


def find_nginx() -> str | None:
    """The nginx binary, or None."""
    # as root by absolute system path only, never through PATH (nbconn.systools)
    return systools.find("nginx")


def unavailable_reason() -> str | None:
    """None when a real nginx can run here, else one line saying why not."""
    if find_nginx() is None:
        return "nginx is not installed (Debian: apt-get install nginx)"
    return None


def version() -> str:
    out = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, timeout=10)
    return out.stderr.strip().split("/")[-1]


@dataclass
class AccessEntry:
    """One access-log line: what nginx did for one request."""

    status: str
    upstream_addr: list  # peers tried, in order ("backend" alone when there was no live upstream)
    connect_time: list  # seconds per try, None where the connect failed ("-")
    upstream_status: list


@dataclass
class ErrorEntry:
    level: str
    message: str  # e.g. "connect() failed (111: Connection refused) while connecting to upstream"
    upstream: str | None  # the peer, e.g. "127.0.0.1:40123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


# -- what may go into the configuration file -----------------------------------------------------------
# nginx's configuration parser (ngx_conf_read_token, src/core/ngx_conf_file.c) splits on whitespace and ends a
# directive at ";" or opens/closes a block at "{" / "}"; quotes, "\\" and "$" change how a token is read.
# A value written unquoted that holds any of them becomes *more configuration*: an 89-byte unix: path can add
# a `server { ... autoindex on; root /; }` block.  Rather than quote (and trust every later edit to quote
# too), every value config() writes must match this plain alphabet, or config() refuses it by name.
_PLAIN = re.compile(r"[A-Za-z0-9._:/\[\]+=@%-]+")
_PLAIN_ADDRESS = re.compile(r"(?:unix:/[A-Za-z0-9._/+-]+|[0-9.]+:[0-9]+|\[[0-9A-Fa-f:.]+\]:[0-9]+|"
                            r"[A-Za-z0-9.-]+:[0-9]+)")


def config_value(name: str, value: str, pattern: re.Pattern = _PLAIN) -> str:
    """``value`` if it can be written into nginx.conf unquoted without changing its structure, else ValueError."""
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        bad = sorted({c for c in str(value) if not (c.isascii() and (c.isalnum() or c in "._:/[]+=@%-"))})
        shown_bad = ", ".join(repr(c) for c in bad[:5]) or "its form"
        raise ValueError(f"{name} {validate.shown(value)} cannot go into an nginx configuration ({shown_bad} "
                         f"would change or break its structure)")
    return value


def _worker_user() -> str | None:
    """As root: the unprivileged user and group the worker runs as (nobody + its group); else None."""
    if os.geteuid() != 0:
        return None  # nginx can only switch users when started by root; the worker runs as the caller
    import grp
    import pwd

    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        raise RuntimeError("running nginx as root needs an unprivileged user 'nobody' for its worker") from None
    try:
        group = grp.getgrgid(user.pw_gid).gr_name
    except KeyError:
        group = str(user.pw_gid)
    return f"{user.pw_name} {group}"


class Nginx:
    """A private nginx reverse proxy in front of ``peers`` (strings like the CLI's --peer, or Peer objects).

    ``connect_timeout``: proxy_connect_timeout in seconds; ``next_upstream``: kinds
    for proxy_next_upstream ("error", "timeout"; empty = off); ``tries`` and
    ``next_upstream_timeout``: proxy_next_upstream_tries / _timeout (0 = unlimited);
    ``strace``: run nginx under ``strace -f`` and keep the trace (of ``strace_syscalls``);
    ``keepalive``: ``keepalive N`` in the upstream block, with ``proxy_http_version 1.1`` and an empty
    ``Connection`` header (without those two nginx closes every upstream connection anyway).
    """

    def __init__(self, peers, *, connect_timeout: float = 0.2, next_upstream=("error", "timeout"), tries: int = 0,
                 next_upstream_timeout: float = 0.0, strace: bool = False, keepalive: int = 0,
                 strace_syscalls: str = "socket,ioctl,epoll_ctl,connect,epoll_wait,getsockopt,close") -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.peers = [p if isinstance(p, Peer) else Peer.parse(p) for p in peers]
        for p in self.peers:  # named here, before any file or process exists
            config_value("peer address", p.address, _PLAIN_ADDRESS)
        # Every setting is checked for type and range here: config() writes them into nginx.conf, where a
        # string such as tries="1; ..." would be more configuration.  nginx caps proxy_connect_timeout at 75 s.
        self.connect_timeout = validate.number("connect_timeout", connect_timeout, 0, 75, low_open=True)
        if isinstance(next_upstream, str):
            raise TypeError(f"next_upstream must be a tuple of kinds, got {validate.shown(next_upstream)}")
        self.next_upstream = tuple(validate.choice("next_upstream", k, ("error", "timeout")) for k in next_upstream)
        self.tries = validate.integer("tries", tries, 0, 1000)
        self.next_upstream_timeout = validate.number("next_upstream_timeout", next_upstream_timeout, 0,
                                                     validate.MAX_TIMEOUT_S)
        self.strace = validate.flag("strace", strace)
        if not isinstance(strace_syscalls, str) or re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", strace_syscalls) is None:
            raise ValueError(f"strace_syscalls={validate.shown(strace_syscalls)} must be syscall names, comma-separated")
        self.strace_syscalls = strace_syscalls
        # `keepalive N` in the upstream block, with the two lines it needs to work at all: HTTP/1.1 to the
        # upstream and no "Connection: close" header (nginx's proxy sends HTTP/1.0 + close by default)
        self.keepalive = validate.integer("keepalive", keepalive, 0, 10_000)
        self.prefix = ""
        self.port = 0
        self.proc: subprocess.Popen | None = None

    # -- configuration -------------------------------------------------------------
    def config(self) -> str:
        """The nginx.conf text.  Every value in it is checked by :func:`config_value` (or is a number)."""
        servers = []
        for p in self.peers:
            address = config_value("peer address", p.address, _PLAIN_ADDRESS)
            line = (f"server {address} weight={int(p.weight)} max_fails={int(p.max_fails)} "
                    f"fail_timeout={int(p.fail_timeout)}s")
            line += " backup" if p.backup else ""
            line += " down" if p.down else ""
            servers.append(f"        {line};")
        nu = " ".join(self.next_upstream) or "off"
        worker = _worker_user()
        user = f"user {worker};\n" if worker else ""
        pre = config_value("nginx prefix (from TMPDIR)", self.prefix) if self.prefix else ""
        keepalive = f"\n        keepalive {int(self.keepalive)};" if self.keepalive else ""
        proxy_keepalive = ('\n            proxy_http_version 1.1;\n            proxy_set_header Connection "";'
                           if self.keepalive else "")
        return f"""# written by nbconn.nginx: a private instance, not the system service
{user}daemon off;
master_process on;
worker_processes 1;
pid {pre}/nginx.pid;
error_log {pre}/error.log info;
events {{ worker_connections 64; use epoll; }}
http {{
    log_format nbconn '{LOG_FORMAT}';
    access_log {pre}/access.log nbconn;
    client_body_temp_path {pre}/tmp/body;
    proxy_temp_path {pre}/tmp/proxy;
    fastcgi_temp_path {pre}/tmp/fastcgi;
    uwsgi_temp_path {pre}/tmp/uwsgi;
    scgi_temp_path {pre}/tmp/scgi;
    upstream backend {{
{chr(10).join(servers)}{keepalive}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://backend;
            proxy_connect_timeout {_duration(self.connect_timeout)};
            proxy_next_upstream {nu};
            proxy_next_upstream_tries {self.tries};
            proxy_next_upstream_timeout {_duration(self.next_upstream_timeout) if self.next_upstream_timeout else 0};
            proxy_read_timeout 5s;{proxy_keepalive}
        }}
    }}
}}
"""

    # -- lifetime -----------------------------------------------------------------
    def start(self) -> "Nginx":
        self.prefix = tempfile.mkdtemp(prefix="nbconn-nginx-")
        try:
            config_value("nginx prefix (from TMPDIR)", self.prefix)
            os.makedirs(os.path.join(self.prefix, "tmp"))
            if _worker_user():
                # The unprivileged worker must reach its temp paths (nginx's master creates and chowns them)
                # and reopen its logs; it needs to pass through the 0700 prefix, not list or write it.
                os.chmod(self.prefix, 0o711)
            for _ in range(3):  # the free port may be taken between the probe and nginx's bind: retry
                self.port = _free_port()
                conf = os.path.join(self.prefix, "nginx.conf")
                with open(conf, "w") as f:
                    f.write(self.config())
                argv = [find_nginx(), "-p", self.prefix, "-c", conf, "-e", os.path.join(self.prefix, "startup.log")]
                if self.strace:
                    argv = [systools.find("strace") or "strace", "-f", "-qq", "-tt", "-o",
                            os.path.join(self.prefix, "strace.log"),
                            "-e", f"trace={self.strace_syscalls}", "-s", "40", *argv]
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
                if self._wait_ready(5.0):
                    return self
                self._kill()
            raise RuntimeError(f"nginx did not start: {self._startup_errors()}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                # the probe connection itself is logged as a 400; start the logs clean
                time.sleep(0.05)
                for name in ("access.log", "error.log"):
                    open(os.path.join(self.prefix, name), "w").close()
                os.kill(self.proc.pid if not self.strace else self._master_pid(), signal.SIGUSR1)  # reopen logs
                time.sleep(0.05)
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def _master_pid(self) -> int:
        with open(os.path.join(self.prefix, "nginx.pid")) as f:
            return int(f.read())

    def _startup_errors(self) -> str:
        for name in ("startup.log", "error.log"):
            path = os.path.join(self.prefix, name)
            if os.path.exists(path):
                with open(path) as f:
                    lines = [line.strip() for line in f if "[emerg]" in line or "[alert]" in line]
                if lines:
                    return lines[-1]
        return "no error logged"

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                pid = self._master_pid() if self.strace else proc.pid
                os.kill(pid, signal.SIGQUIT)
            except (OSError, ValueError):
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def stop(self) -> None:
        self._kill()
        if self.prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = ""

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- talking to it ----------------------------------------------------------------
    def request(self, path: str = "/", *, timeout_s: float = 10.0) -> str:
        """One HTTP/1.0 GET through nginx; returns the status code as a string."""
        if not isinstance(path, str) or re.fullmatch(r"/[\x21-\x7e]*", path) is None:
            raise ValueError(f"path={validate.shown(path)} must start with / and hold printable ASCII, no spaces")
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: nbconn\r\n\r\n".encode())
            data = b""
            while len(data) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "?"

    def access_log(self) -> list[AccessEntry]:
        entries = []
        with open(os.path.join(self.prefix, "access.log")) as f:
            for line in f:
                status, addr, ctime, ustatus = line.rstrip("\n").split("|")
                entries.append(AccessEntry(
                    status=status,
                    upstream_addr=[a.strip() for a in addr.split(",")],
                    connect_time=[None if t.strip() == "-" else float(t) for t in ctime.split(",")],
                    upstream_status=[s.strip() for s in ustatus.split(",")]))
        return entries

    def error_log(self) -> list[ErrorEntry]:
        pattern = re.compile(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*?)?$")
        upstream = re.compile(r'upstream: "\w+://([^/"]+)')
        entries = []
        with open(os.path.join(self.prefix, "error.log")) as f:
            for line in f:
                m = pattern.match(line.rstrip("\n"))
                if not m or m.group(1) in ("notice", "info") and "upstream" not in m.group(2):
                    continue
                u = upstream.search(line)
                entries.append(ErrorEntry(m.group(1), m.group(2), u.group(1) if u else None))
        return entries

    def strace_lines(self) -> list[str]:
        path = os.path.join(self.prefix, "strace.log")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [line.rstrip("\n") for line in f]


def upstream_connect_syscalls(lines: list[str], port: int) -> list[str]:
    """From an ``strace -f -tt`` of nginx: the worker's syscalls for its first connect to ``port``.

    Finds the ``connect()`` to the peer's port, then takes that process's lines
    from the ``socket()`` that created the descriptor up to its ``close()``: calls on
    that fd, and the ``epoll_wait`` calls in between.
    """
    parsed = []
    for raw in lines:
        m = re.match(r"^(\d+)\s+(?:\d\d:\d\d:\d\d\.\d+\s+)?(.*)$", raw)
        if m:
            parsed.append((m.group(1), re.sub(r"\s+= ", " = ", m.group(2))))
    at = next((i for i, (_, line) in enumerate(parsed)
               if line.startswith("connect(") and f"htons({port})" in line), None)
    if at is None:
        return []
    pid, line = parsed[at]
    fd = re.match(r"connect\((\d+),", line).group(1)
    start = max(i for i, (p, line) in enumerate(parsed[:at])
                if p == pid and re.match(rf"socket\(.*\) = {fd}$", line))
    picked = []
    for p, line in parsed[start:]:
        if p != pid:
            continue
        if re.match(rf"\w+\({fd}[,)]", line) or re.match(rf"epoll_ctl\(\d+, \w+, {fd},", line) \
                or line.startswith("socket(") and line.endswith(f"= {fd}") or line.startswith("epoll_wait("):
            picked.append(line)
        if line.startswith(f"close({fd})"):
            break
    return picked


def compare_sequences(nginx_entries: list[AccessEntry], nbconn_requests) -> list[dict]:
    """Per request: the peers nginx tried and the peers nbconn.upstream tried, and whether they match."""
    rows = []
    for i, (entry, req) in enumerate(zip(nginx_entries, nbconn_requests), 1):
        ours = [a.peer for a in req.attempts] or ["backend"]
        rows.append({"request": i, "nginx": entry.upstream_addr, "nbconn": ours, "nginx_status": entry.status,
                     "nbconn_result": req.result, "same": entry.upstream_addr == ours and entry.status == req.result})
    return rows


def shorten(call: str) -> str:
    """A syscall line with the bulky parts elided: sockaddrs and epoll data become {...}; what an
    epoll_wait returned (it may also report the client's socket) becomes [...]."""
    if call.startswith("epoll_wait("):
        return re.sub(r"^epoll_wait\((\d+), .*, (\d+), (-?\d+)\) = .*$", r"epoll_wait(\1, [...], \2, \3)", call)
    call = re.sub(r"\{sa_family=[^}]*\}", "{...}", call)
    call = re.sub(r"data=\{[^}]*\}", "data={...}", call)
    return call.replace(" (Operation now in progress)", "")


def client_requests_syscalls(lines: list[str]) -> list[list[str]]:
    """From an ``strace -f -tt`` of nginx: the calls made for each client request, in order.

    A request runs from the worker's ``accept4()`` of the client's connection to the ``close()`` of that
    descriptor; every call the worker made in between is kept (the upstream's socket(), connect(), writev(),
    recvfrom() among them).  The readiness probe that start() makes (closed without a request) is left out.
    """
    requests, current, fd, pid = [], None, None, None
    for raw in lines:
        m = re.match(r"^(\d+)\s+(?:\d\d:\d\d:\d\d\.\d+\s+)?(.*)$", raw)
        if not m:
            continue
        who, call = m.group(1), re.sub(r"\s+= ", " = ", m.group(2))
        accepted = re.match(r"accept4?\(.*\) = (\d+)$", call)
        if accepted and current is None:
            current, fd, pid = [call], accepted.group(1), who
            continue
        if current is None or who != pid:
            continue
        current.append(call)
        if call.startswith(f"close({fd})"):
            if not any(re.match(rf"recvfrom\({fd}, \"\", .*= 0$", c) for c in current):
                requests.append(current)
            current = None
    return requests
