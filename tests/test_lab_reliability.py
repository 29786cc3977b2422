"""The lab under attack: signals, Ctrl-C at any moment, running out of descriptors, bad options.

Each test reproduces one way the round-1 lab broke (issue 12.6) and checks that nothing is
left behind: no helper or forwarder process, no namespace (searched by inode in every
process's /proc/PID/ns/net), no descriptor.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import nbconn
from nbconn import lab
from nbconn.lab import probe

from .conftest import open_fds, require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIRE = probe.wire_unavailable_reason()
needs_wire = pytest.mark.skipif(WIRE is not None, reason=f"the impairment wire cannot run here: {WIRE}")


def lab_processes(parent: int | None = None) -> dict[int, str]:
    """pid -> state of every lab helper (child.py) -- and its forked forwarder -- optionally only one parent's."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"nbconn/lab/child.py\0probe" in cmd:
            continue  # the availability probe: it builds nothing that lasts
        if b"nbconn/lab/child.py" in cmd and (parent is None or int(fields[1]) == parent):
            found[int(pid)] = fields[0]
    return found


def namespace_holders(inode: int) -> list[int]:
    """Processes whose network namespace is ``inode``."""
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                holders.append(int(pid))
        except OSError:
            continue
    return holders


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- signals to `python -m nbconn measure impaired` ---------------------------------------------------------

