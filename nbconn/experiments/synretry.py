"""When does the kernel resend a SYN, and when does it give up?  Predicted from the source, then measured.

A connect to a host that never answers is not ended by the network: the
kernel keeps resending the SYN and at some point fails the connect with
ETIMEDOUT.  nginx does not wait for that; its ``proxy_connect_timeout`` timer
(60 s by default) usually fires first.  How long the kernel would wait depends
on sysctls that changed in Linux 6.5, so this module predicts it from the
kernel's rules and measures it.

The rules (Linux 6.18 ``net/ipv4/tcp_timer.c``; read there, restated here):

* the first retransmission timeout is 1 s (``TCP_TIMEOUT_INIT``, via
  ``tcp_timeout_init``).  ``tcp_retransmit_timer`` counts the timeout (``tcp_update_rto_stats``:
  ``icsk_retransmits`` and ``tp->total_rto``), resends the SYN, and in SYN-SENT keeps the timeout
  while ``tp->total_rto <= net.ipv4.tcp_syn_linear_timeouts`` (6.5+, on total_rto since 6.8,
  default 4); otherwise it counts one more ``icsk_backoff`` and doubles the timeout (capped at
  ``TCP_RTO_MAX``, 120 s; since 6.15 ``net.ipv4.tcp_rto_max_ms``): 1, 1, 1, 1, 1, 2, 4, 8 ... s,
  with ``tcpi_backoff`` 0 through the first four retransmissions;
* each time the timer fires, ``tcp_write_timeout`` decides whether to give up,
  with two limits, whichever is reached first:

  1. a count: ``icsk_retransmits >= retries + tcp_syn_linear_timeouts``, where
     ``retries`` is the socket's ``TCP_SYNCNT`` or else ``net.ipv4.tcp_syn_retries``;
  2. a time budget: ``retransmits_timed_out`` -- the time since the first SYN
     reaches ``tcp_model_timeout(retries)``, the length of ``retries + 1`` *doubling*
     timeouts from 1 s: ``(2^(retries+1) - 1)`` s (beyond 6 retries every further one
     adds the 120 s cap: ``127 + (retries - 6) * 120`` s).  With ``TCP_USER_TIMEOUT`` set, that value
     replaces the budget, and ``tcp_clamp_rto_to_user_timeout`` shortens the next
     timer so that it fires when the user timeout runs out -- but only from the
     first retransmission on (the first timer, 1 s, is armed in ``tcp_connect``).

* the retransmission timer is an ordinary kernel timer (``timer_list``) and the
  timer wheel never fires early, only late: ``calc_index`` in
  ``kernel/time/timer.c`` rounds an expiry up to its level's granularity, which is
  8 times coarser per level (levels start at 63, 504, 4032, 32256 ... jiffies).  At
  HZ=250 a 1 s timer may fire up to 32 ms late, a 4-16 s one up to 256 ms, a 32 s
  or 64 s one up to 2.05 s.  :func:`predict` adds these bounds up.

How it is measured: non-blocking connects to the lab black hole (a listener
whose accept queue is full, so SYNs are dropped), one per setting, all at
once; every ~2 ms each socket's ``TCP_INFO`` is read and every increase of
``tcpi_total_retrans`` is timestamped (one more SYN sent); the connect's end
is the moment epoll reports it and ``SO_ERROR`` says ETIMEDOUT.
"""

from __future__ import annotations

import errno as _errno
import select
import socket
import time

from ..options import TCP_SYNCNT, TCP_USER_TIMEOUT
from ..tcpinfo import read_tcp_info

TCP_TIMEOUT_INIT_S = 1.0
TCP_RTO_MAX_S = 120.0
MAX_WAIT_S = 200.0


def _sysctl(name: str) -> int | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError):
        return None


def read_sysctls() -> dict:
    """This kernel's SYN settings: tcp_syn_retries and tcp_syn_linear_timeouts (None where absent)."""
    return {
        "tcp_syn_retries": _sysctl("net.ipv4.tcp_syn_retries"),
        "tcp_syn_linear_timeouts": _sysctl("net.ipv4.tcp_syn_linear_timeouts"),
    }


