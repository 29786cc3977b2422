"""Which peer to connect to, and what to do when the connect fails: nginx's upstream round robin.

``ngx_event_connect_peer`` starts by asking the load balancer for a peer
(``pc->get``) and the upstream module decides what a failed connect means.
This module is that machinery, read from nginx's
``src/http/ngx_http_upstream_round_robin.c`` and ``src/http/ngx_http_upstream.c``:

* **Smooth weighted round robin** (``ngx_http_upstream_get_peer``): on each pick,
  every eligible peer's ``current_weight`` rises by its own ``effective_weight``
  (and that ``effective_weight`` climbs back by one towards ``weight``); the peer
  with the largest ``current_weight`` wins and pays back the sum of all eligible
  ``effective_weight`` values.  Weights 5, 1, 1 give the order a a b a c a a --
  spread out, not a a a a a b c.  Every request's first peer and every next
  peer is such a pick (the peers already tried in this request left out).
* **Failures** (``ngx_http_upstream_free_round_robin_peer``): a failed attempt
  bumps ``fails``, sets ``accessed`` and ``checked`` to now and lowers
  ``effective_weight`` by ``weight / max_fails``; from ``fails >= max_fails`` on,
  every failure logs "upstream server temporarily disabled" (round_robin.c 1.22.1,
  line 639) and the peer is left out until ``fail_timeout`` seconds have passed
  since its last failure.  ``fails`` is not counted in a time window: it only
  grows, and only a success clears it -- and only a success on a pick made after
  ``fail_timeout`` had passed (the pick sets ``checked``, lines 591-593; the
  success clears ``fails`` when ``accessed < checked``, lines 653-660).  A
  success soon after a failure clears nothing, so with ``max_fails=2`` a failure,
  a success in the same second and a failure later disable the peer.
* **A single peer** is never marked down: with one server and no backup,
  nginx skips the failure accounting altogether and allows one try per request.
* **Backup** peers are used once no primary peer is left to pick for this
  request: every primary is down, disabled, or already tried by it (the
  ``failed:`` branch of ``ngx_http_upstream_get_round_robin_peer``, lines
  487-511) -- so a request whose primaries all failed goes on to a backup.
* **Next upstream** (``ngx_http_upstream_next``): after a connect error
  (``error``), a timeout (``timeout``), or an answer whose status is listed
  (``http_502`` and the other ``http_*`` kinds, ``ngx_http_upstream_test_next``)
  the request tries the next peer if that kind is listed in
  ``proxy_next_upstream``, tries are left (``proxy_next_upstream_tries``, at most
  the number of peers) and ``proxy_next_upstream_timeout`` has not passed.
  Otherwise it ends: 502 after an error, 504 after a timeout, and an answer
  nginx did not retry goes to the client as it is.
* **No live upstreams** (``NGX_BUSY``): when no peer is eligible the request
  ends with 502 at once -- even after a timeout: NGX_HTTP_UPSTREAM_FT_NOLIVE is
  in no ``proxy_next_upstream`` mask, so ``ngx_http_upstream_next`` finalizes
  with its default status, 502.
* **A failure before connect()** (``socket()``, ``setsockopt(SO_RCVBUF)``,
  ``ioctl(FIONBIO)``, ``bind()`` for ``proxy_bind``, ``epoll_ctl``, and
  ``ngx_get_connection``'s "worker_connections are not enough") makes
  ``ngx_event_connect_peer`` return NGX_ERROR: ``ngx_http_upstream_connect``
  finalizes with 500 at once, no next peer, and
  ``ngx_http_upstream_finalize_request`` frees the peer as a *success*
  (``peer.free(.., 0)``): no failure is counted.  Its try is not in
  ``$upstream_addr`` (``u->state->peer`` is set only after that check).
* **proxy_pass https://** (``run_request(tls=TLSClient)``): a connect that succeeds is followed by the TLS
  handshake on the connect's timer; a failed handshake is next-upstream FT_ERROR, its timer FT_TIMEOUT, and both
  count against ``max_fails`` (``ngx_http_upstream_ssl_handshake``; the verdicts are :mod:`nbconn.nginx.tls`'s).

The state machine (:class:`Upstream`, :class:`Request`) does no I/O and takes
its clock as a parameter, so tests can step time by hand (the h11 way).
:func:`run_requests` drives it with real connects through :func:`nbconn.connect`.
nginx measures ``fail_timeout`` in whole seconds (``ngx_time()``); so does this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import validate
from ..errors import outcome_for
from ..targets import parse_target
from ..validate import shown

#: proxy_next_upstream's default in nginx 1.22.1 ("error timeout", ngx_http_proxy_merge_loc_conf).
NEXT_UPSTREAM_KINDS = ("error", "timeout")
#: Every kind proxy_next_upstream takes in 1.22.1 (ngx_http_proxy_next_upstream_masks, ngx_http_proxy_module.c);
#: "off" is the empty tuple.  "invalid_header" and "non_idempotent" are accepted; the model never meets them
#: (its peers send valid headers, its requests are GETs).
NEXT_UPSTREAM_ALL = ("error", "timeout", "invalid_header", "http_500", "http_502", "http_503", "http_504",
                     "http_403", "http_404", "http_429", "non_idempotent")
#: ngx_http_upstream_next_errors (ngx_http_upstream.c 1.22.1): the statuses ngx_http_upstream_test_next may retry.
HTTP_NEXT_KINDS = {500: "http_500", 502: "http_502", 503: "http_503", 504: "http_504", 403: "http_403",
                   404: "http_404", 429: "http_429"}
#: ngx_http_upstream_next's status when the request ends after a failure of that kind (its switch on ft_type).
_FINAL_STATUS = {"timeout": "504", "http_504": "504", "http_500": "500", "http_503": "503", "http_403": "403",
                 "http_404": "404", "http_429": "429"}  # anything else (error, http_502, no live upstreams): 502
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
    """nginx's ``server 127.0.0.1;`` means port 80 (ngx_parse_url with default_port 80); so does a Server."""
    if not isinstance(address, str) or address.startswith("unix:"):
        return address
    if address.startswith("["):
        return address + ":80" if address.endswith("]") else address
    return address if ":" in address else address + ":80"


