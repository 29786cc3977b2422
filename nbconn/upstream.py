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

import time
from dataclasses import dataclass, field

from . import validate
from .targets import parse_target
from .validate import shown

NEXT_UPSTREAM_KINDS = ("error", "timeout")
MAX_WEIGHT = 1000  # not nginx's limit (any ngx_atoi number): keeps the smooth round robin's sums small
MAX_FAILS = 1_000_000
MAX_FAIL_TIMEOUT_S = int(validate.MAX_TIMEOUT_S)

# ngx_parse_time(&s, is_sec=1) (src/core/ngx_parse.c, nginx 1.22.1): a number, optionally with a unit, units in
# falling order (y M w d h m s), each at most once; a bare number is seconds; "ms" is an error when is_sec.
_TIME_UNITS = {"y": 365 * 86400, "M": 30 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_time_s(text: str, *, name: str = "time") -> int:
    """Whole seconds from nginx's time syntax as ``fail_timeout=`` reads it: ``10``, ``10s``, ``1m``, ``1h30m``.

    Like nginx 1.22.1's ngx_parse_time(&s, 1): ASCII digits, units in falling order, each once; ``500ms``
    is refused (is_sec), as is a unit without a number.
    """
    if not isinstance(text, str):
        raise TypeError(f"{name} must be text like '10s', got {shown(text)}")
    total, value, digits, last_rank = 0, 0, 0, -1
    order = list(_TIME_UNITS)
    i = 0
    while i < len(text):
        c = text[i]
        if "0" <= c <= "9":
            if digits >= 15:
                raise ValueError(f"{name} {shown(text)} is too long")
            value, digits = value * 10 + ord(c) - 48, digits + 1
            i += 1
            continue
        if c == "m" and text[i + 1:i + 2] == "s":
            raise ValueError(f"{name} {shown(text)}: milliseconds are not allowed here (nginx: whole seconds)")
        if c not in _TIME_UNITS or order.index(c) <= last_rank or not digits:
            raise ValueError(f"{name} {shown(text)} is not an nginx time (e.g. 10, 10s, 1m, 1h30m)")
        last_rank = order.index(c)
        total, value, digits = total + value * _TIME_UNITS[c], 0, 0
        i += 1
    if i == 0 or (digits == 0 and last_rank < 0):
        raise ValueError(f"{name} {shown(text)} is not an nginx time (e.g. 10, 10s, 1m, 1h30m)")
    total += value  # a trailing number without a unit is seconds
    if total > MAX_FAIL_TIMEOUT_S:
        raise ValueError(f"{name} {shown(text)} is more than {MAX_FAIL_TIMEOUT_S} s")
    return total


def with_default_port(address: object) -> object:
    """nginx's ``server 127.0.0.1;`` means port 80 (ngx_parse_url with default_port 80); so does a Peer."""
    if not isinstance(address, str) or address.startswith("unix:"):
        return address
    if address.startswith("["):
        return address + ":80" if address.endswith("]") else address
    return address if ":" in address else address + ":80"


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
        where = f"peer {shown(self.address)}"
        self.weight = validate.integer(f"{where}: weight", self.weight, 1, MAX_WEIGHT)
        self.max_fails = validate.integer(f"{where}: max_fails", self.max_fails, 0, MAX_FAILS)
        # nginx keeps fail_timeout as whole seconds (time_t, from ngx_parse_time(&s, 1))
        value = validate.number(f"{where}: fail_timeout", self.fail_timeout, 0, MAX_FAIL_TIMEOUT_S)
        if value != int(value):
            raise ValueError(f"{where}: fail_timeout={shown(self.fail_timeout)} must be whole seconds "
                             f"(nginx counts it in ngx_time() seconds)")
        self.fail_timeout = int(value)
        validate.flag(f"{where}: backup", self.backup)
        validate.flag(f"{where}: down", self.down)
        self.address = parse_target(with_default_port(self.address)).text
        self.effective_weight = self.weight

    @classmethod
    def parse(cls, spec: str) -> "Peer":
        """``HOST[:PORT][,weight=N][,max_fails=N][,fail_timeout=T][,backup][,down]`` -- an nginx ``server`` line
        with commas for spaces (the CLI's --peer).  PORT defaults to 80 as in nginx; T takes nginx's time
        units (``10``, ``10s``, ``1m``, ``1m30s``)."""
        if not isinstance(spec, str):
            raise TypeError(f"peer must be a str like '127.0.0.1:8080,weight=2', got {shown(spec)}")
        address, *params = spec.split(",")
        kwargs: dict = {}
        for param in params:
            key, sep, value = param.partition("=")
            if key in kwargs:
                raise ValueError(f"peer {shown(spec)}: {key} given twice")
            if key in ("backup", "down") and not sep:
                kwargs[key] = True
            elif key in ("weight", "max_fails") and sep:
                if not (value.isascii() and value.isdigit() and len(value) <= 30):  # ngx_atoi: ASCII digits only
                    raise ValueError(f"peer {shown(spec)}: {key}={shown(value)} is not a whole number")
                kwargs[key] = int(value)
            elif key == "fail_timeout" and sep:
                kwargs[key] = parse_time_s(value, name=f"peer {shown(spec)}: fail_timeout")
            else:
                raise ValueError(f"peer {shown(spec)}: cannot read {shown(param)} (weight=N, max_fails=N, "
                                 f"fail_timeout=T, backup, down)")
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