def config_hz() -> int | None:
    """The kernel's CONFIG_HZ from /proc/config.gz or /boot/config-RELEASE, or None if neither is readable."""
    import gzip
    import platform

    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{platform.release()}", open)):
        try:
            with opener(path, "rt") as f:
                hz = _config_hz_in(f)  # (a loop in a with: in a function of its own, see tests/test_interrupt_coverage.py)
        except (OSError, ValueError, EOFError):
            continue
        if hz is not None:
            return hz
    return None


def _config_hz_in(lines) -> int | None:
    for line in lines:
        if line.startswith("CONFIG_HZ="):
            return int(line.split("=", 1)[1])
    return None


def time_budget_s(retries: int) -> float:
    """tcp_model_timeout: the length of ``retries + 1`` doubling timeouts from 1 s (1 + 2 + ... + 2^retries),
    each capped at TCP_RTO_MAX (120 s, the default of tcp_rto_max_ms since 6.15)."""
    thresh = 6  # ilog2(TCP_RTO_MAX / TCP_TIMEOUT_INIT) = ilog2(120)
    if retries <= thresh:
        return ((2 << retries) - 1) * TCP_TIMEOUT_INIT_S
    return ((2 << thresh) - 1) * TCP_TIMEOUT_INIT_S + (retries - thresh) * TCP_RTO_MAX_S


def wheel_lateness_s(timeout_s: float, hz: int) -> float:
    """How late, at most, the timer wheel fires a timer armed ``timeout_s`` ahead (its level's granularity + 1 jiffy)."""
    jiffies = round(timeout_s * hz)
    level = 0
    while level < 8 and jiffies >= (63 << (3 * level)):  # LVL_START(level + 1)
        level += 1
    return ((1 << (3 * level)) + 1) / hz


def predict(retries: int, linear_timeouts: int | None, *, user_timeout_ms: int | None = None,
            hz: int | None = None) -> dict:
    """When the SYNs go out and when the kernel gives up, by the rules of ``tcp_write_timeout``.

    ``retries``: TCP_SYNCNT, or tcp_syn_retries.  ``linear_timeouts`` None means a
    kernel without the sysctl (the same as 0).  ``user_timeout_ms``: TCP_USER_TIMEOUT.
    ``hz``: CONFIG_HZ; when given, ``late_s`` bounds how much later than predicted the
    end may come (the timer wheel's rounding, summed over every timer).

    Returns sent_s (SYN send times after connect()), failed_s, limit ("count",
    "time budget", "both", or "TCP_USER_TIMEOUT"), max_retransmits, budget_s, and
    late_s (or None).
    """
    linear = linear_timeouts or 0
    max_retransmits = retries + linear  # SYN-SENT: the count limit grew by the linear timeouts in 6.5
    budget = user_timeout_ms / 1e3 if user_timeout_ms else time_budget_s(retries)
    sent, t, rto, retransmits, late = [0.0], 0.0, TCP_TIMEOUT_INIT_S, 0, 0.0
    while True:
        timeout = rto
        if user_timeout_ms and retransmits:  # tcp_clamp_rto_to_user_timeout, from the first retransmission on
            timeout = min(rto, max(budget - t, 0.0))
        t += timeout  # the retransmission timer fires
        if hz:
            late += wheel_lateness_s(timeout, hz) if timeout else 1 / hz
        by_count = retransmits >= max_retransmits
        by_time = retransmits > 0 and t >= budget  # retransmits_timed_out() is false before the first resend
        if by_count or by_time:
            limit = ("TCP_USER_TIMEOUT" if user_timeout_ms and not by_count else
                     "both" if by_count and by_time else "count" if by_count else "time budget")
            return {"sent_s": sent, "failed_s": t, "limit": limit, "max_retransmits": max_retransmits,
                    "budget_s": budget, "late_s": late if hz else None}
        sent.append(t)
        retransmits += 1
        if retransmits > linear:  # tp->total_rto > tcp_syn_linear_timeouts: the doubling branch (icsk_backoff++)
            rto = min(rto * 2, TCP_RTO_MAX_S)