@dataclass
class Server:
    """One ``server`` line of an ``upstream`` block."""

    address: str  # as nginx names it: 127.0.0.1:8080
    weight: int = 1
    max_fails: int = 1
    fail_timeout: int = 10  # whole seconds, as nginx keeps it
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
    def parse(cls, spec: str) -> "Server":
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
    """An ``upstream`` block: primary and backup peers and the round-robin state they share.

    ``clock``: nginx's ``ngx_time()``, wall-clock seconds (``time.time``, truncated to whole seconds as
    nginx's cached time is), which ``fail_timeout`` is counted on.  ``msec_clock``: ``ngx_current_msec``,
    which ``proxy_next_upstream_timeout`` is counted on; it defaults to ``clock`` when a clock is given
    (a test stepping time by hand) and to ``time.monotonic`` otherwise.
    """

    def __init__(self, peers, *, clock=None, msec_clock=None, keepalive: int = 0, keepalive_requests: int = 1000,
                 keepalive_timeout: float = 60.0, keepalive_time: float = 3600.0, name: str = "backend",
                 worker_connections: int = 0, other_connections: int = 3) -> None:
        # worker_connections: the events block's limit (0: none, the model's default).  ngx_get_connection takes
        # every connection from one pool per worker: besides the upstream's, nbconn.nginx.runner's worker holds
        # other_connections -- its listening socket, its channel to the master and the client's connection --
        # and the idle keepalive connections in the cache (measured with nginx 1.22.1: worker_connections 3
        # answers every request 500, 4 with one cached connection answers 500 when a new one is needed).
        self.worker_connections = validate.integer("worker_connections", worker_connections, 0, 1_000_000)
        self.other_connections = validate.integer("other_connections", other_connections, 0, 1_000_000)
        # name: the upstream block's name; $upstream_addr shows it for a try that found no live upstream
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {shown(name)}")
        self.name = name
        # keepalive: `keepalive N` in the upstream block -- at most N idle connections cached per worker, for
        # all peers together (ngx_http_upstream_keepalive_module); the other three are its directives, with
        # nginx 1.22.1's defaults (keepalive_module.c, lines 160-162).
        self.keepalive = validate.integer("keepalive", keepalive, 0, 10_000)
        self.keepalive_requests = validate.integer("keepalive_requests", keepalive_requests, 1, MAX_FAILS)
        self.keepalive_timeout = validate.number("keepalive_timeout", keepalive_timeout, 0, validate.MAX_TIMEOUT_S,
                                                 low_open=True)
        self.keepalive_time = validate.number("keepalive_time", keepalive_time, 0, validate.MAX_TIMEOUT_S,
                                              low_open=True)
        self.cache: list = []  # KeptConnection, most recently saved first (nginx's kp->conf->cache queue)
        peers = [p if isinstance(p, Server) else Server.parse(p) for p in peers]
        self.primary = [p for p in peers if not p.backup]
        self.backup = [p for p in peers if p.backup]
        if not self.primary:
            raise ValueError("an upstream needs at least one non-backup peer")
        self.clock = clock if clock is not None else time.time
        self.msec_clock = msec_clock if msec_clock is not None else (clock or time.monotonic)
        # ngx_http_upstream_init_round_robin: single = one primary server and no backup
        self.single = len(self.primary) == 1 and not self.backup
        # seconds nginx would have waited that the model only counted (run_request: proxy_send_timeout in the
        # stale-event corner); both clocks read that much later, as nginx's would
        self.unwaited_s = 0.0

    def now(self) -> int:
        return int(self.clock() + self.unwaited_s)  # ngx_time(): whole wall-clock seconds

    def msec_now(self) -> float:
        """ngx_current_msec, in seconds: ``msec_clock`` plus the seconds the model counted without waiting."""
        return self.msec_clock() + self.unwaited_s

    @property
    def tries(self) -> int:
        """ngx_http_upstream_tries: peers that are not `down`, primary plus backup."""
        return sum(not p.down for p in self.primary) + sum(not p.down for p in self.backup)

    def request(self, *, next_upstream=NEXT_UPSTREAM_KINDS, tries: int = 0, timeout_s: float = 0.0) -> "Request":
        """Begin a request (ngx_http_upstream_init_round_robin_peer + next_upstream settings)."""
        return Request(self, next_upstream=next_upstream, tries=tries, timeout_s=timeout_s)

    # -- ngx_http_upstream_get_peer ---------------------------------------------
    def _pick(self, group: list, tried: set) -> Server | None:
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

    # -- ngx_http_upstream_free_round_robin_peer (round_robin.c, 1.22.1, lines 600-670) ------------------
    def _free(self, peer: Server, *, failed: bool) -> bool:
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
                disabled = peer.fails >= peer.max_fails  # logged on every failure at or past max_fails (line 639)
            peer.effective_weight = max(peer.effective_weight, 0)
            return disabled
        if peer.accessed < peer.checked:
            peer.fails = 0
        return False

    # -- ngx_http_upstream_keepalive_module (1.22.1) ---------------------------------------------------
    def keepalive_get(self, address: str) -> "KeptConnection | None":
        """ngx_http_upstream_get_keepalive_peer (lines 236-301): after the round robin picked the peer, the
        most recently saved idle connection to the same address, taken out of the cache -- the connect
        step then returns NGX_DONE: no socket(), no connect().  None: connect as usual."""
        self._forget_closed()
        for i, kept in enumerate(self.cache):
            if kept.address == address:
                del self.cache[i]
                kept.requests += 1
                return kept
        return None

    def keepalive_free(self, kept: "KeptConnection") -> "KeptConnection | None":
        """ngx_http_upstream_free_keepalive_peer (lines 305-410) for a request that went well and left the
        connection reusable: save it at the head of the cache.  Returns the connection to close: this one
        when it has served keepalive_requests or lived keepalive_time, or the least recently saved one
        when the cache already holds N (nginx closes the queue's last entry)."""
        now = self.msec_clock()
        if not self.keepalive or kept.requests >= self.keepalive_requests or now - kept.started > self.keepalive_time:
            return kept
        evicted = self.cache.pop() if len(self.cache) >= self.keepalive else None
        kept.idle_since = now
        self.cache.insert(0, kept)
        return evicted

    def _forget_closed(self) -> None:
        """What ngx_http_upstream_keepalive_close_handler does whenever an idle connection becomes readable
        (the upstream closed it, or sent something unasked) or its keepalive_timeout timer fires: close it
        and drop it from the cache.  nginx's event loop does this as it happens; the model, which has no
        loop between requests, looks before each pick."""
        import select

        now = self.msec_clock()
        keep = []
        for kept in self.cache:
            stale = now - kept.idle_since > self.keepalive_timeout
            if not stale and kept.sock is not None:
                try:
                    stale = bool(select.select([kept.sock], [], [], 0)[0])
                except (OSError, ValueError):
                    stale = True
            if stale:
                kept.close()
            else:
                keep.append(kept)
        self.cache[:] = keep

    def close(self) -> None:
        """Close every cached connection (nginx: the worker exits)."""
        for kept in self.cache:
            kept.close()
        self.cache.clear()

    def __enter__(self) -> "Upstream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class KeptConnection:
    """A connection in (or on its way to) the keepalive cache: ngx_http_upstream_keepalive_cache_t."""

    address: str
    sock: object = None  # a socket, or None when the model runs without I/O
    requests: int = 1  # requests it has carried (c->requests)
    started: float = 0.0  # msec clock when it was connected (c->start_time)
    idle_since: float = 0.0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


