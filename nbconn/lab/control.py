"""The parent's handle on the lab's helper process (:mod:`nbconn.lab.child`): start it, ask it, stop it, reap it.

One helper serves one :func:`nbconn.lab.namespace` or one :func:`nbconn.lab.impaired`
link.  It is started as ``python -I -S child.py FD CONFIG`` in a session of its own
(Ctrl-C in a terminal reaches only us; we decide when it stops).  Requests are JSON on
a SOCK_SEQPACKET socketpair; a socket comes back as a descriptor (``SCM_RIGHTS``).

Lifetime: the helper exits when its control socket reaches end of file -- when
:meth:`LabProcess.stop` closes it, or when this process dies in any way (SIGKILL,
SIGTERM, a crash): the kernel closes our descriptors for us.  A child this process
forks would inherit that socket and keep the helper alive after us, so every forked
child closes its copies at once (``os.register_at_fork``), and the helper also exits
when its parent changes (a fork made outside Python's handlers).  The namespaces have
no name anywhere: the kernel frees one when the last thing referring to it goes --
the helper, its forwarder, *and every socket made in it* (a socket holds its
namespace, ``sock_net()``), so a socket the caller keeps also keeps its namespace,
``lo`` and sysctls working after the helper is gone.  There is no stale state for a
later run to find and clean.

Failures: a helper (or forwarder) that died or was stopped makes every later answer
wrong, so it is an error at once, naming the process (:class:`LabHelperError`): each
request waits in short slices and looks at the helper between them, each socket
handed out looks for a hung-up control socket first, and the helper reports its
forwarder's death or stop with the next request.
"""

from __future__ import annotations

import _signal
import array
import contextlib
import errno
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_START_S = 10.0  # the helper's interpreter start and namespace setup, on a loaded machine
_REPLY_S = 10.0
_STOP_S = 5.0
_SLICE_S = 0.05  # a wait for the helper looks at its state this often: a stopped helper is an error, not a wait
_GONE_S = 1.0  # a helper that hung up is reaped within this (its exit status names how it died)
MAX_BATCH = 64  # descriptors per SCM_RIGHTS message
_ANCILLARY = socket.CMSG_SPACE(MAX_BATCH * 4)  # room for MAX_BATCH descriptors (C ints)


class LabHelperError(RuntimeError):
    """The lab's helper or its forwarder died or is stopped: nothing the lab gives from now on can be trusted.

    A RuntimeError, not an OSError, on purpose: step 1 of a connect records an OSError as that
    connect's result ("socket() failed"), which turned a dead lab into "error 2612" with exit 0.
    A dead lab ends the whole run instead, and the message names the process."""


def ip_binary() -> str | None:
    """iproute2's ip, by absolute path (as root never through PATH: :mod:`nbconn.systools`)."""
    from ..systools import find

    return find("ip")


def needs_userns() -> bool:
    """Real root (CAP_SYS_ADMIN here) unshares a network namespace alone; anyone else adds a user namespace."""
    try:
        with open("/proc/self/status") as status:
            lines = status.read().splitlines()
    except OSError:
        return True
    for line in lines:
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << 21)
    return True


