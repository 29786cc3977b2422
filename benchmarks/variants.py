"""The clients a connect storm compares: nbconn and its peers, one per process.

Every variant does the same job -- K connects to one loopback listener with at
most C in flight, each socket closed with SO_LINGER {1, 0} (close() sends RST,
so no TIME_WAIT piles up and no run exhausts the ephemeral ports) -- and
reports the same numbers:

- ``elapsed_ns``: wall time from just before the first socket() to just after
  the last close(), measured inside the process (interpreter start-up and
  imports are not in it; ``benchmarks/run.py`` measures the whole process
  separately), and ``storm_user_s``/``storm_sys_s``, the CPU time the
  process spent in user space and in the kernel over the same stretch;
- ``outcomes``: how many connected, were refused, or ended otherwise;
- ``handshake_ns``: p50/p99/min/max of the per-connect time *as the variant
  itself measures it*: for nbconn that is ``Result.handshake_ns`` (what it
  reports to users), for the others a clock read around their connect call.

Run one: ``python benchmarks/variants.py storm VARIANT --port P --k K --c C``;
it prints one JSON line.  ``benchmarks/run.py`` runs them all, interleaved.

The variants (see :data:`VARIANTS`) are deliberately plain, the way their
documentation suggests using them; none is tuned beyond what nbconn is.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import socket
import struct
import sys
import time
from collections import Counter

LINGER_RESET = struct.pack("ii", 1, 0)
_SOL, _LINGER = socket.SOL_SOCKET, socket.SO_LINGER
_now = time.monotonic_ns


class Clock:
    """Wall time and this process's user/kernel CPU time between ``Clock()`` and ``stop()``."""

    def __init__(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._user, self._sys = usage.ru_utime, usage.ru_stime
        self._t0 = _now()

    def stop(self) -> dict:
        elapsed = _now() - self._t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"elapsed_ns": elapsed, "user_s": usage.ru_utime - self._user, "sys_s": usage.ru_stime - self._sys}


def summarize(handshakes: list[int]) -> dict:
    """p50, p99, min, max by nearest rank (nbconn.stats.percentile, the rule connect_storm.c uses too)."""
    ordered = sorted(handshakes)
    if not ordered:
        return {}
    # nbconn/__init__.py imports nothing, so this adds nbconn.stats alone (math) to a bare variant's process
    from nbconn.stats import percentile

    return {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99), "min": ordered[0], "max": ordered[-1]}


def _outcome(err: int) -> str:
    return "connected" if err == 0 else "refused" if err == errno.ECONNREFUSED else "other"


# -- nbconn ------------------------------------------------------------------------------------

def storm_nbconn(host: str, port: int, k: int, c: int, *, trace: bool = True, nginx_exact: bool = False) -> dict:
    import nbconn

    targets = [f"{host}:{port}"] * k
    clock = Clock()
    results = nbconn.connect_many(targets, concurrency=c, linger=0, trace=trace, nginx_exact=nginx_exact)
    timing = clock.stop()
    outcomes = Counter(r.outcome if r.outcome in ("connected", "refused") else "other" for r in results)
    return {**timing, "outcomes": outcomes, "handshakes": [r.handshake_ns or 0 for r in results]}


def storm_nbconn_notrace(host: str, port: int, k: int, c: int) -> dict:
    return storm_nbconn(host, port, k, c, trace=False)


def storm_nbconn_exact(host: str, port: int, k: int, c: int) -> dict:
    return storm_nbconn(host, port, k, c, nginx_exact=True)


# -- a bare Python epoll loop: the floor for any pure-Python client ------------------------------