#: nginx's log->action for each phase of an upstream try (ngx_http_upstream.c, 1.22.1: lines 1518,
#: 2081, 2364); the error log appends " while <action>" to every line it writes during that phase.
CONNECTING = "connecting to upstream"
SENDING = "sending request to upstream"
READING = "reading response header from upstream"
#: ... and for ``proxy_pass https://``, between the connect and the request (ngx_http_upstream_ssl_init_connection,
#: line 1727); equal to nbconn.nginx.tls.ACTION, which writes it into the handshake's lines (tests/test_upstream_tls.py)
SSL_HANDSHAKING = "SSL handshaking to upstream"


@dataclass
class Try:
    """One try of a request on one peer -- nginx's word: proxy_next_upstream_tries counts them (u->peer.tries)."""

    peer: str
    outcome: str  # "connected"/"ok", or what went wrong: "refused", "timed_out", "reset", "closed", ...
    connect_ms: float | None
    nginx_log: str | None = None  # the [error] line of this attempt's failure, as nginx writes it
    disabled: bool = False  # this failure disabled the peer ("upstream server temporarily disabled")
    action: str = CONNECTING  # where it ended: nginx's c->log->action (CONNECTING, SENDING, READING, ...)
    level: str | None = None  # the level of nginx_log
    reused: bool = False  # a cached keepalive connection: no socket(), no connect()
    status: int | None = None  # the upstream's HTTP status, when an answer arrived
    retried_as: str | None = None  # "http_502" etc.: ngx_http_upstream_test_next sent the request on
    ngx_error: bool = False  # a step before connect() failed: NGX_ERROR, 500, not in $upstream_addr

    @property
    def failure(self) -> str | None:
        """nginx's next-upstream kind of this attempt: None (it worked, or its answer went to the client),
        "error", "timeout", or the http_* kind it was retried as."""
        if self.outcome in ("connected", "ok"):
            return self.retried_as
        return "timeout" if self.outcome == "timed_out" else "error"


