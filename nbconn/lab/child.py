"""The lab's helper process: it lives inside the lab's network namespaces and makes sockets there.

Started by :mod:`nbconn.lab.namespace` as ``python -I -S child.py CONTROL_FD CONFIG_JSON``
(a fresh interpreter, no site-packages, this file only: it imports nothing from
nbconn and nothing outside the standard library).  It

1. unshares a new network namespace -- as a normal user together with a new user
   namespace in which it is uid 0 ("root inside": full capabilities over the
   namespaces it owns, none anywhere else; ``unshare -Urn`` does the same), as
   real root a network namespace alone;
2. brings ``lo`` up, writes the per-namespace sysctls it was given, adds routes;
3. for the impairment wire, unshares a second network namespace (the server side),
   creates one TUN device in each namespace, gives them point-to-point addresses,
   adds the routes that name those devices (the server namespace as a router),
   and forks the forwarder (:mod:`nbconn.lab.wire.forwarder`), which drops every
   capability before it touches a packet;
4. answers requests on its control socket (``SOCK_SEQPACKET``, one JSON message per
   request): ``socket`` makes a socket in the named namespace and passes its
   descriptor back with ``SCM_RIGHTS`` (a socket belongs to the namespace it was
   created in for its whole life, whoever holds it); ``sysctl_get``/``sysctl_set``;
   ``netstat`` (the namespace's TCP counters); ``health``; end of file means stop.
   Before answering it looks at its forwarder (``waitpid(WNOHANG | WUNTRACED)``): a
   forwarder that died or was stopped is reported instead of an answer (``fault``),
   from then on, because the wire no longer carries packets the way it says.

The namespaces have no name in the file system.  When the notebook's process dies,
however it dies, the control socket reaches end of file and this process exits; a
forked child of the notebook could still hold that socket, so this process also exits
when its parent changes (checked every ``_PARENT_CHECK_S``).  The kernel frees a
namespace when its last reference goes: this process, the forwarder, and every socket
made in it (whoever holds that socket now).  Nothing is left behind to clean up later.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_SIOCSIFADDR, _SIOCSIFDSTADDR, _SIOCSIFNETMASK = 0x8916, 0x8918, 0x891C
_IFF_UP = 0x1
_TUNSETIFF = 0x400454CA  # <linux/if_tun.h>
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_FORWARDER_STOP_S = 0.5  # it exits within microseconds of its control socket's end of file; then SIGKILL
_PARENT_CHECK_S = 0.2  # how often a quiet helper checks that its parent is still the one that started it
_IP_TIMEOUT_S = 10.0
_MAX_BATCH = 64  # descriptors per SCM_RIGHTS message (the kernel allows 253)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
    else:
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
    else:
        _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNET)), "setns")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _become_root_inside(uid: int, gid: int) -> None:
    """Map our own uid/gid to 0 in the new user namespace (the one mapping an unprivileged process may write)."""
    _write("/proc/self/setgroups", "deny")  # required before gid_map may be written without CAP_SETGID outside
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s24s", name.encode(), payload)


def _link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, _ifreq(name))
        flags = struct.unpack_from("H", got, 16)[0]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | _IFF_UP)))


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("HH4s", socket.AF_INET, 0, socket.inet_aton(address))


def _point_to_point(name: str, local: str, peer: str) -> None:
    """What ``ip addr add LOCAL/32 peer PEER/32 dev NAME`` does, with three ioctls (no iproute2 needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCSIFADDR, _ifreq(name, _sockaddr_in(local)))
        fcntl.ioctl(s.fileno(), _SIOCSIFNETMASK, _ifreq(name, _sockaddr_in("255.255.255.255")))
        fcntl.ioctl(s.fileno(), _SIOCSIFDSTADDR, _ifreq(name, _sockaddr_in(peer)))
    _link_up(name)  # up: the kernel adds the /32 route to the peer (fib_add_ifaddr)


def _create_tun(name: str) -> int:
    """A TUN device in the calling thread's namespace (decided when /dev/net/tun is opened)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def sysctl_get(name: str) -> str:
    with open(_sysctl_path(name)) as f:
        return f.read().strip()


def sysctl_set(name: str, value: str) -> None:
    _write(_sysctl_path(name), str(value))


def _pairs(path: str, prefixes: tuple) -> dict:
    """Counters from /proc/net/netstat or /proc/net/snmp: a header line of names, then a line of values."""
    out: dict = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        prefix, _, names = names.partition(":")
        if prefix in prefixes:
            out[prefix] = dict(zip(names.split(), (int(v) for v in values.split(":", 1)[1].split())))
    return out


def netstat() -> dict:
    """TcpExt (/proc/net/netstat) and Tcp (/proc/net/snmp) of the calling thread's namespace."""
    found = _pairs("/proc/thread-self/net/netstat", ("TcpExt",))
    found.update(_pairs("/proc/thread-self/net/snmp", ("Tcp",)))
    return found


