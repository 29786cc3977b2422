"""Notebook 01's plumbing: read a sysctl, and a loopback peer that streams bytes to a client.

The notebook's cells make the socket calls themselves (setsockopt, getsockopt, connect); what lives
here is what the lesson is not about: reading /proc/sys, and a sender thread on the other end.
"""

from __future__ import annotations

import socket
import threading


def sysctl(name: str) -> str:
    """Sysctl ``name`` ("net.core.rmem_max") in this network namespace, fields one space apart; "?" if unreadable."""
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return " ".join(f.read().split())
    except OSError:
        return "?"


def receive_from_peer(client: socket.socket, listener: socket.socket, total_bytes: int,
                      *, timeout_s: float = 10.0) -> int:
    """Accept ``client``'s connection on ``listener``, send it ``total_bytes`` from a thread, read them all.

    ``client`` is connected (blocking, with a timeout) to ``listener``.  Returns the bytes received; the
    peer's socket is closed, and its thread joined, on every path.
    """
    if not 1 <= total_bytes <= 1 << 30:
        raise ValueError(f"total_bytes={total_bytes!r} is outside 1..{1 << 30}")
    listener.settimeout(timeout_s)
    peer, _ = listener.accept()

    def send() -> None:
        chunk, sent = b"x" * 65536, 0
        try:
            while True:  # not `while sent < total_bytes:` inside try (test_interrupt_coverage)
                if sent >= total_bytes:
                    break
                sent += peer.send(chunk[:total_bytes - sent] if total_bytes - sent < len(chunk) else chunk)
        except OSError:
            pass  # the client went away: it counts what it got
        finally:
            peer.close()

    sender = threading.Thread(target=send, daemon=True)
    got = 0
    try:
        sender.start()
        while True:  # until the peer's close (EOF); the client's own timeout bounds each recv()
            data = client.recv(1 << 16)
            if not data:
                break
            got += len(data)
    finally:
        sender.join(timeout_s)
    return got
