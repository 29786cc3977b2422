"""The lab: local peers and links for connects to land on (loopback, AF_UNIX, own namespaces only).

:mod:`nbconn.lab.peers` -- listening, refused, blackhole, reset, slow_accept,
unix_listening, unix_full, unix_missing (context managers yielding a target).
:mod:`nbconn.lab.wire` -- ``impaired(delay_ms=, jitter_ms=, loss=)``: a link with
real delay, jitter and loss between two network namespaces (needs root).
"""

import importlib

from .peers import (
    SCENARIOS,
    Peer,
    blackhole,
    listening,
    refused,
    reset,
    slow_accept,
    unix_full,
    unix_listening,
    unix_missing,
)


def __getattr__(name: str):
    # The wire pulls in ctypes and namespace helpers: load it only when asked for.
    # (importlib, not "from . import wire": that form would call this hook again.)
    if name in ("impaired", "wire_unavailable_reason", "wire"):
        wire = importlib.import_module(".wire", __name__)
        return wire if name == "wire" else getattr(wire, name)
    raise AttributeError(f"module 'nbconn.lab' has no attribute {name!r}")


__all__ = ["SCENARIOS", "Peer", "blackhole", "listening", "refused", "reset", "slow_accept", "unix_full",
           "unix_listening", "unix_missing", "impaired", "wire_unavailable_reason"]
