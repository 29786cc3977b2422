"""The guard that ties a private nginx's life to the process that started it.

nginx runs as its own processes: a master (root, or the caller) and workers (nobody). Started straight from
Python, nothing tells them that Python has gone: a SIGKILLed Jupyter kernel left both running under PID 1,
answering 502 on 127.0.0.1, and its temporary prefix on disk (issue 24 item 1).  So :class:`nbconn.nginx.runner.Nginx`
does not start nginx itself.  It starts this guard -- ``python -I -S guard.py OWNER_PID TMPDIR`` (a fresh
interpreter, no site-packages, this file only: it imports nothing from nbconn and nothing outside the standard
library) -- and the guard

1. takes a pidfd of its owner (``pidfd_open``: readable once the owner *process* has exited, every thread of it;
   PR_SET_PDEATHSIG would fire when the *thread* that started the guard ends, which in a Jupyter kernel or a
   thread pool is any time) and checks the owner is still its parent (it may have died before the pidfd existed);
2. becomes a child subreaper, so that nginx's workers, orphaned when their master is killed, are reparented to
   it and reaped here rather than left to a PID 1 that may never reap;
3. makes the temporary prefix itself and says where (``prefix PATH``): from that moment what exists is the
   guard's to remove, with no gap in which the owner could die holding a directory nobody would remove;
4. runs nginx on request (``run {"argv": [...]}`` -> ``pid N``, or ``error ...`` for a failure before execv;
   nginx in a process group of its own, with PR_SET_PDEATHSIG to SIGKILL -- the guard has one thread, so here
   that means the guard's death; optionally inside a lab namespace, see :func:`_enter_namespaces`) and says
   when it exits (``exited STATUS``); the owner may ask again (another port);
5. ends -- SIGKILL to nginx's whole process group (master, workers, strace), reap, remove the prefix, exit --
   when the owner's process has exited (the pidfd), when its commands reach end of file (the owner closed them:
   ``stop()``, or it died and no forked child of it holds the pipe -- a forked child cannot keep nginx alive,
   because the pidfd follows the owner's process, not the pipe), or on SIGTERM, SIGHUP or SIGINT.

The owner stops nginx politely itself (SIGQUIT to the master, so strace and the logs are complete) and then
closes the pipe; the guard's SIGKILL is for whatever is left, and for every way the owner can die.
Every wait here is on a descriptor (select), not a timer; the reaping after SIGKILL is bounded in time.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_REAP_S = 2.0  # how long to wait for SIGKILLed processes to become reapable

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGSKNS = 0x894C  # <linux/sockios.h>: a descriptor of the network namespace a socket belongs to

_libc = ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces(spec: dict) -> None:
    """In nginx's child, before execv: join the lab's network namespace (and, for a normal user, its user
    namespace), so that nginx's sockets -- its listener and every upstream connect -- are made in there.

    ``netns_socket``: a socket the lab made inside that namespace; SIOCGSKNS turns it into a namespace
    descriptor (a socket belongs to its namespace for life, so this names the namespace exactly, where
    /proc/HELPER/ns/net shows whichever side the helper last entered).  ``userns``: a descriptor of the lab's
    user namespace, or None when it is ours (real root).  Joining it first gives us the capabilities over the
    network namespace that SIOCGSKNS and setns() ask for.  nginx must not run as uid 0 in there: its workers
    would switch to a user the namespace does not map (or call initgroups(), which it forbids), so a nested
    user namespace maps the caller's own uid and gid -- nginx runs as the caller, as it does outside.
    setns() into a user namespace needs a single-threaded process: this child of the guard is one."""
    if spec.get("userns") is not None:
        _call(_libc.setns(spec["userns"], _CLONE_NEWUSER), "setns(the lab's user namespace)")
    netns = fcntl.ioctl(spec["netns_socket"], _SIOCGSKNS)
    _call(_libc.setns(netns, _CLONE_NEWNET), "setns(the lab's network namespace)")
    os.close(netns)
    if spec.get("userns") is not None:
        _call(_libc.unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        _write("/proc/self/setgroups", "deny")  # needed before gid_map may be written without CAP_SETGID
        _write("/proc/self/uid_map", f"{int(spec['uid'])} 0 1")
        _write("/proc/self/gid_map", f"{int(spec['gid'])} 0 1")
        os.close(spec["userns"])
    os.close(spec["netns_socket"])


class Guard:
    """One guard, one prefix, at most one nginx at a time; :meth:`main` runs until the owner is gone."""

    def __init__(self, owner: int, tmpdir: str) -> None:
        self.owner = owner
        self.tmpdir = tmpdir
        self.prefix = ""
        self.child = 0  # nginx's pid (or strace's), also its process group
        self.child_fd = -1

    # -- the end: every path comes here ------------------------------------------------------------------
    def finish(self, code: int = 0) -> None:
        """SIGKILL nginx's process group, reap it and every orphaned worker, remove the prefix, exit."""
        if self.child:
            try:
                os.killpg(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is gone already
        self._reap_all()
        if self.prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)
        os._exit(code)

    def _reap_all(self) -> None:
        # As subreaper every process of the group is (or becomes) our child: wait until none is left.
        deadline = time.monotonic() + _REAP_S
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no children left
            if pid == 0:
                time.sleep(0.01)

    # -- running nginx ------------------------------------------------------------------------------------
    def run(self, spec: dict) -> None:
        """Fork nginx (``spec["argv"]``), inside the lab's namespaces if ``spec`` names them; say its pid, or why
        it could not be started (an error before execv travels back on a close-on-exec pipe, as in subprocess)."""
        if self.child:
            self._say("error nginx is already running")
            return
        errors_r, errors_w = os.pipe()  # close-on-exec: end of file at execv, an error text before it
        pid = os.fork()
        if pid == 0:  # the child: nginx to be
            try:
                os.close(errors_r)
                os.setpgid(0, 0)  # a group of its own: one killpg reaches master, workers and strace
                # The guard has one thread, so "the parent thread died" means the guard died (even SIGKILL).
                _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != self.guard_pid:
                    os._exit(1)  # the guard died before the prctl: do not start an orphan
                if spec.get("netns_socket") is not None:
                    _enter_namespaces(spec)
                # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across execv (subprocess
                # restores both for its children too)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(sig, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.execv(spec["argv"][0], spec["argv"])
            except BaseException as e:
                try:
                    os.write(errors_w, f"{type(e).__name__}: {e}".encode()[:1000])
                finally:
                    os._exit(127)
            finally:
                os._exit(127)
        os.close(errors_w)
        self.child = pid
        try:
            os.setpgid(pid, pid)  # also here: whichever runs first, the group exists before anyone signals it
        except OSError:
            pass  # the child has exec'd already (EACCES) or exited (ESRCH): it set its own group
        with os.fdopen(errors_r, "rb") as errors:
            error = errors.read(1000)  # returns at the child's execv (close-on-exec) or its exit
        if error:
            os.waitpid(pid, 0)
            self.child = 0
            self._say(f"error nginx could not be started: {error.decode(errors='replace')}")
            return
        self.child_fd = os.pidfd_open(pid)
        self._say(f"pid {pid}")

    def child_exited(self) -> None:
        _, status = os.waitpid(self.child, 0)
        os.close(self.child_fd)
        try:
            os.killpg(self.child, signal.SIGKILL)  # workers left behind by a master that died
        except ProcessLookupError:
            pass
        self._reap_all()
        self.child, self.child_fd = 0, -1
        self._say(f"exited {os.waitstatus_to_exitcode(status)}")

    def _say(self, line: str) -> None:
        try:
            os.write(1, (line + "\n").encode())
        except BrokenPipeError:
            self.finish()  # nobody is listening: the owner is gone

    # -- the loop -----------------------------------------------------------------------------------------
    def main(self) -> None:
        self.guard_pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, lambda *_: self.finish(0))
        try:
            owner_fd = os.pidfd_open(self.owner)
        except ProcessLookupError:
            self.finish(1)
        except OSError as e:  # ENOSYS: a kernel before 5.3
            self._say(f"error pidfd_open() failed ({e.strerror}): tying nginx to its owner needs Linux 5.3 or later")
            self.finish(1)
        if os.getppid() != self.owner:
            self.finish(1)  # the owner died before the pidfd was taken: we were reparented already
        if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            self._say(f"error PR_SET_CHILD_SUBREAPER: {os.strerror(err)}")
            self.finish(1)
        self.prefix = tempfile.mkdtemp(prefix="nbconn-nginx-", dir=self.tmpdir)
        self._say(f"prefix {self.prefix}")
        pending = b""
        while True:
            fds = [owner_fd, 0] + ([self.child_fd] if self.child else [])
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
            if owner_fd in ready:
                self.finish(0)  # the owner's process has exited, however it died
            if self.child and self.child_fd in ready:
                self.child_exited()
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    self.finish(0)  # end of file: stop() closed the pipe, or the owner died
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self.command(line.decode())
                if len(pending) > 1 << 20:
                    self.finish(1)  # not the owner's protocol

    def command(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "run":
            spec = json.loads(rest)
            argv = spec.get("argv") if isinstance(spec, dict) else None
            if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
                self._say("error run needs {\"argv\": [strings]}")
                return
            self.run(spec)
        else:
            self._say(f"error unknown command {word[:20]!r}")


if __name__ == "__main__":
    guard = Guard(int(sys.argv[1]), sys.argv[2])
    try:
        guard.main()
    except BaseException as e:  # a bug here must still not leave nginx or the prefix behind
        os.write(2, f"nbconn nginx guard: {type(e).__name__}: {e}\n".encode())
        guard.finish(1)
