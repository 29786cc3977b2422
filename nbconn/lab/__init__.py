"""The lab: local peers and links for connects to land on (loopback, AF_UNIX, own namespaces only).

:mod:`nbconn.lab.peers` -- listening, refused, blackhole, reset, slow_accept,
unix_listening, unix_full, unix_missing (context managers yielding a target).
:mod:`nbconn.lab.scenarios` -- ``SCENARIOS`` (one mapping, keyed by nbconn.validate.SCENARIOS) and
``scenario(name, **wire)``: start one, yielding (target, client-side context).
:mod:`nbconn.lab.namespace` -- ``namespace(sysctls=, routes=)``: a network namespace of
the lab's own, as a normal user too (user + network namespace, "root" inside); its
sockets are made inside and passed out over SCM_RIGHTS (a socket source for step 1),
with per-namespace sysctls, its TCP counters, and peers listening inside.
:mod:`nbconn.lab.wire` -- ``impaired(delay_ms=, jitter_ms=, loss=, router=)``: a link with
real delay, jitter and loss between two network namespaces; with ``router=`` the server
namespace also routes 198.19.0.0/24 to an unreachable, prohibit or blackhole route.
"""

import importlib

from .peers import (
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
from .scenarios import SCENARIOS, scenario


def __getattr__(name: str):
    # The wire pulls in ctypes and namespace helpers: load it only when asked for.
    # (importlib, not "from . import wire": that form would call this hook again.)
    if name in ("namespace", "namespace_unavailable_reason"):
        module = importlib.import_module(".namespace", __name__)
        return module if name == "namespace" else module.unavailable_reason  # the module is callable
    if name in ("impaired", "wire_unavailable_reason", "wire"):
        wire = importlib.import_module(".wire", __name__)
        return wire if name == "wire" else getattr(wire, name)
    raise AttributeError(f"module 'nbconn.lab' has no attribute {name!r}")


__all__ = ["SCENARIOS", "scenario", "Peer", "blackhole", "listening", "refused", "reset", "slow_accept", "unix_full",
           "unix_listening", "unix_missing", "impaired", "wire_unavailable_reason", "namespace", "namespace_unavailable_reason"]
