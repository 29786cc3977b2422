"""Small helpers for Linux network namespaces, used by :mod:`nbconn.lab.wire`.

A *network namespace* is a private copy of the kernel's networking state:
its own interfaces, addresses, routes, sockets, port space and most of
``/proc/sys/net``.  Every thread belongs to exactly one.  ``ip netns add
NAME`` creates one and keeps it alive by bind-mounting it at
``/var/run/netns/NAME``, so it outlives the ``ip`` process.

A thread moves into a namespace with ``setns(fd, CLONE_NEWNET)`` where ``fd``
is an open file for that namespace (``/var/run/netns/NAME`` or
``/proc/PID/ns/net``).  Only the calling *thread* moves; the rest of the
process stays where it was.  A socket stays in the namespace it was created
in, whatever the thread does afterwards, which is what lets a single Python
process own sockets on both sides of an emulated link.

Python 3.11 has no ``os.setns`` (it arrived in 3.12), so we call libc's
``setns`` through :mod:`ctypes`.  Every namespace file is opened *before*
switching: once a thread is inside a fresh namespace, paths such as
``/proc/thread-self/ns/net`` describe the new namespace, not the old one.

Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

__all__ = [
    "CLONE_NEWNET",
    "NETNS_RUN_DIR",
    "NAME_PREFIX",
    "setns",
    "open_netns",
    "current_netns_fd",
    "entered",
    "run_in_netns",
    "ip_binary",
    "run_ip",
    "add_netns",
    "delete_netns",
    "list_netns",
    "remove_stale_namespaces",
]

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"  # where iproute2 bind-mounts named namespaces
NAME_PREFIX = "nbconn-"

# Names we create look like nbconn-<pid>-<hex>-c; the pid lets a later
# process recognise namespaces left behind by a process that died.
_OWNED_NAME = re.compile(r"^nbconn-(\d+)-[0-9a-f]+-[cs]$")

_IP_TIMEOUT_S = 10.0  # no `ip` invocation may hang the notebook for ever

T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    """Return libc loaded with errno tracking (cached)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace open as ``fd``.

    Raises :class:`OSError` with the kernel's errno on failure.
    """
    libc = _load_libc()
    if libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(fd={fd}): {os.strerror(err)}")


def open_netns(name: str) -> int:
    """Open the named namespace's file and return a close-on-exec fd."""
    return os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)


def current_netns_fd() -> int:
    """Open the calling *thread's* current network namespace."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def entered(ns_fd: int) -> Iterator[None]:
    """Context manager: the current thread runs inside ``ns_fd`` meanwhile.

    The original namespace is opened before switching and restored on every
    exit path, including exceptions raised in the body.  If switching back
    fails the thread would be stranded in the wrong namespace, so that is
    reported as a :class:`RuntimeError` rather than swallowed.
    """
    original = current_netns_fd()
    try:
        setns(ns_fd)
    except BaseException:
        os.close(original)
        raise
    try:
        yield
    finally:
        try:
            setns(original)
        except OSError as exc:  # pragma: no cover - would need a kernel bug
            raise RuntimeError(f"could not return thread to its namespace: {exc}") from exc
        finally:
            os.close(original)


def run_in_netns(
    ns_fd: int,
    fn: Callable[[], T],
    cleanup: Callable[[T], object] | None = None,
    timeout: float = 10.0,
) -> T:
    """Run ``fn()`` in a short-lived helper thread that first enters ``ns_fd``.

    Used for things that must *happen* inside a namespace (opening
    ``/dev/net/tun`` decides which namespace the TUN device is born in)
    without ever moving the caller's thread.  The helper thread simply ends
    afterwards, so there is nothing to switch back.  Exceptions from ``fn``
    are re-raised in the caller.

    If the caller stops waiting (timeout, or Ctrl-C while joining), the
    result is handed to ``cleanup`` instead -- by whichever side gets there
    last -- so a resource such as an fd is never leaked.
    """
    result: list[T] = []
    error: list[BaseException] = []
    lock = threading.Lock()
    abandoned = False

    def body() -> None:
        try:
            setns(ns_fd)
            value = fn()
        except BaseException as exc:  # handed to the caller below
            error.append(exc)
            return
        with lock:
            if not abandoned:
                result.append(value)
                return
        if cleanup is not None:
            cleanup(value)

    def abandon() -> None:
        nonlocal abandoned
        with lock:
            abandoned = True
            leftover = result[:]
            result.clear()
        if cleanup is not None:
            for value in leftover:
                cleanup(value)

    helper = threading.Thread(target=body, name="nbconn-netns-helper", daemon=True)
    helper.start()
    try:
        helper.join(timeout)
    except BaseException:
        abandon()
        raise
    if helper.is_alive():
        abandon()
        raise RuntimeError(f"helper thread in namespace did not finish within {timeout} s")
    if error:
        raise error[0]
    return result[0]


def ip_binary() -> str | None:
    """Path of iproute2's ``ip``, also looking in sbin dirs missing from PATH."""
    found = shutil.which("ip")
    if found:
        return found
    for candidate in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def run_ip(args: Sequence[str], stdin: str | None = None) -> str:
    """Run ``ip ARGS...`` and return stdout; raise RuntimeError with stderr on failure."""
    binary = ip_binary()
    if binary is None:
        raise RuntimeError("iproute2 `ip` binary not found")
    argv = [binary, *args]
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{' '.join(argv)}` timed out") from exc
    if done.returncode != 0:
        detail = done.stderr.strip() or f"exit status {done.returncode}"
        raise RuntimeError(f"`{' '.join(argv)}` failed: {detail}")
    return done.stdout


def add_netns(name: str) -> None:
    """Create a named network namespace (``ip netns add``)."""
    run_ip(["netns", "add", name])


def delete_netns(name: str) -> None:
    """Delete a named network namespace; a missing one is not an error."""
    if not os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
        return
    run_ip(["netns", "delete", name])


def list_netns(prefix: str = NAME_PREFIX) -> list[str]:
    """Names of existing named namespaces starting with ``prefix``."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete ``nbconn-<pid>-...`` namespaces whose creating process is gone.

    Only names in the exact format this package generates are considered,
    and only when that pid no longer exists, so a live session (ours or
    another's) is never touched.  Returns the names removed.
    """
    removed = []
    for name in list_netns():
        match = _OWNED_NAME.match(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        try:
            delete_netns(name)
            removed.append(name)
        except RuntimeError:
            pass  # best effort: someone else may be deleting it right now
    return removed