class deferred_ctrl_c:
    """``with deferred_ctrl_c():`` a Ctrl-C (SIGINT) within the block is held and raised right after it, as the
    handler in force would.

    Only the main thread receives KeyboardInterrupt, and only it may change signal handlers: elsewhere
    this does nothing (nothing to hold).  It runs for every socket handed out, so it calls ``_signal``
    directly: ``signal.signal()`` wraps each call in enum conversions that cost ~10 us."""

    __slots__ = ("_active", "_pending", "_previous")

    def __enter__(self) -> "deferred_ctrl_c":
        # (A handler installed from C reads as None and could not be put back: then there is nothing to hold.)
        self._active = (threading.current_thread() is threading.main_thread()
                        and _signal.getsignal(_signal.SIGINT) is not None)
        if self._active:
            self._pending: list = []
            self._previous = _signal.signal(_signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self._pending.append(frame)

    def __exit__(self, *exc) -> bool:
        if self._active:
            previous = self._previous
            _signal.signal(_signal.SIGINT, previous)
            if self._pending:
                if callable(previous):
                    previous(_signal.SIGINT, self._pending[0])
                elif previous == _signal.SIG_DFL:
                    os.kill(os.getpid(), _signal.SIGINT)
        return False


def _ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _proc_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat ("" if it is gone): T or t means stopped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


_live: weakref.WeakSet = weakref.WeakSet()  # every LabProcess not yet stopped, for the fork handler


def _passed_descriptors(ancillary) -> list[int]:
    """The descriptors SCM_RIGHTS messages carried.  (A loop called inside a with rather than written in
    it: tests/test_interrupt_coverage.py says why.)"""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
    return fds


def _after_fork_in_child() -> None:
    # A forked child (multiprocessing's fork mode, a daemonising library) inherits our control sockets; if it
    # kept them, the helper would live as long as the child instead of as long as its owner (issue 24.7).
    for process in list(_live):
        process._forked_away()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LabProcess:
    """The parent's handle on one helper process (:mod:`nbconn.lab.child`): start, ask, stop, reap.

    Requests are JSON on a SOCK_SEQPACKET socketpair, each with an id the reply
    echoes: a reply left over by an interrupted request (Ctrl-C between send and
    receive) is recognised and discarded, its descriptor closed.  Descriptors are ours
    from the moment recvmsg() returns them (``_arrived``) until handed to the caller.

    ``companions``: ``{socket: label}``, our ends of other lab processes' control
    sockets (the forwarder's); closed with ours -- before waiting for the helper, so
    it never waits for a forwarder that waits for us -- and watched for a hang-up.
    """

    def __init__(self, config: dict, extra_fds: tuple = (), companions: dict | None = None) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopped = False
        self._fault: str | None = None
        self._owner = os.getpid()
        self._arrived: list[int] = []
        self.companions: dict = dict(companions or {})
        self.stderr = ""
        self.info: dict = {}
        self.pid = 0
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        _live.add(self)
        config = dict(config, userns=needs_userns(), ip=ip_binary(), parent=os.getpid())
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
                self._close_sockets()
                raise
            self.stop()
            raise
        theirs.close()
        self.pid = self._process.pid  # the helper is the interpreter Popen started (no shell in between)
        try:
            try:
                ready = self._receive(time.monotonic() + _START_S, "start")
            except LabHelperError:
                ready = None
            if ready is None or not ready.get("ready"):
                self.stop()  # reaps it and collects its stderr for the message
                detail = (ready or {}).get("error") or self.stderr or "no message"
                raise OSError((ready or {}).get("errno") or errno.EIO, f"the lab helper could not start: {detail}")
        except BaseException:
            self.stop()
            raise
        self.info = ready
        self.setup_s = time.perf_counter() - started

    # -- receiving -----------------------------------------------------------------------------------
    def _take(self) -> dict | None:
        """The message select() said is waiting (None at end of file).  Its descriptors are put in
        ``_arrived`` with Ctrl-C held: a KeyboardInterrupt between recvmsg() and that line would drop
        them unclosed (and a leaked socket keeps its namespace alive)."""
        with deferred_ctrl_c():
            try:
                data, ancillary, flags, _ = self._control.recvmsg(
                    1 << 16, _ANCILLARY, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return {}  # nothing after all (select() raced a close): the caller waits again
            except OSError:
                return None
            self._arrived.extend(_passed_descriptors(ancillary))
            if not data:
                return None
            try:
                message = json.loads(data)
            except ValueError:
                message = {}
            if not isinstance(message, dict):
                message = {}
            if flags & socket.MSG_CTRUNC:
                message["_truncated"] = True  # the kernel could not install the descriptor here (EMFILE)
            return message

    def _receive(self, deadline: float, what: str) -> dict:
        """The next message; LabHelperError when the helper has gone or stopped, or at ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            if select.select([self._control], [], [], max(0.0, min(_SLICE_S, left)))[0]:
                message = self._take()
                if message is None:
                    self._raise(self._why_gone())
                if message:
                    return message
                continue
            problem = self._problem_now()
            if problem is not None:
                self._raise(problem)
            if left <= 0:
                self._raise(f"the lab helper (pid {self.pid}) did not answer a {what} request by its deadline")

    def _drop_arrived(self) -> None:
        """Close descriptors nobody will take (a stale reply's, an error's)."""
        while self._arrived:
            with contextlib.suppress(OSError):
                os.close(self._arrived.pop())

    # -- health --------------------------------------------------------------------------------------
    def _raise(self, problem: str):
        self._fault = problem  # sticky: every later request fails at once with the same words
        raise LabHelperError(problem)

    def _why_gone(self) -> str:
        """The helper closed its control socket: it is exiting. Say how it ended (reaped within _GONE_S)."""
        try:
            code = self._process.wait(timeout=_GONE_S)
        except subprocess.TimeoutExpired:
            return f"the lab helper (pid {self.pid}) closed its control socket"
        return f"the lab helper (pid {self.pid}) {_ended(code)}"

    def _problem_now(self) -> str | None:
        """What is wrong with the helper right now (dead, stopped), in words naming it; None if nothing."""
        if self._fault is not None:
            return self._fault
        code = self._process.poll()
        if code is not None:
            return f"the lab helper (pid {self.pid}) {_ended(code)}"
        if _proc_state(self.pid) in ("T", "t"):
            return (f"the lab helper (pid {self.pid}) is stopped (SIGSTOP, or a debugger): it cannot answer; "
                    "the lab is unusable")
        return None

    def check(self) -> None:
        """LabHelperError now if the helper or a companion has hung up (one poll(), no waiting)."""
        if self._fault is not None:
            raise LabHelperError(self._fault)
        if self._stopped:
            raise RuntimeError("the lab namespace has been closed")
        # A fresh poll object each time: one is not safe to poll from two threads at once (a link's two sides).
        watch, socks = select.poll(), {self._control.fileno(): self._control}
        for sock in self.companions:
            socks[sock.fileno()] = sock
        for fd in socks:
            watch.register(fd, select.POLLHUP)  # POLLIN (a stale reply) is not a problem
        hung = [fd for fd, events in watch.poll(0) if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)]
        if not hung:
            return
        if self._control.fileno() in hung:
            self._raise(self._why_gone())
        # A companion (the forwarder) hung up: it is exiting, and the helper, its parent, will know how it ended
        # once it has become a zombie (its descriptors close a moment before that): ask, bounded.
        deadline = time.monotonic() + _GONE_S
        while time.monotonic() < deadline:
            self.request("health")  # raises LabHelperError with the helper's words once it has reaped it
            time.sleep(0.01)
        self._raise(f"{self.companions.get(socks[hung[0]], 'a lab process')} has exited")

    def problem(self) -> str | None:
        """What went wrong with the helper or a companion while the lab was in use, or None (no waiting)."""
        if (self._stopped and self._fault is None) or os.getpid() != self._owner:
            return None  # (a forked child leaving the block: the lab was never its to judge)
        try:
            self.check()
            problem = self._problem_now()
            if problem is None and self.companions:
                self.request("health", timeout=_GONE_S)  # the helper looks at its forwarder (stopped?)
        except LabHelperError as exc:
            return str(exc)
        return problem

    # -- asking --------------------------------------------------------------------------------------
    def request(self, op: str, want_fd: bool = False, *, into: list | None = None, timeout: float | None = None,
                **fields):
        """Send one request and return its reply: OSError with the helper's errno when it failed there,
        LabHelperError when the helper or its forwarder is dead or stopped, or no reply came within
        ``timeout`` seconds (the caller's own deadline; default 10 s).  With ``want_fd`` the descriptors
        that came back are appended to ``into`` (last one first, for pop()) -- handed over with Ctrl-C held."""
        wait_s = _REPLY_S if timeout is None else max(0.0, float(timeout))
        with self._lock:
            if self._fault is not None:
                raise LabHelperError(self._fault)
            if self._stopped:
                raise RuntimeError("the lab namespace has been closed")
            self._drop_arrived()  # left by a request someone stopped waiting for
            ident = next(self._ids)
            try:
                self._control.send(json.dumps({"op": op, "id": ident, **fields}).encode())
            except (BrokenPipeError, ConnectionResetError):
                self._raise(self._why_gone())
            deadline = time.monotonic() + wait_s
            while True:
                reply = self._receive(deadline, repr(op))
                if reply.get("id") == ident:
                    break
                self._drop_arrived()  # the answer to a request someone stopped waiting for
            if "fault" in reply or "errno" in reply or not want_fd:
                self._drop_arrived()
                if "fault" in reply:
                    self._raise(reply["fault"])
                if "errno" in reply:
                    raise OSError(reply["errno"], reply.get("error") or os.strerror(reply["errno"]))
                return reply
            if not self._arrived:
                raise OSError(errno.EMFILE, "no descriptor arrived over SCM_RIGHTS (this process is out of fds?)")
            with deferred_ctrl_c():
                into.extend(reversed(self._arrived))
                self._arrived = []
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
        if os.getpid() != self._owner:
            self._forked_away()  # not our child to wait for, nor ours to kill
            return
        self._close_sockets()
        self._stopped = True
        _live.discard(self)
        process = getattr(self, "_process", None)
        if process is None:
            return
        interrupted: BaseException | None = None
        try:
            if process.returncode is None and (self._fault is not None or _proc_state(process.pid) in ("T", "t")):
                # A stopped helper cannot read the end of file it is waiting for (nor exit): end it now.
                # (SIGKILL ends a stopped process; its forwarder follows by PR_SET_PDEATHSIG.)
                with contextlib.suppress(OSError):
                    process.kill()
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

    def _close_sockets(self) -> None:
        """Our control socket, then the companions' (the helper and forwarder see end of file), then
        descriptors that arrived for nobody."""
        for sock in (self._control, *self.companions):
            with contextlib.suppress(OSError):
                sock.close()
        self._drop_arrived()

    def _forked_away(self) -> None:
        """In a forked child: the lab belongs to the parent.  Close our copies of its sockets (the helper
        must see end of file when its owner goes, whoever else lives) and never wait for or signal it."""
        self._lock = threading.Lock()  # another thread may have held the parent's at the fork
        self._fault = f"this lab belongs to process {self._owner}; a forked child (pid {os.getpid()}) cannot use it"
        self._stopped = True
        self._close_sockets()