def storm_python_epoll(host: str, port: int, k: int, c: int, *, nbconn_syscalls: bool = False) -> dict:
    """nginx's flow with nothing else: no trace, no Result, no timers.

    ``nbconn_syscalls``: also make the three syscalls nbconn adds to nginx's flow
    -- getsockopt(SO_LINGER) to read the option back, getsockopt(TCP_INFO) on a
    connected socket, epoll_ctl(EPOLL_CTL_DEL) before close() -- so the kernel
    does exactly what it does for nbconn; the rest is the cost of Python.
    """
    import fcntl
    import select
    import termios

    addr = (host, port)
    on = bytearray(struct.pack("i", 1))  # as nbconn.flow passes it: a bytes argument costs ioctl() a failed parse
    mask = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
    ep = select.epoll()
    socks: dict[int, tuple[socket.socket, int]] = {}
    handshakes: list[int] = []
    outcomes: Counter = Counter()
    started = 0
    clock = Clock()
    while len(handshakes) < k:
        while started < k and len(socks) < c:
            started += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(_SOL, _LINGER, LINGER_RESET)
            if nbconn_syscalls:
                s.getsockopt(_SOL, _LINGER, 8)
            fd = s.fileno()
            fcntl.ioctl(fd, termios.FIONBIO, on)
            ep.register(fd, mask)
            t = _now()
            err = s.connect_ex(addr)
            if err == errno.EINPROGRESS:
                socks[fd] = (s, t)
            else:
                handshakes.append(_now() - t)
                outcomes[_outcome(err)] += 1
                s.close()
        for fd, _events in ep.poll(5.0, 512):
            s, t = socks.pop(fd)
            err = s.getsockopt(_SOL, socket.SO_ERROR)
            handshakes.append(_now() - t)
            outcomes[_outcome(err)] += 1
            if nbconn_syscalls:
                if err == 0:
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
                ep.unregister(fd)
            s.close()
    timing = clock.stop()
    ep.close()
    return {**timing, "outcomes": outcomes, "handshakes": handshakes}


def storm_python_epoll_nbconn_syscalls(host: str, port: int, k: int, c: int) -> dict:
    return storm_python_epoll(host, port, k, c, nbconn_syscalls=True)


# -- asyncio and uvloop -------------------------------------------------------------------------