class Helper:
    """The namespaces this process made, and the answers to the parent's requests."""

    def __init__(self, control: socket.socket, config: dict) -> None:
        self.control = control
        self.config = config
        self.ns_fds: dict = {}
        self.current = None
        self.forwarder_pid = 0
        self.fault: str | None = None  # what went wrong with the forwarder (sticky)
        self.parent = int(config.get("parent") or os.getppid())
        self.orphaned = False

    # -- building -------------------------------------------------------------------
    def build(self) -> dict:
        cfg = self.config
        if cfg["userns"]:
            uid, gid = os.getuid(), os.getgid()
            unshare(CLONE_NEWUSER | CLONE_NEWNET)
            _become_root_inside(uid, gid)
        else:
            unshare(CLONE_NEWNET)
        self._setup_side("client", cfg)
        tuns = []
        if cfg.get("wire"):
            wire = cfg["wire"]
            tuns.append(_create_tun(wire["client_ifname"]))
            _point_to_point(wire["client_ifname"], wire["client_addr"], wire["server_addr"])
            unshare(CLONE_NEWNET)  # the server side: a second namespace, owned by the same user namespace
            self._setup_side("server", wire["server"])
            tuns.append(_create_tun(wire["server_ifname"]))
            _point_to_point(wire["server_ifname"], wire["server_addr"], wire["client_addr"])
            # Routes that name the devices: only now that both exist (the server namespace acting as a router).
            self._add_routes(wire.get("server_routes", []))
            self.enter("client")
            self._add_routes(wire.get("client_routes", []))
            self.forwarder_pid = self._fork_forwarder(tuns, wire)
        return {"pid": os.getpid(), "forwarder_pid": self.forwarder_pid,
                "ns_inodes": {side: os.fstat(fd).st_ino for side, fd in self.ns_fds.items()}}

    def _setup_side(self, side: str, cfg: dict) -> None:
        self.ns_fds[side] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.current = side
        _link_up("lo")
        for name, value in cfg.get("sysctls", {}).items():
            sysctl_set(name, value)
        self._add_routes(cfg.get("routes", []))

    def _add_routes(self, routes: list) -> None:
        """``ip route add`` each one in the current namespace."""
        for route in routes:
            self._ip(["route", "add", *route.split()])

    def _ip(self, args: list) -> None:
        binary = self.config.get("ip")
        if not binary:
            raise RuntimeError("routes need iproute2's ip, which is not installed")
        # Run as uid 0 of our user namespace: execve keeps the capabilities there.
        done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")

    def _fork_forwarder(self, tuns: list, wire: dict) -> int:
        forwarder = _load_forwarder(wire["forwarder_path"])
        fwd_control = socket.socket(fileno=int(wire["control_fd"]))
        pid = os.fork()
        if pid == 0:  # the forwarder: holds two TUN fds and its control socket, nothing else
            code = 0
            try:
                self.control.close()
                for fd in self.ns_fds.values():
                    os.close(fd)
                forwarder.run_child(tuns[0], tuns[1], fwd_control, wire["params"], parent=os.getppid())
            except BaseException as exc:  # a message on stderr, then out without running our atexit/finally code
                print(f"nbconn forwarder: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        fwd_control.close()
        for fd in tuns:
            os.close(fd)  # the forwarder holds them now
        return pid

    # -- serving ---------------------------------------------------------------------
    def enter(self, side: str) -> None:
        if self.current != side:
            setns(self.ns_fds[side])
            self.current = side

    def forwarder_fault(self) -> str | None:
        """Why the wire no longer works (its forwarder died or is stopped), or None; reaps a dead forwarder."""
        if self.forwarder_pid and self.fault is None:
            pid = self.forwarder_pid
            try:
                done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                done, status = pid, 0
            if done and os.WIFSTOPPED(status):
                self.fault = (f"the lab's forwarder (pid {pid}) is stopped by {_signame(os.WSTOPSIG(status))}: "
                              "no packet crosses the wire")
            elif done:
                self.forwarder_pid = 0  # reaped
                how = (f"was killed by {_signame(os.WTERMSIG(status))}" if os.WIFSIGNALED(status)
                       else f"exited with status {os.waitstatus_to_exitcode(status)}")
                self.fault = f"the lab's forwarder (pid {pid}) {how}: no packet crosses the wire"
        return self.fault

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent

    def serve(self) -> None:
        while True:
            try:
                if not select.select([self.control], [], [], _PARENT_CHECK_S)[0]:
                    if not self.parent_alive():
                        self.orphaned = True
                        return  # our owner died; a forked child of it may still hold the control socket
                    continue
                message = self.control.recv(4096)
            except InterruptedError:
                continue
            if not message:
                return  # end of file: the parent is done (or gone)
            request = None
            try:
                request = json.loads(message)
                fault = self.forwarder_fault()
                if fault is not None:
                    reply, fd = {"fault": fault}, None
                else:
                    reply, fd = self.answer(request)
            except OSError as exc:
                reply, fd = {"errno": exc.errno or errno.EIO, "error": str(exc)}, None
            except Exception as exc:  # a bad request: say so, keep serving
                reply, fd = {"errno": errno.EINVAL, "error": repr(exc)}, None
            reply["id"] = request.get("id") if isinstance(request, dict) else None
            data = json.dumps(reply).encode()
            fds = [] if fd is None else fd if isinstance(fd, list) else [fd]
            try:
                if fds:
                    socket.send_fds(self.control, [data], fds)
                else:
                    self.control.send(data)
            except OSError:
                return
            finally:
                for one in fds:
                    os.close(one)  # the parent has its own copy now (or nobody needs one)

    def answer(self, request: dict):
        op = request["op"]
        side = request.get("ns", "client")
        if side not in self.ns_fds:
            raise ValueError(f"no namespace {side!r}")
        self.enter(side)
        if op == "socket":
            made = []
            for _ in range(max(1, min(int(request.get("count", 1)), _MAX_BATCH))):
                try:
                    made.append(socket.socket(request["family"], request["type"], request.get("proto", 0)).detach())
                except OSError:
                    if not made:
                        raise
                    break  # send what was made; the next request reports the error
            return {"ok": True, "count": len(made)}, made
        if op == "sysctl_get":
            return {"value": sysctl_get(request["name"])}, None
        if op == "sysctl_set":
            sysctl_set(request["name"], request["value"])
            return {"value": sysctl_get(request["name"])}, None
        if op == "netstat":
            return {"counters": netstat()}, None
        if op == "health":
            return {"ok": True}, None
        raise ValueError(f"unknown request {op!r}")

    def stop_forwarder(self) -> None:
        if not self.forwarder_pid:
            return
        pid, self.forwarder_pid = self.forwarder_pid, 0
        # It stops by itself when the parent closes its control socket; give it a moment, then insist.
        # An orphaned helper does not wait (whoever still holds that socket is not the lab's owner), nor does
        # one whose forwarder is stopped (it cannot read the end of file).
        for _ in range(0 if self.orphaned or self.fault else int(_FORWARDER_STOP_S / 0.01)):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            select.select([], [], [], 0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _load_forwarder(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nbconn_forwarder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(want_tun: bool) -> dict:
    """What the helper's build would do first, tried once: unshare (+ map uid 0), lo up, a TUN device."""
    stage = "unshare"
    try:
        if os.getuid() != 0 or not _has_cap_sys_admin():
            uid, gid = os.getuid(), os.getgid()
            unshare(CLONE_NEWUSER | CLONE_NEWNET)
            stage = "uid_map"
            _become_root_inside(uid, gid)
        else:
            unshare(CLONE_NEWNET)
        stage = "lo"
        _link_up("lo")
        if want_tun:
            stage = "tun"
            os.close(_create_tun("nbprobe0"))
    except OSError as exc:
        return {"ok": False, "stage": stage, "errno": exc.errno, "error": str(exc)}
    return {"ok": True}


def _has_cap_sys_admin() -> bool:
    with open("/proc/self/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 21))
    return False


def main(argv: list) -> int:
    if argv[:1] == ["probe"]:
        print(json.dumps(probe(argv[1:2] == ["tun"])))
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    control = socket.socket(fileno=int(argv[0]))
    config = json.loads(argv[1])
    helper = Helper(control, config)
    if not helper.parent_alive():
        return 1  # our owner died before we started: build nothing
    try:
        info = helper.build()
    except BaseException as exc:
        # One line for the parent: errno (if any) and text; then exit, taking the namespaces with us.
        err = exc.errno if isinstance(exc, OSError) else None
        with _suppress():
            control.send(json.dumps({"ready": False, "errno": err, "error": str(exc) or repr(exc),
                                     "stage": type(exc).__name__}).encode())
        helper.stop_forwarder()
        return 1
    try:
        control.send(json.dumps({"ready": True, **info}).encode())
        helper.serve()
    except OSError:
        pass  # the parent went away while we were building: nothing to serve
    finally:
        helper.stop_forwarder()
    return 0


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
