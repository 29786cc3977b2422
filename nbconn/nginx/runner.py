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
a free 127.0.0.1 port -- on the host's loopback, or inside a lab namespace
(``netns=``).  It never touches the system service.  ``stop()`` ends it (SIGQUIT,
then SIGKILL to its process group) and removes its prefix; and it never outlives
the process that started it: nginx is the child of a small guard
(:mod:`nbconn.nginx.guard`) that ends nginx's process group and removes the prefix
when this process exits, however it exits.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass

from .. import systools, validate
from .upstream import Server

LOG_FORMAT = "$status|$upstream_addr|$upstream_connect_time|$upstream_status"
#: The guard process that ties nginx's life to ours (run by path, as ``python -I -S``: it imports no nbconn).
_GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")
#: How long the guard may take to answer (a fresh interpreter on a loaded machine).
_GUARD_ANSWER_S = 10.0


def find_nginx() -> str | None:
    """The nginx binary, or None."""
    # as root by absolute system path only, never through PATH (nbconn.systools)
    return systools.find("nginx")


def unavailable_reason() -> str | None:
    """None when a real nginx can run here, else one line saying why not."""
    if find_nginx() is None:
        return "nginx is not installed (Debian: apt-get install nginx)"
    return None


def version() -> str | None:
    """This machine's nginx version (``1.22.1``, from ``nginx -v``), or None when there is no nginx."""
    binary = find_nginx()
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
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


