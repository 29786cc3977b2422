"""Which peer to connect to, and what to do when the connect fails: nginx's upstream round robin.

``ngx_event_connect_peer`` starts by asking the load balancer for a peer
(``pc->get``) and the upstream module decides what a failed connect means.
This module is that machinery, read from nginx's
``src/http/ngx_http_upstream_round_robin.c`` and ``src/http/ngx_http_upstream.c``:

* **Smooth weighted round robin** (``ngx_http_upstream_get_peer``): every
  eligible peer's ``current_weight`` grows by its ``effective_weight``; the
  largest wins and pays back the total.  Weights 5, 1, 1 give the order
  a a b a c a a -- spread out, not a a a a a b c.
* **Failures** (``ngx_http_upstream_free_round_robin_peer``): a failed attempt
  bumps ``fails`` and lowers ``effective_weight`` by ``weight / max_fails``;
  at ``max_fails`` failures the peer is left out for ``fail_timeout`` seconds
  ("upstream server temporarily disabled").  After that it gets one chance;
  a success clears ``fails``.  Each successful pick raises ``effective_weight``
  by one again, back up to ``weight``.
* **A single peer** is never marked down: with one server and no backup,
  nginx skips the failure accounting altogether and allows one try per request.
* **Backup** peers are used only when no primary peer is eligible.
* **Next upstream** (``ngx_http_upstream_next``): after a connect error
  (``error``) or a connect timeout (``timeout``) the request tries the next peer
  if that kind of failure is listed in ``proxy_next_upstream``, tries are left
  (``proxy_next_upstream_tries``, at most the number of peers) and
  ``proxy_next_upstream_timeout`` has not passed.  Otherwise it ends with 502
  (error) or 504 (timeout).  When no peer is eligible at all: "no live
  upstreams", 502.

The state machine (:class:`Upstream`, :class:`Request`) does no I/O and takes
its clock as a parameter, so tests can step time by hand (the h11 way).
:func:`run_requests` drives it with real connects through :func:`nbconn.connect`.
nginx measures ``fail_timeout`` in whole seconds (``ngx_time()``); so does this.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .targets import parse_target

NEXT_UPSTREAM_KINDS = ("error", "timeout")


@dataclass
class Peer:
    """One ``server`` line of an ``upstream`` block."""

    address: str  # as nginx names it: 127.0.0.1:8080
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    backup: bool = False
    down: bool = False
    # run-time state, as in ngx_http_upstream_rr_peer_t
    current_weight: int = 0
    effective_weight: int = 0
    fails: int = 0
    accessed: int = 0
    checked: int = 0

    def __post_init__(self) -> None:
        for name, low in (("weight", 1), ("max_fails", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"peer {self.address}: {name}={value!r} must be an int >= {low}")
        if isinstance(self.fail_timeout, bool) or not isinstance(self.fail_timeout, (int, float)) \
                or not 0 <= self.fail_timeout <= 86400:
            raise ValueError(f"peer {self.address}: fail_timeout={self.fail_timeout!r} must be 0..86400 s")
        self.address = parse_target(self.address).text
        self.effective_weight = self.weight

    @classmethod
    def parse(cls, spec: str) -> "Peer":
        """``HOST:PORT[,weight=N][,max_fails=N][,fail_timeout=S][,backup][,down]`` (the CLI's --peer)."""
        address, *params = spec.split(",")
        kwargs: dict = {}
        for param in params:
            key, sep, value = param.partition("=")
            if key in ("backup", "down") and not sep:
                kwargs[key] = True
            elif key in ("weight", "max_fails") and sep and value.isdigit():
                kwargs[key] = int(value)
            elif key == "fail_timeout" and sep:
                try:
                    kwargs[key] = float(value.rstrip("s"))
                except ValueError:
                    raise ValueError(f"peer {spec!r}: fail_timeout={value!r} is not a number") from None
            else:
                raise ValueError(f"peer {spec!r}: cannot read {param!r} (weight=N, max_fails=N, fail_timeout=S, "
                                 f"backup, down)")
        return cls(address, **kwargs)

    def eligible(self, now: int) -> bool:
        """Not down and not in its fail_timeout window (the tests in ngx_http_upstream_get_peer)."""
        if self.down:
            return False
        return not (self.max_fails and self.fails >= self.max_fails and now - self.checked <= self.fail_timeout)


class Upstream:
    """An ``upstream`` block: primary and backup peers and the round-robin state they share."""

    def __init__(self, peers, *, clock=time.monotonic) -> None:
        peers = [p if isinstance(p, Peer) else Peer.parse(p) for p in peers]
        self.primary = [p for p in peers if not p.backup]
        self.backup = [p for p in peers if p.backup]
        if not self.primary:
            raise ValueError("an upstream needs at least one non-backup peer")
        self.clock = clock
        # ngx_http_upstream_init_round_robin: single = one primary server and no backup
        self.single = len(self.primary) == 1 and not self.backup

    def now(self) -> int:
        return int(self.clock())  # nginx's ngx_time(): whole seconds

    @property
    def tries(self) -> int:
        """ngx_http_upstream_tries: peers that are not `down`, primary plus backup."""
        return sum(not p.down for p in self.primary) + sum(not p.down for p in self.backup)

    def request(self, *, next_upstream=NEXT_UPSTREAM_KINDS, tries: int = 0, timeout_s: float = 0.0) -> "Request":
        """Begin a request (ngx_http_upstream_init_round_robin_peer + next_upstream settings)."""
        return Request(self, next_upstream=next_upstream, tries=tries, timeout_s=timeout_s)

    # -- ngx_http_upstream_get_peer ---------------------------------------------
    def _pick(self, group: list, tried: set) -> Peer | None:
        now = self.now()
        best, total = None, 0
        for peer in group:
            if id(peer) in tried or not peer.eligible(now):
                continue
            peer.current_weight += peer.effective_weight
            total += peer.effective_weight
            if peer.effective_weight < peer.weight:
                peer.effective_weight += 1
            if best is None or peer.current_weight > best.current_weight:
                best = peer
        if best is None:
            return None
        best.current_weight -= total
        if now - best.checked > best.fail_timeout:
            best.checked = now
        return best

    # -- ngx_http_upstream_free_round_robin_peer ------------------------------------
    def _free(self, peer: Peer, *, failed: bool) -> bool:
        """Account for an attempt; return True when nginx would log 'upstream server temporarily disabled'."""
        if self.single:
            peer.fails = 0
            return False
        if failed:
            now = self.now()
            peer.fails += 1
            peer.accessed = now
            peer.checked = now
            disabled = False
            if peer.max_fails:
                peer.effective_weight -= peer.weight // peer.max_fails
                disabled = peer.fails >= peer.max_fails
            peer.effective_weight = max(peer.effective_weight, 0)
            return disabled
        if peer.accessed < peer.checked:
            peer.fails = 0
        return False


@dataclass
class Attempt:
    peer: str
    outcome: str
    connect_ms: float | None
    nginx_log: str | None = None
    disabled: bool = False  # this failure disabled the peer ("upstream server temporarily disabled")


@dataclass
class Request:
    """One request's walk through the peers (ngx_http_upstream_connect / ngx_http_upstream_next)."""

    upstream: Upstream
    next_upstream: tuple = NEXT_UPSTREAM_KINDS
    tries: int = 0
    timeout_s: float = 0.0
    attempts: list = field(default_factory=list)
    result: str | None = None  # "200" when connected, "502", "504", "500", or None while running
    log: list = field(default_factory=list)  # nginx error-log lines this request would produce

    def __post_init__(self) -> None:
        unknown = [k for k in self.next_upstream if k not in NEXT_UPSTREAM_KINDS]
        if unknown:
            raise ValueError(f"next_upstream {unknown[0]!r} is not one of {', '.join(NEXT_UPSTREAM_KINDS)}")
        if isinstance(self.tries, bool) or not isinstance(self.tries, int) or self.tries < 0:
            raise ValueError(f"tries={self.tries!r} must be an int >= 0 (0 = as many as there are peers)")
        if not 0 <= self.timeout_s <= 86400:
            raise ValueError(f"next-upstream timeout={self.timeout_s!r} must be 0..86400 s")
        budget = self.upstream.tries
        self.remaining = min(budget, self.tries) if self.tries else budget
        self.started = self.upstream.clock()
        self._tried: set = set()
        self._group = self.upstream.primary
        self.current: Peer | None = None

    def next_peer(self) -> Peer | None:
        """The peer to connect to next, or None when the request has ended (see ``result``)."""
        if self.result is not None:
            return None
        up = self.upstream
        if up.single:
            peer = up.primary[0]
            self.current = None if peer.down else peer
        else:
            self.current = up._pick(self._group, self._tried)
            if self.current is None and self._group is up.primary and up.backup:
                self._group, self._tried = up.backup, set()
                self.current = up._pick(self._group, self._tried)
        if self.current is None:
            self.log.append("no live upstreams while connecting to upstream")
            self.result = "502"
            return None
        self._tried.add(id(self.current))
        return self.current

    def report(self, outcome: str, connect_ms: float | None = None, *, nginx_log: str | None = None) -> None:
        """What the connect to the current peer did: "connected", "timed_out", or any other outcome (an error)."""
        peer, up = self.current, self.upstream
        if peer is None:
            raise RuntimeError("report() without a peer from next_peer()")
        failed = outcome != "connected"
        disabled = up._free(peer, failed=failed)
        self.attempts.append(Attempt(peer.address, outcome, connect_ms, nginx_log, disabled))
        if nginx_log:
            self.log.append(nginx_log)
        if disabled:
            self.log.append("upstream server temporarily disabled while connecting to upstream")
        self.current = None
        if not failed:
            self.result = "200"
            return
        if up.single:
            self.remaining = 0
        elif self.remaining:
            self.remaining -= 1
        kind = "timeout" if outcome == "timed_out" else "error"
        status = "504" if kind == "timeout" else "502"
        out_of_time = self.timeout_s and up.clock() - self.started >= self.timeout_s
        if self.remaining == 0 or kind not in self.next_upstream or out_of_time:
            self.result = status

    def to_dict(self) -> dict:
        return {"attempts": [{"peer": a.peer, "outcome": a.outcome, "connect_ms": a.connect_ms}
                             for a in self.attempts], "result": self.result}


def run_request(upstream: Upstream, *, timeout: float = 1.0, next_upstream=NEXT_UPSTREAM_KINDS, tries: int = 0,
                next_upstream_timeout: float = 0.0, **options) -> Request:
    """One request: connect to peers as nginx would until one connects or the request gives up."""
    from .api import connect

    req = upstream.request(next_upstream=next_upstream, tries=tries, timeout_s=next_upstream_timeout)
    limit = len(upstream.primary) + len(upstream.backup) + 1  # bound: each peer at most once per request
    for _ in range(limit):
        peer = req.next_peer()
        if peer is None:
            break
        res = connect(peer.address, timeout=timeout, keep=False, **options)
        req.report(res.outcome, res.handshake_ms, nginx_log=res.ngx_log)
        if req.result is not None:
            break
    return req


def run_requests(upstream: Upstream, count: int, **kwargs) -> list[Request]:
    """``count`` requests one after another through the same upstream (shared failure state)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
        raise ValueError(f"requests={count!r} must be an int in 1..100000")
    return [run_request(upstream, **kwargs) for _ in range(count)]


# -- CLI ---------------------------------------------------------------------------

def add_subcommand(subparsers) -> None:
    from .cli import _float_arg, _int_arg

    p = subparsers.add_parser("upstream", help="requests through an nginx-style upstream: round robin and failover",
                              description="Send R requests through an upstream of peers the way nginx's "
                                          "round robin and proxy_next_upstream would.")
    p.add_argument("--peer", action="append", required=True, metavar="HOST:PORT[,weight=N][,max_fails=N]"
                   "[,fail_timeout=S][,backup]", help="an upstream server (repeat for more)")
    p.add_argument("--requests", type=_int_arg("--requests"), default=1, metavar="R")
    p.add_argument("--timeout", type=_float_arg("--timeout"), default=1.0, metavar="S",
                   help="connect timeout per attempt (proxy_connect_timeout)")
    p.add_argument("--tries", type=_int_arg("--tries"), default=0, metavar="N",
                   help="proxy_next_upstream_tries (0 = number of peers)")
    p.add_argument("--next-upstream-timeout", type=_float_arg("--next-upstream-timeout"), default=0.0, metavar="S")
    p.add_argument("--next-upstream", default="error,timeout",
                   help="comma-separated: error, timeout, or off (proxy_next_upstream)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_upstream_cli)


def run_upstream_cli(args) -> int:
    from .cli import EXIT_OK
    from .flow import check_timeout

    check_timeout(args.timeout)
    kinds = () if args.next_upstream == "off" else tuple(k for k in args.next_upstream.split(",") if k)
    up = Upstream([Peer.parse(spec) for spec in args.peer])
    upstream_requests = run_requests(up, args.requests, timeout=args.timeout, next_upstream=kinds, tries=args.tries,
                                     next_upstream_timeout=args.next_upstream_timeout)
    if args.json:
        print(json.dumps({"requests": [r.to_dict() for r in upstream_requests]}, indent=2))
    else:
        for i, r in enumerate(upstream_requests, 1):
            tried = ", ".join(f"{a.peer} {a.outcome}" for a in r.attempts) or "-"
            print(f"request {i}: {r.result}  tried: {tried}")
    return EXIT_OK
