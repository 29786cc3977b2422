"""Notebook 02's plumbing: strace one line of Python, a struct timeval, and the thread's wait for a CPU.

The notebook's cells make the socket calls (ioctl, fcntl, setsockopt(SO_SNDTIMEO), connect_ex); this
module runs a snippet under strace and reads /proc, which the lesson is not about.
"""

from __future__ import annotations

import struct
import subprocess
import sys

from .. import systools

_PRELUDE = "import fcntl, os, socket, struct, termios\ns = socket.socket()\n"


def strace_nonblocking(code: str, *, timeout_s: float = 30.0) -> list[str]:
    """The ioctl(FIONBIO) / fcntl(F_GETFL, F_SETFL) calls that ``code`` makes on a fresh socket ``s``.

    ``code`` runs in a new interpreter under ``strace -e trace=ioctl,fcntl``, after
    ``s = socket.socket()``; each call is returned as strace prints it, without its result.
    Where strace is missing, one line saying so.
    """
    strace = systools.find("strace")
    if strace is None:
        return ["(strace is not installed here: apt-get install strace)"]
    proc = subprocess.run([strace, "-qq", "-e", "trace=ioctl,fcntl", sys.executable, "-c", _PRELUDE + code],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the traced snippet failed: {proc.stderr[-300:]}")
    return [line.split(" = ")[0].strip() for line in proc.stderr.splitlines()
            if "FIONBIO" in line or "F_GETFL" in line or "F_SETFL" in line]


def timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO / SO_RCVTIMEO (socket(7))."""
    if not 0 <= seconds < 1e6:
        raise ValueError(f"seconds={seconds!r} is outside 0..1e6")
    whole, micro = divmod(round(seconds * 1e6), 1_000_000)  # 0.9999999 s is 1 s 0 µs, never 0 s 1000000 µs
    return struct.pack("ll", whole, micro)


def cpu_wait_ns() -> int | None:
    """This thread's total time runnable but waiting for a CPU (run_delay, schedstat's 2nd field), or None."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def spread_ms(seconds: list) -> str:
    """'6.8 ms to 33.4 ms': the smallest and largest of ``seconds``, or 'n/a' for none."""
    return f"{min(seconds) * 1e3:.1f} ms to {max(seconds) * 1e3:.1f} ms" if seconds else "n/a"