def _killpg(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass  # gone already


def _not_none(*values) -> list:
    """The values that are not None.  (A comprehension in a with or a try is a loop in that frame:
    tests/test_interrupt_coverage.py says why nbconn calls one instead.)"""
    return [v for v in values if v is not None]


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


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


#: Every kind nginx 1.22.1's proxy_next_upstream takes besides "off" (ngx_http_proxy_next_upstream_masks,
#: src/http/modules/ngx_http_proxy_module.c).  "updating" is in that table too, but it is the cache's word
#: (proxy_cache_use_stale shares the table) and means nothing without a cache, so it is not offered.
PROXY_NEXT_UPSTREAM_KINDS = ("error", "timeout", "invalid_header", "http_500", "http_502", "http_503", "http_504",
                             "http_403", "http_404", "http_429", "non_idempotent")

#: What construction fixes.  config() writes them into nginx.conf, so after construction they are read-only
#: (a later ``ng.tries = "1; location /x { alias /etc/; }"`` is refused) and config() checks them again anyway.
SETTINGS = ("peers", "connect_timeout", "next_upstream", "tries", "next_upstream_timeout", "read_timeout", "keepalive",
            "proxy_bind", "workers", "worker_connections", "zone", "strace", "strace_syscalls", "netns")

#: worker_processes above this is refused: each worker is a process, and a tutorial's machine has a few cores.
MAX_WORKERS = 32
#: worker_connections: at least one per listening socket plus one for the master's channel, or nginx refuses to
#: start ("N worker_connections are not enough for 1 listening sockets", ngx_event_init_conf in
#: src/event/ngx_event.c).  2 leaves none for a client (nginx accepts and resets it: "[alert] 2 worker_connections
#: are not enough"); 3 none for the upstream connect (ngx_get_connection fails: 500, "[alert] 3 worker_connections
#: are not enough while connecting to upstream", measured).  Each is a descriptor and a preallocated ngx_connection_t.
MIN_WORKER_CONNECTIONS = 2
MAX_WORKER_CONNECTIONS = 65536


def _proxy_bind(value: object) -> str | None:
    """An IP address without a port, as nginx's ngx_parse_addr reads it (IPv6 bare, no brackets, no scope)."""
    if value is None:
        return None
    import ipaddress

    if not isinstance(value, str):
        raise TypeError(f"proxy_bind must be an IP address as a str, or None, got {validate.shown(value)}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    if address is None or "%" in value:
        raise ValueError(f"proxy_bind={validate.shown(value)} must be an IP address without a port, "
                         f"e.g. '127.0.0.2' or '::1'")
    return str(address)


def _checked(settings: dict) -> dict:
    """Every setting checked for type and range (nbconn.validate's one rule), and returned as written."""
    out = dict(settings)
    out["peers"] = tuple(_peer_copy(p) for p in settings["peers"])
    # nginx 1.22.1 takes any proxy_connect_timeout ngx_parse_time reads (ngx_conf_set_msec_slot); the "75 s"
    # in its documentation is about what the OS may do, not a limit nginx enforces.
    out["connect_timeout"] = validate.number("connect_timeout", settings["connect_timeout"], 0,
                                             validate.MAX_TIMEOUT_S, low_open=True)
    next_upstream = settings["next_upstream"]
    if isinstance(next_upstream, str) or not isinstance(next_upstream, (tuple, list)):
        raise TypeError(f"next_upstream must be a tuple of kinds (empty = off), got {validate.shown(next_upstream)}")
    kinds = tuple(validate.choice("next_upstream", k, PROXY_NEXT_UPSTREAM_KINDS) for k in next_upstream)
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"next_upstream={validate.shown(next_upstream)} names a kind twice")
    out["next_upstream"] = kinds
    out["tries"] = validate.integer("tries", settings["tries"], 0, 1000)
    out["next_upstream_timeout"] = validate.number("next_upstream_timeout", settings["next_upstream_timeout"], 0,
                                                   validate.MAX_TIMEOUT_S)
    out["read_timeout"] = validate.number("read_timeout", settings["read_timeout"], 0, validate.MAX_TIMEOUT_S,
                                          low_open=True)
    # `keepalive N` in the upstream block, with the two lines it needs to work at all: HTTP/1.1 to the
    # upstream and no "Connection: close" header (nginx's proxy sends HTTP/1.0 + close by default)
    out["keepalive"] = validate.integer("keepalive", settings["keepalive"], 0, 10_000)
    out["proxy_bind"] = _proxy_bind(settings["proxy_bind"])
    out["workers"] = validate.integer("workers", settings["workers"], 1, MAX_WORKERS)
    out["worker_connections"] = validate.integer("worker_connections", settings["worker_connections"],
                                                 MIN_WORKER_CONNECTIONS,
                                                 MAX_WORKER_CONNECTIONS)
    out["zone"] = validate.flag("zone", settings["zone"])
    out["strace"] = validate.flag("strace", settings["strace"])
    netns = settings["netns"]
    is_lab_namespace = callable(getattr(netns, "socket", None)) and isinstance(getattr(netns, "pid", None), int)
    if netns is not None and not is_lab_namespace:
        raise TypeError(f"netns must be a lab namespace (nbconn.lab.namespace(), or a link's client/server), "
                        f"got {validate.shown(netns)}")
    syscalls = settings["strace_syscalls"]
    if not isinstance(syscalls, str) or re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", syscalls) is None:
        raise ValueError(f"strace_syscalls={validate.shown(syscalls)} must be syscall names, comma-separated")
    return out


def _peer_copy(p) -> Server:
    """A fresh, checked Server: the caller's object (or a later change to it) cannot reach nginx.conf unchecked."""
    if isinstance(p, str):
        p = Server.parse(p)
    elif not isinstance(p, Server):
        raise TypeError(f"peer must be a str like '127.0.0.1:8080,weight=2' or a Server, got {validate.shown(p)}")
    peer = Server(p.address, weight=p.weight, max_fails=p.max_fails, fail_timeout=p.fail_timeout, backup=p.backup,
                down=p.down)
    config_value("peer address", peer.address, _PLAIN_ADDRESS)
    return peer


class Nginx:
    """A private nginx reverse proxy in front of ``peers`` (strings like the CLI's --peer, or Server objects).

    ``connect_timeout``: proxy_connect_timeout in seconds; ``next_upstream``: kinds for proxy_next_upstream
    (any of :data:`PROXY_NEXT_UPSTREAM_KINDS`; an empty tuple = off); ``tries`` and ``next_upstream_timeout``:
    proxy_next_upstream_tries / _timeout (0 = unlimited); ``read_timeout``: proxy_read_timeout in seconds;
    ``keepalive``: ``keepalive N`` in the upstream block, with ``proxy_http_version 1.1`` and an empty
    ``Connection`` header (without those two nginx closes every upstream connection anyway);
    ``proxy_bind``: an IP address without a port (``proxy_bind ADDR;`` -- nginx then sets
    IP_BIND_ADDRESS_NO_PORT itself); ``workers``: worker_processes; ``worker_connections``: the events block's
    worker_connections; ``zone``: ``zone backend 64k;`` (the upstream's peers and their failure counts shared
    by all workers; without it each worker keeps its own); ``strace``: run nginx under ``strace -f`` and keep
    the trace (of ``strace_syscalls``); ``netns``: a lab namespace (``nbconn.lab.namespace()``, or an impaired
    link's ``client`` / ``server``) to run nginx in -- its listener and its upstream connects are then made in
    there, meeting the lab's peers, sysctls, routes and link; :meth:`request` connects from inside too.  Leave
    nginx's ``with`` block before the namespace's (a process inside keeps a namespace alive).

    Every setting is checked when the object is made, before any file or process exists, and is read-only
    afterwards; :meth:`config` checks them again as it writes them.
    """

    def __init__(self, peers, *, connect_timeout: float = 0.2, next_upstream=("error", "timeout"), tries: int = 0,
                 next_upstream_timeout: float = 0.0, read_timeout: float = 5.0, strace: bool = False,
                 keepalive: int = 0, proxy_bind: str | None = None, workers: int = 1, worker_connections: int = 64,
                 zone: bool = False, netns=None,
                 strace_syscalls: str = "socket,ioctl,epoll_ctl,connect,epoll_wait,getsockopt,close") -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if isinstance(peers, (str, bytes)) or not hasattr(peers, "__iter__"):
            raise TypeError(f"peers must be a list of peers, got {validate.shown(peers)}")
        peers = list(peers)
        if not peers:
            raise ValueError("peers=[] : nginx's upstream block needs at least one server")
        checked = _checked(dict(
            peers=peers, connect_timeout=connect_timeout, next_upstream=next_upstream, tries=tries,
            next_upstream_timeout=next_upstream_timeout, read_timeout=read_timeout, keepalive=keepalive,
            proxy_bind=proxy_bind, workers=workers, worker_connections=worker_connections, zone=zone, strace=strace,
            strace_syscalls=strace_syscalls, netns=netns))
        for name in SETTINGS:
            object.__setattr__(self, name, checked[name])
        self.prefix = ""
        self.port = 0
        self.proc: subprocess.Popen | None = None  # the guard (nbconn.nginx.guard), nginx's parent
        self._child = 0  # the guard's child: nginx's master (or strace), and its process group
        self._buffer = b""
        self._fixed = True

    def __setattr__(self, name: str, value) -> None:
        if name in SETTINGS and getattr(self, "_fixed", False):
            raise AttributeError(f"Nginx.{name} is fixed when the object is made (it goes into nginx.conf): "
                                 f"make a new Nginx(..., {name}=...)")
        object.__setattr__(self, name, value)

    # -- configuration -------------------------------------------------------------
    def config(self) -> str:
        """The nginx.conf text.  Every value is checked again here, as it is written: by :func:`_checked` (type
        and range) and :func:`config_value` (addresses), whatever happened to the object since it was made."""
        s = _checked({name: getattr(self, name) for name in SETTINGS})
        servers = []
        for p in s["peers"]:
            address = config_value("peer address", p.address, _PLAIN_ADDRESS)
            line = f"server {address} weight={p.weight} max_fails={p.max_fails} fail_timeout={p.fail_timeout}s"
            line += " backup" if p.backup else ""
            line += " down" if p.down else ""
            servers.append(f"        {line};")
        nu = " ".join(s["next_upstream"]) or "off"
        worker = _worker_user()
        user = f"user {worker};\n" if worker else ""
        pre = config_value("nginx prefix (from TMPDIR)", self.prefix) if self.prefix else ""
        port = validate.integer("port", self.port, 0, 65535)
        upstream_extra = ""
        if s["zone"]:
            upstream_extra += "\n        zone backend 64k;"
        if s["keepalive"]:
            upstream_extra += f"\n        keepalive {s['keepalive']};"
        location_extra = ""
        if s["proxy_bind"]:
            location_extra += f"\n            proxy_bind {config_value('proxy_bind', s['proxy_bind'])};"
        if s["keepalive"]:
            location_extra += '\n            proxy_http_version 1.1;\n            proxy_set_header Connection "";'
        nut = _duration(s["next_upstream_timeout"]) if s["next_upstream_timeout"] else 0
        return f"""# written by nbconn.nginx.runner: a private instance, not the system service
{user}daemon off;
master_process on;
worker_processes {s['workers']};
pid {pre}/nginx.pid;
error_log {pre}/error.log info;
events {{
    worker_connections {s['worker_connections']};
    use epoll;
}}
http {{
    log_format nbconn '{LOG_FORMAT}';
    access_log {pre}/access.log nbconn;
    client_body_temp_path {pre}/tmp/body;
    proxy_temp_path {pre}/tmp/proxy;
    fastcgi_temp_path {pre}/tmp/fastcgi;
    uwsgi_temp_path {pre}/tmp/uwsgi;
    scgi_temp_path {pre}/tmp/scgi;
    upstream backend {{
{chr(10).join(servers)}{upstream_extra}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_connect_timeout {_duration(s['connect_timeout'])};
            proxy_next_upstream {nu};
            proxy_next_upstream_tries {s['tries']};
            proxy_next_upstream_timeout {nut};
            proxy_read_timeout {_duration(s['read_timeout'])};{location_extra}
        }}
    }}
}}
"""

    # -- lifetime -----------------------------------------------------------------
    # nginx is started by nbconn.nginx.guard, a small process of its own that kills nginx's process group and
    # removes the prefix when this process exits, however it exits (SIGKILL, SIGTERM, SIGHUP, a crash), when
    # this object's pipe to it is closed (stop(), or the object is garbage-collected), or when it is signalled.
    def start(self) -> "Nginx":
        if self.proc is not None:
            raise RuntimeError("this Nginx is running already: stop() it first, or make another")
        self._owner = os.getpid()
        self._buffer, self._child = b"", 0
        enter: dict = {}
        try:
            if self.netns is not None:
                enter = self._namespace_descriptors()
            # its own session: a terminal's SIGINT/SIGHUP to our process group does not end the guard first
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", _GUARD, str(os.getpid()),
                                          tempfile.gettempdir()],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                         pass_fds=_not_none(enter.get("netns_socket"), enter.get("userns")))
            # Dropped without stop(), this object closes the guard's pipe when it is collected: the guard then
            # ends nginx and removes the prefix.  (Popen keeps a running child's object, and so the pipe, alive.)
            weakref.finalize(self, _close_quietly, self.proc.stdin)
            self.prefix = self._expect("prefix", _GUARD_ANSWER_S)
            config_value("nginx prefix (from TMPDIR)", self.prefix)
            os.makedirs(os.path.join(self.prefix, "tmp"))
            if _worker_user():
                # The unprivileged worker must reach its temp paths (nginx's master creates and chowns them)
                # and reopen its logs; it needs to pass through the 0700 prefix, not list or write it.
                os.chmod(self.prefix, 0o711)
            for _ in range(3):  # the free port may be taken between the probe and nginx's bind: retry
                self.port = self._free_port()
                conf = os.path.join(self.prefix, "nginx.conf")
                with open(conf, "w") as f:
                    f.write(self.config())
                argv = [find_nginx(), "-p", self.prefix, "-c", conf, "-e", os.path.join(self.prefix, "startup.log")]
                if self.strace:
                    argv = [systools.find("strace") or "strace", "-f", "-qq", "-tt", "-o",
                            os.path.join(self.prefix, "strace.log"),
                            "-e", f"trace={self.strace_syscalls}", "-s", "40", *argv]
                self._send("run " + json.dumps(dict(enter, argv=argv)))
                self._child = int(self._expect("pid", _GUARD_ANSWER_S))
                if self._wait_ready(5.0):
                    return self
                self._kill()
            raise RuntimeError(f"nginx did not start: {self._startup_errors()}")
        except BaseException:
            self.stop()
            raise
        finally:
            for fd in (enter.get("netns_socket"), enter.get("userns")):
                if fd is not None:
                    os.close(fd)  # the guard has its own copies

    def _namespace_descriptors(self) -> dict:
        """What nginx's child needs to join ``netns`` (see nbconn.nginx.guard._enter_namespaces): a socket made
        in there, and -- when the lab made a user namespace (a normal user) -- that user namespace."""
        sock = self.netns.socket()
        enter = {"netns_socket": sock.detach(), "userns": None, "uid": os.getuid(), "gid": os.getgid()}
        try:
            userns = os.open(f"/proc/{self.netns.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(userns).st_ino == os.stat("/proc/self/ns/user").st_ino:
                os.close(userns)  # real root: the lab made a network namespace only
            else:
                enter["userns"] = userns
        except BaseException:
            os.close(enter["netns_socket"])
            raise
        return enter

    def _socket_to_nginx(self, timeout_s: float) -> socket.socket:
        """A TCP connection to nginx's listener: from inside the lab namespace when nginx runs in one."""
        if self.netns is None:
            return socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)
        sock = self.netns.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _free_port(self) -> int:
        """A port free on 127.0.0.1 where nginx will listen (inside the lab namespace when it runs in one)."""
        if self.netns is None:
            return _free_port()
        with self.netns.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # the guard's protocol: we send "run ARGV_JSON"; it answers "prefix PATH", "pid N", "exited STATUS", "error ..."
    def _send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _guard_line(self, timeout_s: float) -> str | None:
        """The guard's next line, or None if none came within ``timeout_s`` (0: only what has arrived)."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError(f"nginx's guard ended (exit status {self.proc.poll()}); "
                                   f"nginx is stopped and its prefix removed")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        word, _, rest = line.decode().partition(" ")
        if word == "exited":
            self._child = 0
        elif word == "error":
            raise RuntimeError(f"nginx's guard: {rest}")
        return line.decode()

    def _expect(self, word: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._guard_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"nginx's guard did not say {word!r} within {timeout_s:g} s")
            got, _, rest = line.partition(" ")
            if got == word:
                return rest

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while self._child and self._guard_line(0) is not None:
                pass  # take in what the guard said: "exited" means nginx did not start
            if not self._child:
                return False
            try:
                with self._socket_to_nginx(0.2):
                    pass
                # the probe connection itself is logged as a 400; start the logs clean
                time.sleep(0.05)
                for name in ("access.log", "error.log"):
                    open(os.path.join(self.prefix, name), "w").close()
                os.kill(self.master_pid, signal.SIGUSR1)  # reopen logs
                time.sleep(0.05)
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def _master_pid(self) -> int:
        with open(os.path.join(self.prefix, "nginx.pid")) as f:
            return int(f.read())

    @property
    def master_pid(self) -> int:
        """The nginx master's pid (its workers are its children); under strace it is strace's child."""
        if not self._child:
            raise RuntimeError("nginx is not running")
        return self._master_pid() if self.strace else self._child

    def _startup_errors(self) -> str:
        for name in ("startup.log", "error.log"):
            path = os.path.join(self.prefix, name)
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read()
                lines = [line.strip() for line in text.splitlines() if "[emerg]" in line or "[alert]" in line]
                if lines:
                    return lines[-1]
        return "no error logged"

    def _kill(self) -> None:
        """Stop nginx, keep the guard and the prefix: SIGQUIT to the master (a graceful stop, so its logs and
        strace's are complete), then SIGKILL to its process group if it has not gone within 5 s."""
        if not self._child or self.proc is None:
            return
        group = self._child
        try:
            os.kill(self.master_pid, signal.SIGQUIT)
        except (OSError, ValueError):  # no pid file yet (under strace): the whole group, now
            _killpg(group, signal.SIGKILL)
        for sig in (signal.SIGKILL, None):
            deadline = time.monotonic() + 5.0
            while self._child and time.monotonic() < deadline:
                self._guard_line(max(0.0, deadline - time.monotonic()))
            if not self._child or sig is None:
                break
            _killpg(group, sig)

    def stop(self) -> None:
        """Stop nginx and remove its prefix.  In a forked child of the owner it does nothing: the owner's nginx is
        the owner's (a child leaving a copied ``with`` block must not stop it)."""
        if getattr(self, "_owner", os.getpid()) != os.getpid():
            return
        proc, group = self.proc, self._child
        try:
            if proc is not None and proc.poll() is None:
                self._kill()
        except RuntimeError:
            pass  # the guard has gone: it removed everything on its way out
        finally:
            self.proc, self._child = None, 0
            if proc is not None and group and proc.poll() is not None and proc.returncode < 0:
                # the guard was killed from outside (SIGKILL): its PR_SET_PDEATHSIG took nginx's master, but
                # the workers, now orphans, still hold the group: end them here
                _killpg(group, signal.SIGKILL)
            if proc is not None:
                # end of file: the guard kills what is left of nginx's group, removes the prefix and exits
                for stream in (proc.stdin, proc.stdout):
                    try:
                        stream.close()
                    except OSError:
                        pass
                try:
                    proc.wait(timeout=_GUARD_ANSWER_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=_GUARD_ANSWER_S)
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
        with self._socket_to_nginx(timeout_s) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: nbconn\r\n\r\n".encode())
            data = b""
            while True:  # (not `while <condition>:` in a with, tests/test_interrupt_coverage.py says why)
                if len(data) >= 1 << 20:
                    break
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
    """Per request: the peers nginx tried and the peers nbconn.nginx.upstream tried, and whether they match."""
    rows = []
    for i, (entry, req) in enumerate(zip(nginx_entries, nbconn_requests), 1):
        # the model's $upstream_addr, split as the access log's is: a try that failed before connect() names no
        # peer there (a proxy_bind 500 logs an empty address), so no list of tried peers is rebuilt here
        ours = [a.strip() for a in req.upstream_addr.split(",")]
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
