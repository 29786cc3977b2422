"""The impairment wire's parameters, checked with the one rule (:mod:`nbconn.validate`) before anything exists."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ... import validate

MAX_DELAY_MS = 60_000.0  # one way; keeps every timer finite and small
MAX_SYN_LINEAR_TIMEOUTS = 127  # the kernel's MAX_TCP_SYNCNT
SYN_LINEAR_SYSCTL = "net.ipv4.tcp_syn_linear_timeouts"
#: The route types the server namespace may hold for the far prefix when it acts as a router, and what
#: the kernel does with a forwarded packet that meets one (net/ipv4/fib_semantics.c fib_props gives the
#: error, net/ipv4/route.c ip_error turns it into ICMP): unreachable -> EHOSTUNREACH -> ICMP host
#: unreachable; prohibit -> EACCES -> ICMP communication administratively prohibited (code 13);
#: blackhole -> EINVAL -> dropped, nothing sent.
ROUTER_ROUTE_TYPES = ("unreachable", "prohibit", "blackhole")


@dataclass(frozen=True)
class Params:
    """Validated link parameters (delays in seconds, per direction: out = client -> server, back)."""

    delay_s: tuple
    jitter_s: float
    loss: tuple
    seed: int | None
    syn_linear_timeouts: int | None
    router: str | None = None  # the route type the server namespace holds for the far prefix (None: no router)

    def forwarder(self, to_nobody: bool) -> dict:
        """What the forwarder child needs (JSON-able)."""
        return {"delay_s": self.delay_s, "jitter_s": self.jitter_s, "loss": self.loss, "seed": self.seed,
                "to_nobody": to_nobody}


def _pair(name: str, value: object, low: float, high: float) -> tuple:
    """A number applies to both directions; a 2-tuple/list is (out, back)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or an (out, back) pair, got {validate.shown(value)}")
        return (validate.number(f"{name}[0]", value[0], low, high), validate.number(f"{name}[1]", value[1], low, high))
    number = validate.number(name, value, low, high)
    return (number, number)


def check(delay_ms: object = 10.0, jitter_ms: object = 0.0, loss: object = 0.0, seed: object = None,
          syn_linear_timeouts: object = None, router: object = None) -> Params:
    """Every argument of :func:`nbconn.lab.impaired`; TypeError/ValueError naming the value."""
    delays = _pair("delay_ms", delay_ms, 0.0, MAX_DELAY_MS)
    jitter = validate.number("jitter_ms", jitter_ms, 0.0, MAX_DELAY_MS)
    if jitter > min(delays):
        raise ValueError(f"jitter_ms={validate.shown(jitter_ms)} exceeds delay_ms={validate.shown(delay_ms)}: "
                         "a packet cannot be delivered before it was sent")
    losses = _pair("loss", loss, 0.0, 1.0)
    if seed is not None:
        seed = validate.integer("seed", seed, -(2 ** 63), 2 ** 63 - 1)
    if syn_linear_timeouts is not None:
        syn_linear_timeouts = validate.integer("syn_linear_timeouts", syn_linear_timeouts, 0, MAX_SYN_LINEAR_TIMEOUTS)
        if not os.path.exists("/proc/sys/" + SYN_LINEAR_SYSCTL.replace(".", "/")):
            raise ValueError(f"syn_linear_timeouts: this kernel has no {SYN_LINEAR_SYSCTL} sysctl (Linux 6.5+)")
    if router is not None:
        router = validate.choice("router", router, ROUTER_ROUTE_TYPES)
        from ..control import ip_binary

        if ip_binary() is None:
            raise ValueError("router: the routes need iproute2's ip, which is not installed (apt-get install iproute2)")
    return Params(delay_s=(delays[0] / 1000.0, delays[1] / 1000.0), jitter_s=jitter / 1000.0, loss=losses,
                  seed=seed, syn_linear_timeouts=syn_linear_timeouts, router=router)