async def _async_sock_connect(host: str, port: int, k: int, c: int, make_socket=None) -> dict:
    """C coroutines, each looping: non-blocking socket, ``await loop.sock_connect``, close.
    ``make_socket``: where step 1 happens (the lab's client namespace over the wire), default here."""
    import asyncio

    loop = asyncio.get_running_loop()
    addr = (host, port)
    todo = iter(range(k))
    handshakes: list[int] = []
    outcomes: Counter = Counter()

    async def worker() -> None:
        for _ in todo:
            s = (make_socket or socket.socket)(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(_SOL, _LINGER, LINGER_RESET)
            s.setblocking(False)
            t = _now()
            try:
                await loop.sock_connect(s, addr)
                err = 0
            except OSError as exc:
                err = exc.errno or -1
            handshakes.append(_now() - t)
            outcomes[_outcome(err)] += 1
            s.close()

    clock = Clock()
    await asyncio.gather(*(worker() for _ in range(c)))
    return {**clock.stop(), "outcomes": outcomes, "handshakes": handshakes}


async def _async_open_connection(host: str, port: int, k: int, c: int) -> dict:
    """C coroutines, each looping: ``asyncio.open_connection``, linger 0, close, wait_closed."""
    import asyncio

    todo = iter(range(k))
    handshakes: list[int] = []
    outcomes: Counter = Counter()

    async def worker() -> None:
        for _ in todo:
            t = _now()
            try:
                _reader, writer = await asyncio.open_connection(host, port)
                err = 0
            except OSError as exc:
                err, writer = exc.errno or -1, None
            handshakes.append(_now() - t)
            outcomes[_outcome(err)] += 1
            if writer is not None:
                writer.get_extra_info("socket").setsockopt(_SOL, _LINGER, LINGER_RESET)
                writer.close()
                await writer.wait_closed()

    clock = Clock()
    await asyncio.gather(*(worker() for _ in range(c)))
    return {**clock.stop(), "outcomes": outcomes, "handshakes": handshakes}


def _run_asyncio(coro_fn, host, port, k, c, *, uvloop: bool = False) -> dict:
    import asyncio

    factory = None
    if uvloop:
        import uvloop as _uvloop

        factory = _uvloop.new_event_loop
    # What asyncio.Runner(loop_factory=...) does (3.11+), spelled out so 3.10 runs it too.
    loop = (factory or asyncio.new_event_loop)()
    try:
        return loop.run_until_complete(coro_fn(host, port, k, c))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def storm_asyncio_sock_connect(host, port, k, c):
    return _run_asyncio(_async_sock_connect, host, port, k, c)


def storm_asyncio_open_connection(host, port, k, c):
    return _run_asyncio(_async_open_connection, host, port, k, c)


def storm_uvloop_sock_connect(host, port, k, c):
    return _run_asyncio(_async_sock_connect, host, port, k, c, uvloop=True)


def storm_uvloop_open_connection(host, port, k, c):
    return _run_asyncio(_async_open_connection, host, port, k, c, uvloop=True)


# -- trio ----------------------------------------------------------------------------------------

def storm_trio(host: str, port: int, k: int, c: int) -> dict:
    """C tasks in a nursery, each looping: ``trio.socket.socket``, ``await sock.connect``, close."""
    import trio

    todo = iter(range(k))
    handshakes: list[int] = []
    outcomes: Counter = Counter()
    result: dict = {}

    async def worker() -> None:
        for _ in todo:
            s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(_SOL, _LINGER, LINGER_RESET)
            t = _now()
            try:
                await s.connect((host, port))
                err = 0
            except OSError as exc:
                err = exc.errno or -1
            handshakes.append(_now() - t)
            outcomes[_outcome(err)] += 1
            s.close()

    async def main() -> None:
        clock = Clock()
        async with trio.open_nursery() as nursery:
            for _ in range(c):
                nursery.start_soon(worker)
        result.update(clock.stop())

    trio.run(main)
    return {**result, "outcomes": outcomes, "handshakes": handshakes}


# -- threads -------------------------------------------------------------------------------------

def storm_threads(host: str, port: int, k: int, c: int) -> dict:
    """C threads (started before the clock runs), each looping over blocking connects."""
    import threading

    addr = (host, port)
    todo = iter(range(k))  # next() on it is atomic under the GIL
    go = threading.Event()
    handshakes: list[int] = []
    outcomes: Counter = Counter()

    def worker() -> None:
        go.wait()
        mine, counts = [], Counter()
        for _ in todo:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(_SOL, _LINGER, LINGER_RESET)
            t = _now()
            err = s.connect_ex(addr)
            mine.append(_now() - t)
            counts[_outcome(err)] += 1
            s.close()
        handshakes.extend(mine)
        outcomes.update(counts)

    threads = [threading.Thread(target=worker) for _ in range(c)]
    for th in threads:
        th.start()
    clock = Clock()
    go.set()
    for th in threads:
        th.join()
    return {**clock.stop(), "outcomes": outcomes, "handshakes": handshakes}


#: name -> (what it is, function, module it needs or None)
VARIANTS = {
    "c": ("C epoll client, benchmarks/connect_storm.c (the kernel's yardstick)", None, None),
    "nbconn": ("nbconn.connect_many, trace on (the default), linger=0", storm_nbconn, None),
    "nbconn-notrace": ("nbconn.connect_many(trace=False), linger=0", storm_nbconn_notrace, None),
    "nbconn-exact": ("nbconn.connect_many(nginx_exact=True), trace on, linger=0: exactly nginx's syscalls "
                     "(compare with python-epoll)", storm_nbconn_exact, None),
    "python-epoll": ("a bare pure-Python epoll loop doing the same flow (the floor for Python)",
                     storm_python_epoll, None),
    "python-epoll+3": ("the bare loop plus nbconn's three extra syscalls (read-back, TCP_INFO, EPOLL_CTL_DEL): "
                       "the floor for nbconn's flow in Python", storm_python_epoll_nbconn_syscalls, None),
    "asyncio-sock_connect": ("asyncio: await loop.sock_connect on non-blocking sockets",
                             storm_asyncio_sock_connect, None),
    "asyncio-open_connection": ("asyncio: await asyncio.open_connection, then close",
                                storm_asyncio_open_connection, None),
    "uvloop-sock_connect": ("uvloop: await loop.sock_connect", storm_uvloop_sock_connect, "uvloop"),
    "uvloop-open_connection": ("uvloop: await asyncio.open_connection", storm_uvloop_open_connection, "uvloop"),
    "trio": ("trio: await trio.socket connect in nursery tasks", storm_trio, "trio"),
    "threads": ("blocking connect() in C threads", storm_threads, None),
}


def available(name: str) -> str | None:
    """None if the variant can run here, else why not."""
    module = VARIANTS[name][2]
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[bench]')"
    return None


# -- the instrument's own error: handshake time reported against the packets --------------------

def _bare_connect_once(ep, make_socket, addr: tuple) -> tuple[int, int]:
    """python-epoll's calls for one connect, alone on its epoll: (handshake_ns as it measures it, client port)."""
    import fcntl
    import select
    import termios

    s = make_socket()
    try:
        s.setsockopt(_SOL, _LINGER, LINGER_RESET)
        fd = s.fileno()
        fcntl.ioctl(fd, termios.FIONBIO, bytearray(struct.pack("i", 1)))
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
        t = _now()
        err = s.connect_ex(addr)
        if err == errno.EINPROGRESS:
            ep.poll(5.0, 8)
            err = s.getsockopt(_SOL, socket.SO_ERROR)
        handshake = _now() - t
        port = s.getsockname()[1] if err == 0 else 0
        ep.unregister(fd)
    finally:
        s.close()
    return handshake, port


def accuracy(n: int, batch: int) -> dict:
    """Each variant's handshake time minus the wire's (SYN out -> SYN-ACK in), connect by connect, on loopback.

    The packets come from an AF_PACKET socket on lo (``nbconn.lab.capture.Capture``, kernel time stamps
    converted to CLOCK_MONOTONIC): on the host's lo as root (CAP_NET_RAW), otherwise inside a lab network
    namespace of our own, where an unprivileged user holds CAP_NET_RAW (``nbconn.lab.namespace``: the
    listener, the client sockets and the packet socket are all made there).  The variants take turns in
    batches of ``batch`` connects, one connect at a time, against one listener nobody accepts from (no
    accept thread competes for the GIL): ``nbconn`` is ``connect_many(concurrency=1, keep=True, linger=0)``
    (``keep`` lets us read each client port; the handshake time ends before), ``nbconn-exact`` the same
    with nginx_exact=True, ``python-epoll`` the bare loop's calls.  Only connects with exactly one SYN and
    one SYN-ACK count (``skipped``).
    """
    import contextlib

    import nbconn
    from nbconn.lab import capture as lab_capture

    names = ("nbconn", "nbconn-exact", "python-epoll")
    diffs: dict[str, list[int]] = {name: [] for name in names}
    wires: dict[str, list[int]] = {name: [] for name in names}
    skipped = dict.fromkeys(names, 0)
    with contextlib.ExitStack() as stack:
        ns = None
        where = "the host's lo (root: CAP_NET_RAW)"
        if lab_capture.unavailable_reason() is not None:
            from nbconn.lab.namespace import namespace

            ns = stack.enter_context(namespace())
            where = "lo of a lab network namespace (unprivileged: user + net namespace)"
        make = (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)) if ns is None else ns.socket
        listener = stack.enter_context(make())
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)  # nobody accepts: the backlog bounds the connects (n per variant, at most 1300)
        addr = listener.getsockname()
        cap = stack.enter_context(lab_capture.Capture(addr[1], interface="lo", source=ns))
        using = contextlib.nullcontext if ns is None else ns.using
        ep = stack.enter_context(contextlib.closing(__import__("select").epoll()))
        target = f"127.0.0.1:{addr[1]}"
        for _ in range(-(-n // batch)):
            for name in names:
                measured = []  # (handshake_ns, client port)
                if name == "python-epoll":
                    measured = [_bare_connect_once(ep, make, addr) for _ in range(batch)]
                else:
                    with using():
                        results = nbconn.connect_many([target] * batch, concurrency=1, keep=True, linger=0,
                                                      nginx_exact=name == "nbconn-exact")
                    for r in results:
                        port = r.sock.getsockname()[1] if r.sock is not None else 0
                        r.close()
                        measured.append((r.handshake_ns or 0, port))
                time.sleep(0.005)  # the last segments reach the packet socket from softirq, just after
                by_port: dict[int, list] = {}
                for p in cap.read():
                    by_port.setdefault(p.sport if p.dir == "out" else p.dport, []).append(p)
                cap.packets.clear()
                for handshake, port in measured:
                    packets = by_port.get(port, [])
                    syns = [p.t_ns for p in packets if p.dir == "out" and p.flags == "S"]
                    synacks = [p.t_ns for p in packets if p.dir == "in" and p.flags == "SA"]
                    if not port or len(syns) != 1 or len(synacks) != 1:
                        skipped[name] += 1
                        continue
                    wires[name].append(synacks[0] - syns[0])
                    diffs[name].append(handshake - (synacks[0] - syns[0]))
        clock_error_ns = cap.offset_error_ns + abs(cap.clock_drift_ns)
        dropped = cap.dropped
    return {"where": where, "n": n, "batch": batch, "clock_error_ns": clock_error_ns, "frames_dropped": dropped,
            "variants": {name: {"count": len(diffs[name]), "skipped": skipped[name],
                                "difference_ns": summarize(diffs[name]), "wire_ns": summarize(wires[name])}
                         for name in names}}


# -- memory per in-flight connect ------------------------------------------------------------------

def memory_nbconn(n: int) -> dict:
    """Python heap per pending connect: n connects to a black hole, measured while all are in flight."""
    import tracemalloc

    import nbconn
    from nbconn.lab import blackhole

    with blackhole() as hole:
        targets = [hole] * n
        nbconn.parse_target(hole)
        seen: dict = {}
        t_stop = [0.0]

        def stop() -> bool:
            # all n are started within a few ms; measure once, well before any timer fires
            if not seen and time.monotonic() >= t_stop[0]:
                seen["current"] = tracemalloc.get_traced_memory()[0]
                return True
            return False

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t_stop[0] = time.monotonic() + 0.5
        nbconn.connect_many(targets, concurrency=n, timeout=5, linger=0, stop=stop)
        tracemalloc.stop()
    per = (seen["current"] - base) / n
    return {"variant": "nbconn", "n": n, "bytes_per_connect": round(per)}


def memory_asyncio(n: int) -> dict:
    import asyncio
    import tracemalloc

    from nbconn.lab import blackhole

    async def main(addr) -> float:
        loop = asyncio.get_running_loop()
        socks = []

        async def one() -> None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(_SOL, _LINGER, LINGER_RESET)
            s.setblocking(False)
            await loop.sock_connect(s, addr)

        base = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(asyncio.wait_for(one(), 5)) for _ in range(n)]
        await asyncio.sleep(0.5)
        current = tracemalloc.get_traced_memory()[0]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in socks:
            s.close()
        return (current - base) / n

    with blackhole() as hole:
        host, port = str(hole).rsplit(":", 1)
        tracemalloc.start()
        per = asyncio.run(main((host, int(port))))
        tracemalloc.stop()
    return {"variant": "asyncio-sock_connect", "n": n, "bytes_per_connect": round(per)}


# -- over the impairment wire -------------------------------------------------------------------------

def wire_sweep(concurrencies: list[int], rounds: int, delay_ms: float, k_per_c: int, k_min: int) -> dict:
    """Throughput vs concurrency for nbconn and asyncio over a link with a real RTT (interleaved)."""
    import asyncio

    from nbconn.lab import impaired, wire_unavailable_reason

    reason = wire_unavailable_reason()
    if reason is not None:
        return {"unavailable": reason}
    rows = []
    with impaired(delay_ms=delay_ms) as link:
        port = link.serve_listener(backlog=4096)
        host = link.server_addr
        with link.client():
            for rnd in range(rounds):
                for c in concurrencies:
                    k = max(k_min, c * k_per_c)
                    for name in ("nbconn", "asyncio-sock_connect"):
                        if name == "nbconn":
                            out = storm_nbconn(host, port, k, c)
                        else:
                            out = asyncio.run(_async_sock_connect(host, port, k, c, link.client_ns.socket))
                        rows.append({"variant": name, "c": c, "k": k, "round": rnd, "elapsed_ns": out["elapsed_ns"],
                                     "connects_per_s": k / (out["elapsed_ns"] / 1e9),
                                     "outcomes": dict(out["outcomes"]),
                                     "handshake_ns": summarize(out["handshakes"])})
        stats = link.stats()
    return {"delay_ms_each_way": delay_ms, "rows": rows, "link_stats": stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    storm = sub.add_parser("storm")
    storm.add_argument("variant", choices=[v for v in VARIANTS if v != "c"])
    storm.add_argument("--host", default="127.0.0.1")
    storm.add_argument("--port", type=int, required=True)
    storm.add_argument("--k", type=int, required=True)
    storm.add_argument("--c", type=int, required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("variant", choices=["nbconn", "asyncio-sock_connect"])
    mem.add_argument("--n", type=int, default=2000)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--n", type=int, default=1000)
    acc.add_argument("--batch", type=int, default=100)
    wire = sub.add_parser("wire")
    wire.add_argument("--c", default="1,4,16,64,256")
    wire.add_argument("--rounds", type=int, default=2)
    wire.add_argument("--delay-ms", type=float, default=10.0)
    wire.add_argument("--k-per-c", type=int, default=10)
    wire.add_argument("--k-min", type=int, default=20)
    args = parser.parse_args(argv)

    if args.mode == "storm":
        out = VARIANTS[args.variant][1](args.host, args.port, args.k, args.c)
        report = {"variant": args.variant, "k": args.k, "c": args.c, "elapsed_ns": out["elapsed_ns"],
                  "storm_user_s": out["user_s"], "storm_sys_s": out["sys_s"],
                  "outcomes": dict(out["outcomes"]), "handshake_ns": summarize(out["handshakes"])}
    elif args.mode == "memory":
        report = (memory_nbconn if args.variant == "nbconn" else memory_asyncio)(args.n)
    elif args.mode == "accuracy":
        if not 1 <= args.batch <= args.n <= 1300:
            parser.error(f"accuracy: need 1 <= --batch <= --n <= 1300 (got --n {args.n}, --batch {args.batch})")
        report = accuracy(args.n, args.batch)
    else:
        report = wire_sweep([int(x) for x in args.c.split(",")], args.rounds, args.delay_ms, args.k_per_c,
                            args.k_min)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
