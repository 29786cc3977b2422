"""The lab: local peers and links for connects to land on (loopback, AF_UNIX, own namespaces only).

The public surface (everything a notebook, a test or the CLI needs), by job:

- peers (:mod:`nbconn.lab.peers`): :func:`listening`, :func:`refused`, :func:`blackhole`,
  :func:`reset`, :func:`slow_accept`, :func:`unix_listening`, :func:`unix_full`,
  :func:`unix_missing` -- context managers yielding a target; :class:`Peer` is what they yield.
- scenarios (:mod:`nbconn.lab.scenarios`): :data:`SCENARIO_PEERS` (scenario name ->
  how to start it; the names' one home is :data:`nbconn.validate.SCENARIOS`) and :func:`scenario`
  ``(name, **wire)``: start one, yielding (target, client-side context).
- a namespace of the lab's own (:mod:`nbconn.lab.namespace`): :func:`namespace`
  ``(sysctls=, routes=)``, as a normal user too (user + network namespace, "root" inside);
  its sockets are made inside and passed out over SCM_RIGHTS (a socket source for step 1).
  :func:`namespace_unavailable_reason` says why it cannot run here (None if it can).
- the wire (:mod:`nbconn.lab.wire`): :func:`impaired` ``(delay_ms=, jitter_ms=, loss=, router=)``:
  a link with real delay, jitter and loss between two network namespaces;
  :func:`wire_unavailable_reason` likewise.

``nbconn.lab.namespace`` is the function.  Its module is imported here first, so the
name the package binds last is the function; the module stays reachable as
``from nbconn.lab.namespace import Namespace`` (or ``sys.modules["nbconn.lab.namespace"]``).
"""

from . import wire
from .namespace import namespace
from .namespace import unavailable_reason as namespace_unavailable_reason
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
from .scenarios import SCENARIO_PEERS, scenario
from .wire import impaired, wire_unavailable_reason

__all__ = ["SCENARIO_PEERS", "scenario", "Peer", "blackhole", "listening", "refused", "reset", "slow_accept",
           "unix_full", "unix_listening", "unix_missing", "impaired", "wire", "wire_unavailable_reason", "namespace",
           "namespace_unavailable_reason"]
