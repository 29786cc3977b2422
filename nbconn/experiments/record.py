"""Record the datasets in data/: ``python -m nbconn record NAME [--out DIR]``.

Some things a notebook should show take too long to run live (the kernel's
default SYN schedule: over two minutes) or need root (the impairment wire).
Those are recorded once, with their provenance -- machine, kernel, date,
nbconn version and the exact command -- and shipped in ``data/``;
:mod:`nbconn.experiments.data` loads them, and the notebooks say when they show recorded
rather than live numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile

from .. import __version__

#: name -> (what it is, how to make it)
RECIPES = {
    "loopback-idle": "1000 sequential connects to a listening loopback peer",
    "loopback-burst": ("a burst of 100 connects at once against listen(8) with one accept() every 5 ms, in a lab "
                       "namespace with the default tcp_syncookies=1, tcp_abort_on_overflow=0: the client's view, "
                       "the server's (accepted, queue) and the TcpExt counters, then a request on each"),
    "impaired-clean": "300 connects (20 in flight) over the impairment wire: 10 ms each way (20 ms RTT), no jitter, no loss",
    "impaired-jitter": "300 connects (20 in flight) over the impairment wire: 10 ms each way (20 ms RTT), jitter +-2 ms",
    "impaired-loss": "300 connects (20 in flight) over the impairment wire: 10 ms each way, 2% loss each way",
    "impaired-scaling": "throughput and handshake p50/p99 over the impairment wire (10 ms each way) at 1, 8, 64 in flight",
    "blackhole-syncnt": "SYN retransmissions and ETIMEDOUT against the black hole for TCP_SYNCNT 1, 2, 3",
    "syn-default": "the kernel's default SYN schedule (no TCP_SYNCNT, no app timer) until ETIMEDOUT",
}

#: The three links notebook 08 compares: dataset name -> measure.run("impaired", ...)'s arguments.  One home for
#: them, label included, so that the notebook's live run and the recording it falls back to carry the same label.
#: The same count and concurrency on each link, so that the notebook compares like with like.
IMPAIRED_RUNS = {
    "impaired-clean": {"label": "20 ms RTT", "count": 300, "concurrency": 20, "timeout": 5.0, "delay_ms": 10.0},
    "impaired-jitter": {"label": "20 ms RTT, jitter +-2 ms", "count": 300, "concurrency": 20, "timeout": 5.0,
                        "delay_ms": 10.0, "jitter_ms": 2.0, "seed": 1},
    "impaired-loss": {"label": "20 ms RTT, 2% loss", "count": 300, "concurrency": 20, "timeout": 5.0,
                      "delay_ms": 10.0, "loss": 0.02, "seed": 1},
}


def _make(name: str):
    from . import measure, synretry

    if name == "loopback-idle":
        return measure.run("listening", count=1000, timeout=1.0, label="loopback idle").to_dict()
    if name == "loopback-burst":
        from . import acceptq
        from ..lab.namespace import namespace

        with namespace(sysctls={"net.ipv4.tcp_syncookies": 1, "net.ipv4.tcp_abort_on_overflow": 0}) as ns:
            return acceptq.burst(ns, count=100, backlog=8, interval_s=0.005, read_timeout_s=1.0)
    if name == "impaired-scaling":
        return {"rows": measure.scaling("impaired", [1, 8, 64], count=64, label="20 ms RTT", delay_ms=10,
                                        linger=0)}
    if name in IMPAIRED_RUNS:
        return measure.run("impaired", **IMPAIRED_RUNS[name]).to_dict()
    if name == "blackhole-syncnt":
        return {"sysctls": synretry.read_sysctls(), "config_hz": synretry.config_hz(),
                "runs": synretry.measure(syncnts=(1, 2, 3), max_wait_s=40)}
    if name == "syn-default":
        return {"sysctls": synretry.read_sysctls(), "config_hz": synretry.config_hz(),
                "runs": synretry.measure(syncnts=(), default=True, max_wait_s=180)}
    raise ValueError(f"unknown dataset {name!r} (known: {', '.join(RECIPES)})")


def provenance(name: str, argv: list[str]) -> dict:
    uname = platform.uname()
    return {
        "dataset": name,
        "description": RECIPES[name],
        "recorded": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{uname.system} {uname.node} {uname.release} {uname.version} {uname.machine}",
        "kernel": uname.release,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "nbconn": __version__,
        "command": " ".join(["python -m nbconn", *argv]),
    }


def record(name: str, out_dir: str, argv: list[str]) -> str:
    """Record dataset ``name`` into ``out_dir/NAME.json``; return the path.

    Recording can take minutes, so the output directory is proven writable first: the temporary
    file the data will go into is created before anything is measured (a unique name, so two
    recordings never share it).  The data is written there and moved into place with os.replace
    (atomic on one filesystem: readers see the old file or the new one, never half of it).  Any
    failure removes the temporary file.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(RECIPES)})")
    if not os.path.isdir(out_dir):
        raise ValueError(f"output directory {out_dir!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    except OSError as exc:  # read-only, no permission, full: say so now, not after minutes of recording
        raise ValueError(f"cannot write into output directory {out_dir!r}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a dataset is for everyone to read
        with os.fdopen(fd, "w") as f:
            payload = {"provenance": provenance(name, argv), "data": _make(name)}
            json.dump(payload, f, indent=1, default=str)
            f.write("\n")
        path = os.path.join(out_dir, f"{name}.json")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