@dataclass
class Request:
    """One request's walk through the peers (ngx_http_upstream_connect / ngx_http_upstream_next)."""

    upstream: Upstream
    next_upstream: tuple = NEXT_UPSTREAM_KINDS
    tries: int = 0
    timeout_s: float = 0.0
    attempts: list = field(default_factory=list)
    # the status nginx answers the client: "200" when connected (or the upstream's own status, passed on),
    # "502", "504", "500" (a failure before connect()), ...; None while running
    result: str | None = None
    log: list = field(default_factory=list)  # the error-log lines nginx would write: "[level] message"
    nolive: bool = False  # it ended with "no live upstreams" (NGX_BUSY)

    def __post_init__(self) -> None:
        if isinstance(self.next_upstream, str):
            raise TypeError(f"next_upstream must be a tuple of kinds, got {shown(self.next_upstream)}")
        for kind in self.next_upstream:
            validate.choice("next_upstream", kind, NEXT_UPSTREAM_ALL)
        self.tries = validate.integer("tries", self.tries, 0, MAX_FAILS)
        self.timeout_s = validate.number("next-upstream timeout", self.timeout_s, 0, validate.MAX_TIMEOUT_S)
        budget = self.upstream.tries
        self.remaining = min(budget, self.tries) if self.tries else budget
        self.started = self.upstream.msec_now()
        self._tried: set = set()
        self._group = self.upstream.primary
        self.current: Server | None = None

    def next_peer(self) -> Server | None:
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
            # ngx_http_upstream_connect: rc == NGX_BUSY (ngx_http_upstream.c 1.22.1, line 1553)
            # and ngx_http_upstream_next(FT_NOLIVE): in no proxy_next_upstream mask, so it finalizes with its
            # default status, 502 -- also when the try before it timed out
            self.log.append(f"[error] no live upstreams while {CONNECTING}")
            self.nolive = True
            self.result = "502"
            return None
        self._tried.add(id(self.current))
        return self.current

    def report(self, outcome: str, connect_ms: float | None = None, *, nginx_log: str | None = None,
               level: str | None = "error", action: str = CONNECTING, reused: bool = False,
               status: int | None = None) -> None:
        """What the attempt on the current peer did: "connected" or "ok" (it worked), "timed_out", or any
        other outcome (an error); ``nginx_log``/``level``: the line nginx writes for that failure;
        ``action``: where it ended (CONNECTING, SENDING or READING); ``status``: the upstream's HTTP status
        when an answer arrived ("ok")."""
        peer, up = self.current, self.upstream
        if peer is None:
            raise RuntimeError("report() without a peer from next_peer()")
        attempt = Try(peer.address, outcome, connect_ms, nginx_log, False, action,
                          level if nginx_log else None, reused, status)
        if attempt.failure is None and status in HTTP_NEXT_KINDS:
            # ngx_http_upstream_test_next (ngx_http_upstream.c 1.22.1, lines 2510-2545): the answer is retried
            # only when its kind is listed, this is not the last try (u->peer.tries > 1: checked *before* free
            # lowers it) and proxy_next_upstream_timeout has not passed; otherwise it goes to the client as is,
            # and counts as a success.
            kind = HTTP_NEXT_KINDS[status]
            if kind in self.next_upstream and self.remaining > 1 and not self._out_of_time():
                attempt.retried_as = kind
        kind = attempt.failure
        # ngx_http_upstream_next (lines 4285-4297): 403 and 404 free the peer with NGX_PEER_NEXT, which the
        # round robin does not count as a failure; every other kind with NGX_PEER_FAILED.
        attempt.disabled = up._free(peer, failed=kind is not None and kind not in ("http_403", "http_404"))
        self.attempts.append(attempt)
        # The order nginx writes them in.  An error is logged where it happens (ngx_event_connect_peer,
        # ngx_http_upstream_test_connect, recv()/writev()), then ngx_http_upstream_next() calls peer.free
        # (ngx_http_upstream.c 1.22.1, line 4301), which logs the [warn].  A timeout is logged by
        # ngx_http_upstream_next itself, *after* peer.free (line 4307): the [warn] comes first.
        # A retried answer (http_502 ...) logs nothing but the [warn].
        lines = []
        if nginx_log:
            lines.append(f"[{attempt.level}] {nginx_log}")
        if attempt.disabled:
            warn = f"[warn] upstream server temporarily disabled while {action}"
            lines.insert(0 if kind == "timeout" else len(lines), warn)
        self.log.extend(lines)
        self.current = None
        if kind is None:
            self.result = str(status) if status else "200"
            return
        if up.single:
            self.remaining = 0  # free_round_robin_peer: pc->tries = 0 for a single peer (line 625)
        elif self.remaining:
            self.remaining -= 1
        if reused and kind == "error":
            # ngx_http_upstream_next (ngx_http_upstream.c 1.22.1, lines 4310-4313): "if (u->peer.cached && ft_type ==
            # NGX_HTTP_UPSTREAM_FT_ERROR) u->peer.tries++" -- a cached connection that failed gives its try back
            self.remaining += 1
        if self.remaining == 0 or kind not in self.next_upstream or self._out_of_time():
            self.result = _FINAL_STATUS.get(kind, "502")

    def report_ngx_error(self, nginx_log: str, level: str) -> None:
        """A step before connect() failed on the current peer (socket(), SO_RCVBUF, ioctl, bind() for
        proxy_bind, epoll_ctl, ngx_get_connection): ngx_event_connect_peer returned NGX_ERROR.

        ngx_http_upstream_connect (ngx_http_upstream.c 1.22.1, lines 1544-1550) finalizes the request with 500
        at once -- before ``u->state->peer`` is set, so the try is not named in $upstream_addr -- and
        ngx_http_upstream_finalize_request (line 4484) frees the peer with state 0: a success for the round
        robin, no failure counted, whatever ``proxy_next_upstream`` says."""
        peer, up = self.current, self.upstream
        if peer is None:
            raise RuntimeError("report_ngx_error() without a peer from next_peer()")
        up._free(peer, failed=False)
        self.attempts.append(Try(peer.address, "error", None, nginx_log, False, CONNECTING, level,
                                     ngx_error=True))
        self.log.append(f"[{level}] {nginx_log}")
        self.current = None
        self.result = "500"

    def _out_of_time(self) -> bool:
        """proxy_next_upstream_timeout has passed (ngx_current_msec - u->peer.start_time >= timeout); time nginx
        would have waited that the model only counted (``Upstream.unwaited_s``, see :func:`run_request`) included."""
        return bool(self.timeout_s) and self.upstream.msec_now() - self.started >= self.timeout_s

    @property
    def upstream_addr(self) -> str:
        """``$upstream_addr`` as nginx 1.22.1 writes it (ngx_http_upstream_addr_variable, lines 5415-5475):
        one entry per try, ", " between them; "no live upstreams" names the upstream ("backend"); a try that
        failed before connect() has no peer, and nginx writes the group separator " : " in its place."""
        names = [None if a.ngx_error else a.peer for a in self.attempts] + ([self.upstream.name] if self.nolive else [])
        if not names:
            return "-"
        out, i = [], 0
        while True:
            if names[i]:
                out.append(names[i])
            i += 1
            if i == len(names):
                break
            if names[i]:
                out.append(", ")
            else:
                out.append(" : ")
                i += 1
                if i == len(names):
                    break
        return "".join(out)

    def to_dict(self) -> dict:
        return {"attempts": [{"peer": a.peer, "outcome": a.outcome, "connect_ms": a.connect_ms, "action": a.action,
                              "disabled": a.disabled, "reused": a.reused} for a in self.attempts],
                "result": self.result, "upstream_addr": self.upstream_addr, "log": list(self.log)}


