"""The parent's handle on the lab's helper process (:mod:`nbconn.lab.child`): start it, ask it, stop it, reap it.

One helper serves one :func:`nbconn.lab.namespace` or one :func:`nbconn.lab.impaired`
link.  It is started as ``python -I -S child.py FD CONFIG`` in a session of its own
(Ctrl-C in a terminal reaches only us; we decide when it stops).  Requests are JSON on
a SOCK_SEQPACKET socketpair; a socket comes back as a descriptor (``SCM_RIGHTS``).

Lifetime: the helper exits when its control socket reaches end of file -- when
:meth:`LabProcess.stop` closes it, or when this process dies in any way (SIGKILL,
SIGTERM, a crash): the kernel closes our descriptors for us.  Its namespaces have no
name anywhere, so they vanish with it and with the last socket made in them; there
is no stale state for a later run to find and clean.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_START_S = 10.0  # the helper's interpreter start and namespace setup, on a loaded machine
_REPLY_S = 10.0
_STOP_S = 5.0
MAX_BATCH = 64  # descriptors per SCM_RIGHTS message


def ip_binary() -> str | None:
    """iproute2's ip by absolute path (never looked up through PATH when we are root)."""
    for candidate in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None if os.geteuid() == 0 else shutil.which("ip")


def needs_userns() -> bool:
    """Real root (CAP_SYS_ADMIN here) unshares a network namespace alone; anyone else adds a user namespace."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return not int(line.split()[1], 16) & (1 << 21)
    except OSError:
        pass
    return True


@contextlib.contextmanager
def deferred_ctrl_c():
    """Within the block a Ctrl-C (SIGINT) is held and raised right after it, as the handler in force would.

    Only the main thread receives KeyboardInterrupt, and only it may change signal handlers: elsewhere
    this does nothing (nothing to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, pending[0])
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


class LabProcess:
    """The parent's handle on one helper process (:mod:`nbconn.lab.child`): start, ask, stop, reap.

    Requests are JSON on a SOCK_SEQPACKET socketpair, each with an id the reply
    echoes: a reply left over by an interrupted request (Ctrl-C between send and
    receive) is recognised and discarded, its descriptor closed.
    """

    def __init__(self, config: dict, extra_fds: tuple = ()) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopped = False
        self.stderr = ""
        self.info: dict = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        config = dict(config, userns=needs_userns(), ip=ip_binary())
        self.userns = config["userns"]
        started = time.perf_counter()
        try:
            # A Ctrl-C inside Popen() (after the fork, before it returns) would lose the only handle on a
            # running helper: hold it until self._process is set, so stop() can always reap what was started.
            with deferred_ctrl_c():
                self._process = subprocess.Popen(
                    [sys.executable, "-I", "-S", _CHILD, str(theirs.fileno()), json.dumps(config)],
                    pass_fds=(theirs.fileno(), *extra_fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # Ctrl-C in a terminal reaches only us; we decide when it stops
                )
        except BaseException:
            theirs.close()
            if getattr(self, "_process", None) is None:
                ours.close()
                raise
            self.stop()
            raise
        theirs.close()
        try:
            ready = self._receive(_START_S)
            if ready is None or not ready.get("ready"):
                self.stop()  # reaps it and collects its stderr for the message
                detail = (ready or {}).get("error") or self.stderr or "no message"
                raise OSError((ready or {}).get("errno") or errno.EIO, f"the lab helper could not start: {detail}")
        except BaseException:
            self.stop()
            raise
        self.info = ready
        self.pid: int = ready["pid"]
        self.setup_s = time.perf_counter() - started

    def _receive(self, timeout: float, want_fd: bool = False):
        """One message (dict) and, with ``want_fd``, the descriptors it carries; None on timeout or EOF."""
        if not select.select([self._control], [], [], timeout)[0]:
            return None
        if want_fd:
            data, fds, flags, _ = socket.recv_fds(self._control, 1 << 16, MAX_BATCH, socket.MSG_CMSG_CLOEXEC)
        else:
            data, fds, flags = self._control.recv(1 << 16), [], 0
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        message = json.loads(data)
        if fds:
            message["_fd"] = fds
        elif flags & socket.MSG_CTRUNC:
            message["_truncated"] = True  # the kernel could not install the descriptor here (EMFILE)
        return message

    def request(self, op: str, want_fd: bool = False, **fields):
        """Send one request and return its reply; OSError with the helper's errno on failure."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the lab namespace has been closed")
            ident = next(self._ids)
            self._control.send(json.dumps({"op": op, "id": ident, **fields}).encode())
            deadline = time.monotonic() + _REPLY_S
            while True:
                reply = self._receive(max(0.0, deadline - time.monotonic()), want_fd=True)
                if reply is None:
                    raise OSError(errno.EPIPE, "the lab helper did not answer (it has exited?)")
                fds = reply.pop("_fd", [])
                if reply.get("id") == ident:
                    break
                for fd in fds:
                    os.close(fd)  # the answer to a request someone stopped waiting for
        if "errno" in reply or not want_fd:
            for fd in fds:
                os.close(fd)
            if "errno" in reply:
                raise OSError(reply["errno"], reply.get("error") or os.strerror(reply["errno"]))
            return reply
        if not fds:
            raise OSError(errno.EMFILE, "no descriptor arrived over SCM_RIGHTS (this process is out of fds?)")
        reply["fds"] = fds
        return reply

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def _collect_stderr(self, process) -> None:
        """What the helper wrote on stderr, without waiting for end of file: a forwarder it forked may still
        hold the pipe for a moment, and communicate() would wait for it."""
        pipe = process.stderr
        if pipe is None or pipe.closed:
            return
        chunks = []
        with contextlib.suppress(OSError):
            os.set_blocking(pipe.fileno(), False)
            for _ in range(16):
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        pipe.close()
        text = b"".join(chunks).decode(errors="replace").strip()
        if text:
            self.stderr = text

    def stop(self) -> None:
        """Close the control socket (the helper exits on end of file), then reap it. Idempotent.

        ``_stopped`` means "no more requests"; the reap below finishes even when a
        second Ctrl-C arrives while we wait, so no zombie and no descriptor stays.
        """
        with contextlib.suppress(OSError):
            self._control.close()
        self._stopped = True
        process = getattr(self, "_process", None)
        if process is None:
            return
        interrupted: BaseException | None = None
        try:
            if process.returncode is None:
                try:
                    process.wait(timeout=_STOP_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        except BaseException as exc:  # Ctrl-C (or SIGTERM made an exception) while waiting: still reap
            interrupted = exc
            with contextlib.suppress(OSError):
                process.kill()
            for _ in range(100):
                try:
                    process.wait()
                    break
                except BaseException:  # noqa: BLE001 - a third Ctrl-C: keep reaping, bounded
                    continue
        finally:
            self._collect_stderr(process)
        if interrupted is not None:
            raise interrupted