@needs_wire
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_measure_impaired_leaves_nothing(signum):
    proc = subprocess.Popen([sys.executable, "-m", "nbconn", "measure", "impaired", "--delay-ms", "10",
                             "--count", "100000", "--concurrency", "4", "--timeout", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: lab_processes(proc.pid), 20), "the helper never started"
        [helper] = lab_processes(proc.pid)
        assert wait_for(lambda: lab_processes(helper), 20), "the forwarder never started"  # namespaces built
        forwarders = lab_processes(helper)
        inodes = {os.stat(f"/proc/{pid}/ns/net").st_ino for pid in (helper, *forwarders)}
        assert os.stat("/proc/self/ns/net").st_ino not in inodes
        time.sleep(0.3)  # let it run connects
        proc.send_signal(signum)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    gone = lambda: all(lab_processes().get(pid, "Z") == "Z" for pid in (helper, *forwarders))  # noqa: E731
    assert wait_for(gone, 10), lab_processes()
    assert wait_for(lambda: not any(namespace_holders(i) for i in inodes), 5)


# -- Ctrl-C inside the process ---------------------------------------------------------------------------------

class CtrlC:
    """Real SIGINTs to this process from a timer thread: once after ``first`` seconds, then every ``every``.

    While armed, SIGINT raises KeyboardInterrupt as Python's default handler does; ``cancel()`` stops the
    thread and disarms, so a signal still in flight cannot hit the test's own bookkeeping afterwards."""

    def __init__(self, first: float, every: float = 0.0, limit: int = 50) -> None:
        self._stop = threading.Event()
        self.armed = True
        self._previous = signal.signal(signal.SIGINT, self._handler)
        self._thread = threading.Thread(target=self._run, args=(first, every, limit), daemon=True)

    def start(self) -> None:
        """Call inside the ``try`` whose ``finally`` calls cancel(): the first signal may come at once."""
        self._thread.start()

    def _handler(self, signum, frame):
        if self.armed:
            raise KeyboardInterrupt

    def _run(self, first, every, limit):
        if self._stop.wait(first):
            return
        for _ in range(limit):
            os.kill(os.getpid(), signal.SIGINT)
            if not every or self._stop.wait(every):
                return

    def cancel(self):
        self.armed = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        time.sleep(0.01)  # a signal sent just before the stop is handled (and ignored) now
        signal.signal(signal.SIGINT, self._previous)


@needs_wire
def test_ctrl_c_at_any_moment_of_setup_leaks_nothing():
    fds = open_fds()
    me = os.getpid()
    interrupted = 0
    for delay_ms in (1, 3, 7, 12, 20, 35, 60, 100, 150, 250):
        ctrl_c = CtrlC(delay_ms / 1000)
        try:
            ctrl_c.start()
            with lab.impaired(delay_ms=1) as link:
                link.serve_listener()
                time.sleep(1.0)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            ctrl_c.cancel()
        # A helper interrupted while starting sees its control socket close and exits by itself; on a loaded
        # machine that can take a moment, so wait (bounded) -- a zombie never leaves the table and still fails.
        assert wait_for(lambda: lab_processes(me) == {}, 5), \
            f"helper left after Ctrl-C at {delay_ms} ms: {lab_processes(me)}"
        assert wait_for(lambda: open_fds() == fds, 2), f"descriptors left after Ctrl-C at {delay_ms} ms"
    assert interrupted == 10


@needs_wire
def test_repeated_ctrl_c_during_cleanup_leaves_no_zombie_and_no_fd():
    fds = open_fds()
    me = os.getpid()
    for every_ms in (0.5, 1, 2, 5):
        link = ctrl_c = None
        try:
            with lab.impaired(delay_ms=1) as link:
                link.serve_listener()
                helper, forwarder = link.pid, link.forwarder_pid
                ctrl_c = CtrlC(0.001, every_ms / 1000, limit=20)  # Ctrl-C again and again, through close()
                ctrl_c.start()
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            if ctrl_c is not None:
                ctrl_c.cancel()
        for _ in range(50):  # what the next cell, or atexit, does
            try:
                link.close()
                break
            except KeyboardInterrupt:
                pass
        assert lab_processes(me) == {}
        assert not os.path.exists(f"/proc/{helper}"), "helper not reaped (zombie)"
        assert wait_for(lambda: not os.path.exists(f"/proc/{forwarder}") or
                        lab_processes().get(forwarder) in (None, "Z"), 5)
        # an acceptor whose stop was cut short by a Ctrl-C ends by itself once its listener is closed
        assert wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("nbconn-")], 2)
        # descriptors an acceptor thread closes on its way out may go a moment after it is gone
        assert wait_for(lambda: open_fds() == fds, 2), \
            [os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")]


# -- running out of descriptors ----------------------------------------------------------------------------------

def test_listening_peer_survives_emfile_and_counts_it():
    """accept() fails with EMFILE while the limit is low; the peer keeps going once it is raised again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with lab.listening() as peer:
        clients = [socket.socket() for _ in range(20)]
        fillers: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 1, hard))
            try:
                while True:  # take every free descriptor number below the limit
                    try:
                        fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
                    except OSError as exc:
                        assert exc.errno == errno.EMFILE
                        break
                for c in clients:
                    c.setblocking(False)
                    assert c.connect_ex(("127.0.0.1", peer.port)) in (0, errno.EINPROGRESS)
                assert wait_for(lambda: peer.accept_errors > 0, 5), "accept() never hit EMFILE"
                stuck = peer.accepted
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert wait_for(lambda: peer.accepted == 20, 5), (peer.accepted, peer.accept_errors)
            assert stuck < 20
            [after] = nbconn.connect_many([peer], timeout=1)  # still a listening peer, not a black hole
            assert after.outcome == "connected"
        finally:
            for c in clients:
                c.close()


# -- bad options: refused before anything is built ----------------------------------------------------------------

def _no_namespace_work(argv: list) -> subprocess.CompletedProcess:
    """Run ``argv`` under strace: it must exit 2 without starting a lab helper or calling unshare()."""
    strace = require_tool("strace")
    proc = subprocess.run([strace, "-f", "-qq", "-e", "trace=execve,unshare", "-o", "/dev/stderr", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "child.py" not in proc.stderr and "unshare(" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.parametrize("wire", ["delay_ms=-1", "loss=2", "jitter_ms=20, delay_ms=10", "delay=5"])
def test_lab_scenario_checks_before_probing_or_building(wire):
    code = ("import sys, nbconn.lab as lab\n"
            f"try:\n    lab.scenario('impaired', {wire}).__enter__()\n"
            "except (TypeError, ValueError) as exc:\n    print(exc, file=sys.stderr); sys.exit(2)\n")
    assert _no_namespace_work([sys.executable, "-c", code]).returncode == 2


@pytest.mark.parametrize("args", [
    ["--delay-ms", "-1"],
    ["--loss", "2"],
    ["--jitter-ms", "20", "--delay-ms", "10"],
    ["--bind", "garbage"],
    ["--count", "0"],
])
def test_bad_measure_options_start_no_helper(args):
    proc = _no_namespace_work([sys.executable, "-m", "nbconn", "measure", "impaired", *args])
    assert proc.returncode == 2