# -- driving the model with real connects ---------------------------------------------------------------

#: What nginx's proxy sends by default (proxy_http_version 1.0, the Host from proxy_pass's upstream name) ...
HTTP_REQUEST = b"GET / HTTP/1.0\r\nHost: backend\r\nConnection: close\r\n\r\n"
#: ... and with keepalive's companions `proxy_http_version 1.1; proxy_set_header Connection "";`
HTTP11_REQUEST = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
MAX_HEADER = 65536


def _exchange(sock, read_timeout: float, *, keepalive: bool = False) -> tuple:
    """Send the request and read the response header on a connected socket, as nginx's upstream does next
    (ngx_http_upstream_send_request, then ngx_http_upstream_process_header).  Returns
    (outcome, action, level, nginx_log, reusable, status); outcome "ok" when a response header arrived (status:
    its HTTP status code, else None); reusable: when the connection may go back to the keepalive cache
    (u->keepalive in nginx's proxy module: an HTTP/1.1 status line, no "Connection: close", and no body or the
    whole body read -- KEPT_AT_HEADER or KEPT_AFTER_BODY), else None."""
    import socket
    import ssl

    tls = isinstance(sock, ssl.SSLSocket)  # proxy_pass https://: the same exchange, its errors named for SSL
    # nginx reads SO_ERROR once, at the writable event, in ngx_http_upstream_send_request just before it writes
    # (ngx_http_upstream_test_connect, ngx_http_upstream.c 1.22.1, line 2076); nbconn.connect read it at the
    # same event.  Between that read and the write, nbconn spends longer than nginx (it returns a Result
    # first), so an RST landing in that gap shows up here as "writev() failed" a little more often than in
    # nginx; which of connect()/writev()/recv() sees a reset is a race in both.
    sock.settimeout(read_timeout)
    try:
        sock.sendall(HTTP11_REQUEST if keepalive else HTTP_REQUEST)
    except socket.timeout:
        return "timed_out", SENDING, "error", f"upstream timed out (110: Connection timed out) while {SENDING}", \
            False, None
    except OSError as exc:  # ssl.SSLError is an OSError too
        return _send_failed(exc, tls) + (False, None)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_HEADER:
        try:
            chunk = sock.recv(4096)
        except socket.timeout:  # process_header: c->read->timedout -> next(FT_TIMEOUT), logged there
            return "timed_out", READING, "error", \
                f"upstream timed out (110: Connection timed out) while {READING}", False, None
        except OSError as exc:
            failed = _recv_failed(exc, tls)
            if failed:
                return failed + (False, None)
            chunk = b""  # under TLS: ngx_ssl_handle_recv's clean shutdown, read as the end below
        if not chunk:  # ngx_http_upstream.c 1.22.1, line 2438
            return "closed", READING, "error", f"upstream prematurely closed connection while {READING}", False, None
        data += chunk
    return "ok", READING, None, None, _read_body(sock, data) if keepalive else None, _status_code(data)


def _send_failed(exc: OSError, tls: bool) -> tuple:
    """(outcome, action, level, line) of a failed write of the request.  Plain: ngx_writev_chain.c 1.22.1, line
    210, ngx_connection_error(c, err, "writev() failed").  Over TLS (src/event/ngx_event_openssl.c): ngx_ssl_write
    -> ngx_ssl_connection_error, "SSL_write() failed", at the level its OpenSSL reason gets (nbconn.nginx.tls's
    table), or with the errno when OpenSSL queued none."""
    import os
    import ssl

    if tls and isinstance(exc, ssl.SSLError):
        from .tls import ssl_failure

        level, text = ssl_failure("SSL_write()", exc)
        return "error", SENDING, level, f"{text} while {SENDING}"
    call = "SSL_write()" if tls else "writev()"
    return outcome_for(exc.errno or 0), SENDING, "error", \
        f"{call} failed ({exc.errno}: {os.strerror(exc.errno)}) while {SENDING}"


def _recv_failed(exc: OSError, tls: bool) -> tuple | None:
    """(outcome, action, level, line) of a failed read of the response header, or None for a read that nginx takes
    for the end of the stream.  Plain: ngx_recv.c 1.22.1, line 188, "recv() failed".  Over TLS only an OpenSSL
    error (a bad record, an alert) is "SSL_read() failed (SSL: ...)"; a read that fails with nothing in OpenSSL's
    error queue -- a reset, measured: SO_ERROR 104, yet nginx logs no SSL_read() line -- is taken by
    ngx_ssl_handle_recv for a clean shutdown ("peer shutdown SSL cleanly", NGX_DONE), and nginx then says
    "upstream prematurely closed connection"."""
    import os
    import ssl

    if not tls:
        return outcome_for(exc.errno or 0), READING, "error", \
            f"recv() failed ({exc.errno}: {os.strerror(exc.errno)}) while {READING}"
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        from .tls import ssl_failure

        level, text = ssl_failure("SSL_read()", exc)
        return "error", READING, level, f"{text} while {READING}"
    return None


def _status_code(data: bytes) -> int | None:
    """The status of ``HTTP/1.x NNN ...``, or None."""
    parts = data.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and len(parts[1]) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None


#: When nginx's proxy module sets ``u->keepalive`` (the connection may go back to the keepalive cache).
#: KEPT_AT_HEADER: with the response header, for a response without a body -- 204, 304, or no chunked encoding
#: and Content-Length: 0 (ngx_http_proxy_process_header, ngx_http_proxy_module.c 1.22.1, lines 1991-2005) --
#: so it holds whatever is done with the answer next.  KEPT_AFTER_BODY: only once the body has been read to its
#: end (the input filters), which nginx does only for an answer it passes to the client; a retried answer's body
#: is never read, and u->keepalive stays 0.
KEPT_AT_HEADER, KEPT_AFTER_BODY = "at the header", "after the body"


