"""When does the kernel resend a SYN, and when does it give up?  Measured, then predicted.

A connect to a host that never answers is not ended by the network: the
kernel keeps resending the SYN on a schedule and, after a time budget, fails
the connect with ETIMEDOUT.  nginx does not wait for that; its
``proxy_connect_timeout`` timer (60 s by default) usually fires first.  How long
the kernel would wait depends on sysctls that changed in recent kernels, so
this module *measures* it and then compares with a prediction.

How the kernel decides (Linux ``net/ipv4/tcp_timer.c``, ``tcp_write_timeout``,
``tcp_retransmit_timer`` and ``tcp_model_timeout``):

* the first retransmission timeout is 1 s (``TCP_TIMEOUT_INIT``);
* Linux 6.5+ has ``net.ipv4.tcp_syn_linear_timeouts`` (default 4): the first
  that-many SYN retransmissions keep the 1 s timeout, after which it doubles
  (capped at 120 s).  Before 6.5, and with the sysctl at 0, it doubles at once:
  the textbook schedule 0, 1, 3, 7, 15, 31, 63 s;
* the retry budget is ``net.ipv4.tcp_syn_retries`` (default 6), or the socket's
  ``TCP_SYNCNT``: it is turned into a *time* budget as if the timeout had
  doubled from 1 s every time, ``(2^(n+1) - 1)`` s (``tcp_model_timeout``), and
  the connect fails at the first timer expiry at or after that time.

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

from .options import TCP_SYNCNT, TCP_USER_TIMEOUT
from .tcpinfo import read_tcp_info

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


def time_budget_s(retries: int) -> float:
    """tcp_model_timeout: the time ``retries`` doubling timeouts from 1 s would take."""
    thresh = 6  # ilog2(TCP_RTO_MAX / TCP_TIMEOUT_INIT) = ilog2(120)
    if retries <= thresh:
        return ((2 << retries) - 1) * TCP_TIMEOUT_INIT_S
    return ((2 << thresh) - 1) * TCP_TIMEOUT_INIT_S + (retries - thresh) * TCP_RTO_MAX_S


def predict(retries: int, linear_timeouts: int | None) -> dict:
    """Predicted SYN send times (s after connect()) and the time the kernel gives up.

    ``linear_timeouts`` None means a kernel without the sysctl (same as 0).
    """
    linear = linear_timeouts or 0
    budget = time_budget_s(retries)
    sent, t, rto, k = [0.0], 0.0, TCP_TIMEOUT_INIT_S, 0
    while True:
        t += rto  # the retransmission timer fires
        if t >= budget:
            return {"sent_s": sent, "failed_s": t, "budget_s": budget}
        sent.append(t)
        k += 1
        if k > linear:
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
    from .lab import blackhole

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
                pred = predict(retries, sysctls["tcp_syn_linear_timeouts"])
                label = f"{kind}={value}" if kind != "default" else f"default (tcp_syn_retries={retries})"
                if kind == "TCP_USER_TIMEOUT":  # the user timeout cuts the SYN schedule short
                    pred = {"sent_s": [t for t in pred["sent_s"] if t < value / 1e3], "failed_s": value / 1e3}
                records.append({"label": label, "setting": kind, "value": value, "t0": t0, "sent_s": [0.0],
                                "seen_retrans": 0, "failed_s": None, "errno": None,
                                "predicted_s": pred["sent_s"], "predicted_failed_s": pred["failed_s"]})
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