def measure(*, syncnts=(1, 2, 3), default: bool = False, user_timeouts_ms=(), poll_s: float = 0.002,
            max_wait_s: float = 60.0) -> list[dict]:
    """Measure SYN retransmissions and the kernel's ETIMEDOUT, all settings at once.

    Returns one dict per connect: label, setting, sent_s (measured SYN send
    times; the first is the connect() call), failed_s (ETIMEDOUT seen) or None if
    ``max_wait_s`` passed first, errno, and predicted_s / predicted_failed_s from
    :func:`predict`.  ``default=True`` adds a connect with no TCP_SYNCNT (the
    sysctl's budget: minutes).
    """
    from ..lab import blackhole

    syncnts = list(syncnts)
    for n in syncnts:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 127:
            raise ValueError(f"TCP_SYNCNT {n!r} is outside 1..127")
    for ms in user_timeouts_ms:
        if isinstance(ms, bool) or not isinstance(ms, int) or ms <= 0:
            raise ValueError(f"TCP_USER_TIMEOUT {ms!r} must be a positive number of ms")
    if not 0 < max_wait_s <= MAX_WAIT_S:
        raise ValueError(f"max_wait_s={max_wait_s} is outside (0, {MAX_WAIT_S:g}]")
    sysctls = read_sysctls()
    hz = config_hz()
    settings = [("TCP_SYNCNT", n) for n in syncnts] + [("TCP_USER_TIMEOUT", ms) for ms in user_timeouts_ms]
    if default:
        settings.append(("default", None))

    records = []
    with blackhole() as peer, select.epoll() as ep:
        socks = []
        try:
            for kind, value in settings:
                sock = socket.socket()
                socks.append(sock)
                if kind == "TCP_SYNCNT":
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_SYNCNT, value)
                elif kind == "TCP_USER_TIMEOUT":
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, value)
                sock.setblocking(False)
                ep.register(sock.fileno(), select.EPOLLOUT)
                t0 = time.monotonic()
                err = sock.connect_ex(("127.0.0.1", peer.port))
                if err != _errno.EINPROGRESS:
                    raise OSError(err, f"connect to the black hole returned {_errno.errorcode.get(err, err)}")
                retries = value if kind == "TCP_SYNCNT" else sysctls["tcp_syn_retries"] or 6
                pred = predict(retries, sysctls["tcp_syn_linear_timeouts"],
                               user_timeout_ms=value if kind == "TCP_USER_TIMEOUT" else None, hz=hz)
                label = f"{kind}={value}" if kind != "default" else f"default (tcp_syn_retries={retries})"
                records.append({"label": label, "setting": kind, "value": value, "t0": t0, "sent_s": [0.0],
                                "seen_retrans": 0, "failed_s": None, "errno": None,
                                "predicted_s": pred["sent_s"], "predicted_failed_s": pred["failed_s"],
                                "predicted_limit": pred["limit"], "predicted_late_s": pred["late_s"]})
            _watch(ep, socks, records, poll_s, max_wait_s)
        finally:
            for sock in socks:
                sock.close()
    for rec in records:
        del rec["t0"], rec["seen_retrans"]
    return records


def _watch(ep, socks, records, poll_s: float, max_wait_s: float) -> None:
    """Poll TCP_INFO of every pending connect until each has failed or ``max_wait_s`` passed."""
    pending = {s.fileno(): (s, r) for s, r in zip(socks, records)}
    deadline = time.monotonic() + max_wait_s
    while pending and time.monotonic() < deadline:
        for fd, _ in ep.poll(poll_s):
            sock, rec = pending.pop(fd, (None, None))
            if sock is None:
                continue
            ep.unregister(fd)
            rec["failed_s"] = time.monotonic() - rec["t0"]
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            rec["errno"] = _errno.errorcode.get(err, str(err)) if err else None
        now = time.monotonic()
        for sock, rec in pending.values():
            total = read_tcp_info(sock)["total_retrans"]
            while rec["seen_retrans"] < total:  # one more SYN went out since the last look
                rec["seen_retrans"] += 1
                rec["sent_s"].append(now - rec["t0"])