def _read_body(sock, data: bytes) -> str | None:
    """Read the rest of a response with Content-Length; when the connection may be kept (KEPT_AT_HEADER,
    KEPT_AFTER_BODY), or None."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 "):
        return None  # ngx_http_proxy_process_status: below HTTP/1.1 -> connection_close = 1
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"connection" and value == b"close":
            return None
        if name == b"content-length" and value.isdigit() and len(value) < 12:
            length = int(value)
        if name == b"transfer-encoding" and value == b"chunked":
            chunked = True
    if _status_code(data) in (204, 304) or (not chunked and length == 0):
        return KEPT_AT_HEADER
    if chunked or length is None or length > 1 << 20:
        return None  # the model reads only bodies of a known, small length
    try:
        while len(body) < length:
            chunk = sock.recv(min(65536, length - len(body)))
            if not chunk:
                return None
            body += chunk
    except OSError:
        return None
    return KEPT_AFTER_BODY if len(body) == length else None


#: bind() of proxy_bind's address on a socket of another family: (peer's family, proxy_bind's family) -> errno.
#: nginx makes the socket for the peer and binds proxy_bind's sockaddr to it whatever its family; the kernel
#: (measured here, tests/test_upstream.py checks it live): an AF_UNIX socket refuses any other family
#: (net/unix/af_unix.c, unix_bind: sun_family check) and an AF_INET6 one a 16-byte sockaddr_in
#: (net/ipv6/af_inet6.c, __inet6_bind: addr_len < SIN6_LEN_RFC2133), EINVAL both; an AF_INET socket takes the
#: length of a sockaddr_in6 but not its family (net/ipv4/af_inet.c, the sin_family check): EAFNOSUPPORT.
BIND_FAMILY_ERRNO = {("unix", "ipv4"): 22, ("unix", "ipv6"): 22, ("ipv6", "ipv4"): 22, ("ipv4", "ipv6"): 97}


def _families(address: str, proxy_bind: str) -> tuple:
    peer = "unix" if address.startswith("unix:") else "ipv6" if address.startswith("[") else "ipv4"
    return peer, "ipv6" if ":" in proxy_bind else "ipv4"


def _in_read_handler(res, action: str | None, outcome: str) -> bool:
    """This attempt's failure was judged in the upstream connection's read handler, with an EPOLLOUT of the same
    epoll event still to be dispatched: a connect refused or reset after EINPROGRESS (an RST gives
    EPOLLERR|EPOLLHUP|EPOLLIN|EPOLLOUT, and ngx_epoll_process_events runs the read handler first), an answer or
    error met while reading the response header, or a TLS handshake that failed on a record it read (an alert,
    the certificate, the server's Finished: EPOLLIN, and with edge-triggered epoll the whole mask, EPOLLOUT too,
    comes with it; ngx_ssl_handshake_handler is both handlers).  Not a timer (no epoll event), not a write-side
    failure."""
    if outcome == "timed_out":
        return False
    if action is None:  # judged at the connect: SO_ERROR after NGX_AGAIN
        return res is not None and res.ngx_connect == "NGX_AGAIN" and not res.connected
    return action in (READING, SSL_HANDSHAKING)


def run_request(upstream: Upstream, *, timeout: float = 1.0, next_upstream=NEXT_UPSTREAM_KINDS, tries: int = 0,
                next_upstream_timeout: float = 0.0, http: bool = False, read_timeout: float = 5.0,
                proxy_bind: str | None = None, send_timeout: float = 60.0, tls=None, **options) -> Request:
    """One request: connect to peers as nginx would until one works or the request gives up.

    ``http=False`` stops at the connect: a connected peer is a success.  ``http=True`` goes on as nginx
    does: send the request, read the response header, and only then decide -- a peer that accepts and
    then resets fails with "recv() failed (104: ...)" or "writev() failed", as nginx would log it.
    With ``Upstream(keepalive=N)`` the request is HTTP/1.1 and a connection from the keepalive cache is
    used when there is one for the picked peer (the attempt says ``reused``; no connect was made).
    ``proxy_bind``: a local IP address (no port) every connect binds to first, as nginx's ``proxy_bind``;
    a bind() that fails -- an address this host lacks (99: EADDRNOTAVAIL), or any address towards an AF_UNIX
    peer or a peer of the other IP family (22: EINVAL, 97: EAFNOSUPPORT; :data:`BIND_FAMILY_ERRNO`) -- ends the
    request with 500 (:meth:`Request.report_ngx_error`).

    ``tls``: an :class:`nbconn.nginx.tls.TLSClient` -- ``proxy_pass https://`` with its ``proxy_ssl_*`` settings (verify
    and its CA, the name, protocols, session reuse).  After a connect that succeeds, the TLS handshake runs on the
    same socket and loop (:func:`nbconn.nginx.tls.connect_tls`), and only a completed one goes on to the request.  Its
    verdict is nbconn.nginx.tls's table (:func:`nbconn.nginx.tls.handshake_verdict`), and the model does with it what
    ngx_http_upstream_ssl_handshake does (ngx_http_upstream.c 1.22.1, lines 1771-1815): a failure -- an
    SSL_do_handshake() error, the peer closing, "upstream SSL certificate verify error" or "does not match" --
    is ``ngx_http_upstream_next(NGX_HTTP_UPSTREAM_FT_ERROR)``, the timer (``c->write->timedout``, line 1807)
    FT_TIMEOUT; both free the peer with NGX_PEER_FAILED (line 4301): counted against max_fails, and the [warn]
    says "while SSL handshaking to upstream" (the action is still the handshake's when peer.free runs).  The
    timer is the connect's: ngx_http_upstream_ssl_init_connection arms proxy_connect_timeout only when no timer
    is set (line 1733), so after a connect() that needed EPOLLOUT the handshake gets what is left of it, after a
    connect() that returned 0 (AF_UNIX) a fresh one.  ``$upstream_connect_time`` covers the handshake.  After
    the handshake, errors are named as on an SSL connection (:func:`_send_failed`, :func:`_recv_failed`).  With ``tls.reuse``
    (proxy_ssl_session_reuse) the peer's session is saved and offered, as nginx's round robin keeps one per peer.

    ``send_timeout`` (proxy_send_timeout) matters in one nginx 1.22.1 corner, which the model follows: the
    one-bit stale-event check.  ngx_get_connection flips a connection slot's ``instance`` bit each time it hands
    the slot out (src/core/ngx_connection.c, lines 1142-1148), and ngx_epoll_process_events drops an event whose
    bit differs (src/event/modules/ngx_epoll_module.c, lines 844 and 909).  When a failure is judged in an
    upstream connection's read handler, the EPOLLOUT half of the same event is dispatched after it.  If within
    that handler the freed slot is handed out twice -- a next peer whose connect() fails at once (NGX_DECLINED,
    e.g. a missing AF_UNIX path), then one whose connect() is pending -- the bit is back where it was, and the old
    EPOLLOUT runs the new connection's write handler: nginx takes the pending connect for a finished one, reads
    SO_ERROR 0, writes into SYN-SENT (EAGAIN) and waits ``proxy_send_timeout`` instead of
    ``proxy_connect_timeout``: "upstream timed out (110: Connection timed out) while sending request to upstream"
    (measured: 60 s, nginx's default).  The model does not wait those seconds; it counts them
    (``Upstream.unwaited_s``): its ngx_time() and ngx_current_msec read that much later from then on.
    Scope: this needs the handlers run as each event is taken from epoll_wait, as with nginx 1.22.1's default
    ``accept_mutex off`` (src/event/ngx_event.c, line 1338).  A worker holding the accept mutex posts its events
    (line 229) and ngx_close_connection deletes a closed connection's posted events (src/core/ngx_connection.c,
    lines 1210-1216): there the stale half never runs, and the model, which follows the default, would differ.
    The model covers the connect that stays pending to the end (a peer that drops SYNs: the send timeout above).
    Once the request counts as sent (``u->request_sent``) later events skip test_connect (ngx_http_upstream.c,
    line 2076): a peer that answers the SYN late -- over a link with real delay -- with an RST would show up as
    a recv() failure, not "connect() failed"; the model, on loopback, does not meet that case.
    """
    from ..api import connect
    from ..errors import CONNECTED, errno_number, verdict
    from .tls import TLSClient, connect_tls, handshake_verdict

    if tls is not None and not isinstance(tls, TLSClient):
        raise TypeError(f"tls must be an nbconn.nginx.tls.TLSClient (proxy_pass https://), got {shown(tls)}")

    validate.flag("http", http)
    send_timeout = validate.number("send_timeout", send_timeout, 0, validate.MAX_TIMEOUT_S, low_open=True)
    if proxy_bind is not None:
        if not isinstance(proxy_bind, str):
            raise TypeError(f"proxy_bind must be an IP address as text, got {shown(proxy_bind)}")
        import ipaddress

        try:
            ipaddress.ip_address(proxy_bind)
        except ValueError:
            raise ValueError(f"proxy_bind={shown(proxy_bind)} is not an IP address (nbconn takes no port or "
                             f"variables here)") from None
    read_timeout = validate.number("read_timeout", read_timeout, 0, validate.MAX_TIMEOUT_S, low_open=True)
    keepalive = bool(upstream.keepalive)
    http = http or keepalive  # keepalive needs the exchange: it decides whether the connection is kept
    req = upstream.request(next_upstream=next_upstream, tries=tries, timeout_s=next_upstream_timeout)
    limit = 2 * (len(upstream.primary) + len(upstream.backup)) + 1  # each peer at most twice (a cached try)
    # slot_handouts: None, or how often the slot freed by a failure judged in a read handler has been handed out
    # again since, inside that same handler (see the docstring: the one-bit stale-event check)
    slot_handouts = None
    for _ in range(limit):
        peer = req.next_peer()
        if peer is None:
            break
        kept = upstream.keepalive_get(peer.address) if keepalive else None
        if kept is None and upstream.worker_connections and \
                upstream.other_connections + len(upstream.cache) + 1 > upstream.worker_connections:
            # ngx_event_connect_peer: socket(), then ngx_get_connection finds the pool empty -> NGX_ERROR
            v = verdict("get_connection", None, detail=upstream.worker_connections)
            req.report_ngx_error(v.log, v.level)
            break
        if kept is None and proxy_bind is not None and _families(peer.address, proxy_bind) in BIND_FAMILY_ERRNO:
            # nginx binds proxy_bind's sockaddr on whatever socket it made; nbconn.connect refuses that pairing by
            # name before any socket, so the model takes the kernel's answer from BIND_FAMILY_ERRNO
            v = verdict("bind", BIND_FAMILY_ERRNO[_families(peer.address, proxy_bind)], detail=proxy_bind)
            req.report_ngx_error(v.log, v.level)
            break
        if kept is None:
            if proxy_bind is not None:
                options["bind"] = proxy_bind
            if slot_handouts is not None:
                slot_handouts += 1
            if tls is not None:
                tried = connect_tls(peer.address, tls, timeout=timeout, keep=http, **options)
                res, handshaked = tried.connect, tried.handshaked
            else:
                tried = res = connect(peer.address, timeout=timeout, keep=http, **options)
                handshaked = None
            stale_write = slot_handouts is not None and slot_handouts % 2 == 0
            if res.ngx_connect == "NGX_DECLINED":
                pass  # failed at once, inside the same handler: the chain goes on
            elif stale_write:
                slot_handouts = None
            elif handshaked is not None and res.connected and not handshaked and tried.outcome != "timed_out":
                # the try ended in the TLS handshake, on the event after which SSL_do_handshake() ran last:
                if tried.waits:  # a record read after a wait: EPOLLIN (with EPOLLOUT), the read handler
                    slot_handouts = 0 if _in_read_handler(None, SSL_HANDSHAKING, tried.outcome) else None
                elif res.ngx_connect != "NGX_OK":  # the first call, in the connect's EPOLLOUT handler
                    slot_handouts = None
                # else connect() returned 0 and the first call failed: still inside the same handler
            elif handshaked is not None and res.connected:
                slot_handouts = None
            elif not _in_read_handler(res, None, res.outcome):
                slot_handouts = None
            else:
                slot_handouts = 0
            if stale_write and res.outcome == "timed_out" and tls is not None:
                # https: the stale EPOLLOUT runs ngx_http_upstream_send_request_handler, which for a connection
                # without SSL calls ngx_http_upstream_ssl_init_connection (ngx_http_upstream.c 1.22.1, lines
                # 2311-2314): SO_ERROR 0, SSL_do_handshake() on the pending connect (its write() of the
                # ClientHello finds SYN-SENT: EAGAIN, WANT_WRITE), and the connect's timer, still set (line 1733),
                # ends it as a handshake timeout -- proxy_connect_timeout, not proxy_send_timeout
                v = handshake_verdict("timeout")
                req.report(v.outcome, None, nginx_log=v.log, level=v.level, action=SSL_HANDSHAKING)
                if req.result is not None:
                    break
                continue
            if stale_write and res.outcome == "timed_out":
                # the stale EPOLLOUT: nginx writes into the pending connect and waits proxy_send_timeout
                if res.sock is not None:
                    res.sock.close()
                    res.sock = None
                upstream.unwaited_s += max(0.0, send_timeout - timeout)
                req.report("timed_out", None, nginx_log=f"upstream timed out (110: Connection timed out) while "
                           f"{SENDING}", level="error", action=SENDING)
                if req.result is not None:
                    break
                continue
            if res.ngx_decision == "NGX_ERROR" and res.ngx_next is None:
                # a step before connect() failed: NGX_ERROR.  nginx names proxy_bind's address as configured
                # (pc->local->name: "bind(198.18.0.5) failed"), without the ":0" nbconn's bind() text carries.
                line, level = res.ngx_log, res.ngx_level
                if proxy_bind is not None and line and line.startswith("bind("):
                    v = verdict("bind", errno_number(res.errno), detail=proxy_bind)
                    line, level = v.log, v.level
                req.report_ngx_error(line, level)
                break
            if handshaked is not None and res.connected:
                # proxy_pass https://: the handshake decided this try; $upstream_connect_time includes it
                connect_ms = tried.total_ns / 1e6 if tried.total_ns is not None else res.handshake_ms
                if not handshaked or not http:
                    req.report(CONNECTED if handshaked else tried.outcome, connect_ms, nginx_log=tried.ngx_log,
                               level=tried.ngx_level, action=SSL_HANDSHAKING)
                    if req.result is not None:
                        break
                    continue
                kept = KeptConnection(peer.address, tried.sock, started=upstream.msec_clock())
                tried.sock = None
            elif not (http and res.connected):
                req.report(res.outcome, res.handshake_ms, nginx_log=res.ngx_log, level=res.ngx_level)
                if req.result is not None:
                    break
                continue
            else:
                kept = KeptConnection(peer.address, res.sock, started=upstream.msec_clock())
                res.sock = None  # the KeptConnection owns it now
                connect_ms = res.handshake_ms
        else:
            connect_ms = 0.0  # $upstream_connect_time of a cached connection
        reused = kept.requests > 1
        try:
            outcome, action, level, line, reusable, status = _exchange(kept.sock, read_timeout, keepalive=keepalive)
            if tls is not None and tls.reuse:
                tls.save(peer.address, kept.sock)  # a TLS 1.3 ticket arrives with the response, as in nginx
        except BaseException:
            kept.close()
            raise
        req.report(outcome, connect_ms, nginx_log=line, level=level, action=action, reused=reused, status=status)
        # Whether the keepalive module saves the connection depends on how the answer was judged, so it is asked
        # after report(): ngx_http_upstream_next frees a retried answer's peer with NGX_PEER_FAILED, except
        # http_403/http_404 with NGX_PEER_NEXT (ngx_http_upstream.c 1.22.1, lines 4292-4301), and
        # ngx_http_upstream_free_keepalive_peer saves nothing freed as failed (keepalive_module.c, lines 323-331);
        # a 403/404 is saved only when u->keepalive was set at its header (no body), for its body is never read.
        retried = req.attempts[-1].retried_as
        if retried in ("http_403", "http_404"):
            reusable = reusable if reusable == KEPT_AT_HEADER else None
        elif retried is not None:
            reusable = None
        to_close = upstream.keepalive_free(kept) if reusable else kept
        if to_close is not None:
            to_close.close()
        failed_in_reader = req.attempts[-1].failure is not None and _in_read_handler(None, action, outcome)
        slot_handouts = 0 if failed_in_reader else None
        if req.result is not None:
            break
    return req


def run_requests(upstream: Upstream, count: int, **kwargs) -> list[Request]:
    """``count`` requests one after another through the same upstream (shared failure state)."""
    count = validate.integer("requests", count, 1, 100_000)
    return [run_request(upstream, **kwargs) for _ in range(count)]
