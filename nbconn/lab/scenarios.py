"""The lab's scenarios by name: what starts each one (keyed by :data:`nbconn.validate.SCENARIOS`), and one way to start one.

``SCENARIO_PEERS[name]`` is a context manager factory yielding a :class:`~nbconn.lab.peers.Peer`
(the target string with counters).  :func:`scenario` starts one and also says how the
client side must connect: for the lab peers on loopback, from right here; for
``"impaired"``, with step 1 in the link's client namespace (``link.client``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from .. import validate
from . import peers


@contextlib.contextmanager
def impaired_peer(*, backlog: int = 4096, **wire) -> Iterator[peers.Peer]:
    """The impairment wire with a listener on its server side; the Peer carries the link as ``.link``."""
    from .wire import impaired

    with impaired(**wire) as link:
        port = link.serve_listener(backlog=backlog)
        peer = peers.Peer(f"{link.server_addr}:{port}", "impaired", port=port)
        peer.link = link
        yield peer


#: scenario name (one of nbconn.validate.SCENARIOS) -> context manager factory yielding a Peer
SCENARIO_PEERS = {
    "listening": peers.listening,
    "refused": peers.refused,
    "blackhole": peers.blackhole,
    "reset": peers.reset,
    "slow-accept": peers.slow_accept,
    "unix-listening": peers.unix_listening,
    "unix-full": peers.unix_full,
    "unix-missing": peers.unix_missing,
    "impaired": impaired_peer,
}
assert tuple(SCENARIO_PEERS) == validate.SCENARIOS, "nbconn.validate.SCENARIOS is the one list of names"

#: the address family each scenario's target has (what family-dependent settings such as bind are checked for)
FAMILY = {name: (socket.AF_UNIX if name.startswith("unix-") else socket.AF_INET) for name in validate.SCENARIOS}

WIRE_KEYS = ("delay_ms", "jitter_ms", "loss", "seed", "syn_linear_timeouts")


@contextlib.contextmanager
def scenario(name: str, **wire) -> Iterator[tuple]:
    """Start scenario ``name`` and yield ``(target, client_side)``: ``with client_side(): ...`` connects as the
    scenario needs (from the link's client namespace for "impaired", from here otherwise).

    ``wire`` (delay_ms, jitter_ms, loss, seed, syn_linear_timeouts) applies to "impaired" only; everything is
    checked before anything starts.
    """
    name = validate.choice("scenario", name, validate.SCENARIOS)
    unknown = sorted(set(wire) - set(WIRE_KEYS))
    if unknown:
        raise TypeError(f"scenario() got unexpected arguments: {', '.join(unknown)}")
    if wire and name != "impaired":
        raise ValueError(f"{', '.join(wire)} only apply to the 'impaired' scenario, not {name!r}")
    if name == "impaired":
        with impaired_peer(**wire) as peer:
            yield peer, peer.link.client
        return
    with SCENARIO_PEERS[name]() as peer:
        yield peer, contextlib.nullcontext
