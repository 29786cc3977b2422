"""The peer every connect storm lands on: a fast accept server in its own process, on its own core.

Why a separate process pinned to the other core: on loopback the whole TCP
handshake happens inside the client's ``connect()`` call (the kernel runs the
server side in the same softirq), so the server only has to drain its accept
queue.  If it shared a core -- or a GIL -- with the client, its accept() calls
would be charged to whichever variant is being measured.  Pinned to core 1
while the clients run on core 0, it costs every variant the same.

The accept loop uses ``_accept()`` (the raw descriptor, no socket object) and
``os.close``: a few microseconds per connection, far below the ~30 µs a
client spends per connect, so the queue never fills and no SYN is dropped
(a dropped SYN would cost the client a 1 s retransmission and ruin a run).

Run: ``python benchmarks/servers.py accept [--cpu N]``.  It prints the port on
the first line of stdout, then serves until its stdin closes (the parent
exited or closed the pipe), so it can never outlive the benchmark.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

BACKLOG = 4096  # net.core.somaxconn's default on current kernels


def pin(cpu: int | None) -> None:
    """Run this process on one CPU only (if the machine has it)."""
    if cpu is not None and cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})


def _exit_when_stdin_closes() -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def serve_accept(host: str, cpu: int | None) -> None:
    pin(cpu)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(BACKLOG)
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    accept, close = listener._accept, os.close
    while True:
        try:
            fd, _ = accept()
        except OSError:  # ECONNABORTED and friends: the client reset before we got to it
            continue
        close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["accept"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    serve_accept(args.host, args.cpu)


if __name__ == "__main__":
    main()
