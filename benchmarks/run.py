"""nbconn's benchmarks: nbconn next to asyncio, uvloop, trio, threads and a C client, in one run.

Run with ``./dev bench`` (installs the ``bench`` extra: uvloop, trio), or
``.venv/bin/python benchmarks/run.py --help``.  See benchmarks/README.md for
what each number means; in short:

1. **Connect storm** on loopback: K connects with C in flight against a fast
   accept server (``servers.py``) pinned to one core, the client pinned to the
   other.  Every variant is a fresh process (``variants.py``, or the C client
   ``connect_storm.c``), and the variants run interleaved -- A B C ... A B C
   ... -- for several rounds, so that a slow minute on a shared machine hits
   all of them alike.  Reported: the median of the in-process storm time,
   min..max, and the ratio of medians to the C client and to asyncio.
2. **Idle handshake** (the C = 1 storm): p50/p99 of the handshake time each
   variant measures; for nbconn, what ``Result.handshake_ns`` reports.
3. **Memory per in-flight connect** (Python heap, tracemalloc), nbconn and asyncio.
4. **import time** of ``import nbconn``: ``python -X importtime`` and a
   subprocess wall-clock difference, medians.
5. **Over the impairment wire** (20 ms RTT, needs root and namespaces):
   throughput vs concurrency for nbconn and asyncio.

Results: ``benchmarks/results/<date>.json`` and ``benchmarks/results/latest.md``
(or ``--out DIR``).  Nothing here is part of the timed test suite;
``tests/test_bench_smoke.py`` runs it at a tiny K without looking at timings.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import variants  # noqa: E402  (benchmarks/variants.py, next to this file)

C_SOURCE = HERE / "connect_storm.c"
C_BINARY = HERE / "build" / "connect_storm"
DEFAULT_VARIANTS = ["c", "nbconn", "nbconn-notrace", "nbconn-exact", "python-epoll", "python-epoll+3", "asyncio-sock_connect",
                    "asyncio-open_connection", "uvloop-sock_connect", "uvloop-open_connection", "trio", "threads"]
BASELINE_C = "c"
BASELINE_ASYNCIO = "asyncio-sock_connect"
# issue 20: nbconn (trace on) <= 1.20x python-epoll+3, nbconn-exact <= 1.15x python-epoll, in the same run
GOALS = {"storm_ratio_to_bare": {"nbconn": 1.20, "nbconn-exact": 1.15}, "idle_p50_extra_us": 2.0, "import_ms": 60.0,
         "accuracy_extra_us": 3.0}
RUN_TIMEOUT_S = 300


# -- the machine ---------------------------------------------------------------------------------

def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "cc": None}
    for module in ("uvloop", "trio"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    cc = shutil.which("cc")
    if cc:
        first = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()
        info["cc"] = first[0] if first else cc
    return info


def build_c_client() -> str | None:
    """Compile connect_storm.c into benchmarks/build/ if a compiler is here; None or why not."""
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler (cc) on this machine"
    if C_BINARY.exists() and C_BINARY.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return None
    C_BINARY.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cc failed: {proc.stderr.strip()[:200]}"
    return None


def cpus() -> tuple[int | None, int | None]:
    """(client cpu, server cpu): two different cores when there are two, else no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        return allowed[0], allowed[1]
    return None, None


# -- running one process ---------------------------------------------------------------------------

class _Popen(subprocess.Popen):
    """Popen that keeps the child's rusage (wait4) so every variant's CPU time is known."""

    def _try_wait(self, wait_flags):
        try:
            pid, status, self.rusage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            pid, status = self.pid, 0
        return pid, status


def run_measured(argv: list[str], cpu: int | None, timeout: float = RUN_TIMEOUT_S) -> dict:
    """Run a child pinned to ``cpu``; its JSON line plus wall time and CPU time of the whole process."""

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    t0 = time.perf_counter_ns()
    proc = _Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pin, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter_ns() - t0
    usage = getattr(proc, "rusage", None)
    report: dict = {}
    for line in out.decode(errors="replace").splitlines()[::-1]:
        if line.startswith("{"):
            report = json.loads(line)
            break
    if proc.returncode != 0 or not report:
        report["error"] = f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
    report["process_wall_ns"] = wall
    if usage is not None:
        report["process_user_s"], report["process_sys_s"] = usage.ru_utime, usage.ru_stime
    return report


class AcceptServer:
    """benchmarks/servers.py in a child process pinned to ``cpu``; stops when we close its stdin."""

    def __init__(self, cpu: int | None) -> None:
        argv = [sys.executable, str(HERE / "servers.py"), "accept"]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError("the accept server did not start")
        self.port = int(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> "AcceptServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def storm_argv(variant: str, port: int, k: int, c: int) -> list[str]:
    if variant == "c":
        return [str(C_BINARY), "127.0.0.1", str(port), str(k), str(c)]
    return [sys.executable, str(HERE / "variants.py"), "storm", variant, "--port", str(port), "--k", str(k),
            "--c", str(c)]


# -- the parts -------------------------------------------------------------------------------------

def run_storms(names: list[str], ks: int, cs: list[int], rounds: int, log) -> list[dict]:
    client_cpu, server_cpu = cpus()
    runs = []
    with AcceptServer(server_cpu) as server:
        for rnd in range(rounds):
            for c in cs:
                for name in names:
                    report = run_measured(storm_argv(name, server.port, ks, c), client_cpu)
                    report.update(variant=name, c=c, k=ks, round=rnd)
                    runs.append(report)
                    if "error" in report:
                        log(f"  round {rnd + 1} C={c:<4} {name:<24} ERROR {report['error']}")
                    else:
                        log(f"  round {rnd + 1} C={c:<4} {name:<24} {report['elapsed_ns'] / 1e6:8.1f} ms")
    return runs


def import_time(repeats: int) -> dict:
    """``import nbconn``: -X importtime's cumulative µs, and the wall-clock cost over a bare interpreter."""
    cumulative, with_import, bare = [], [], []
    pattern = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|\s*nbconn$")
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nbconn"], capture_output=True,
                              text=True, cwd=ROOT)
        for line in proc.stderr.splitlines():
            m = pattern.search(line)
            if m:
                cumulative.append(int(m.group(1)))
        for argv, into in (([sys.executable, "-c", "import nbconn"], with_import), ([sys.executable, "-c", "pass"], bare)):
            t0 = time.perf_counter_ns()
            subprocess.run(argv, check=True, cwd=ROOT)
            into.append(time.perf_counter_ns() - t0)
    return {
        "importtime_cumulative_ms": statistics.median(cumulative) / 1e3 if cumulative else None,
        "subprocess_extra_ms": (statistics.median(with_import) - statistics.median(bare)) / 1e6,
        "subprocess_python_ms": statistics.median(bare) / 1e6,
        "repeats": repeats,
    }


def memory(n: int) -> list[dict]:
    out = []
    for name in ("nbconn", "asyncio-sock_connect"):
        report = run_measured([sys.executable, str(HERE / "variants.py"), "memory", name, "--n", str(n)], None,
                              timeout=120)
        report.setdefault("variant", name)
        out.append(report)
    return out


def accuracy(n: int, cpu: int | None) -> dict:
    """The instrument's own error against a packet capture on lo (variants.accuracy), pinned like a storm."""
    argv = [sys.executable, str(HERE / "variants.py"), "accuracy", "--n", str(n), "--batch", str(min(n, 100))]
    return run_measured(argv, cpu, timeout=300)


def wire(cs: list[int], rounds: int) -> dict:
    argv = [sys.executable, str(HERE / "variants.py"), "wire", "--c", ",".join(map(str, cs)), "--rounds",
            str(rounds), "--delay-ms", "10", "--k-per-c", "20"]
    return run_measured(argv, None, timeout=600)


# -- summaries -------------------------------------------------------------------------------------

def summarize_storms(runs: list[dict]) -> list[dict]:
    """One row per (variant, C): median/min/max of the storm time and ratios of medians."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if "error" not in run:
            groups.setdefault((run["variant"], run["c"]), []).append(run)
    rows = []
    for (name, c), group in groups.items():
        elapsed = [r["elapsed_ns"] for r in group]
        walls = [r["process_wall_ns"] for r in group]
        k = group[0]["k"]
        user_us = [r.get("storm_user_s", 0) / k * 1e6 for r in group]
        sys_us = [r.get("storm_sys_s", 0) / k * 1e6 for r in group]
        rows.append({
            "variant": name, "c": c, "k": group[0]["k"], "runs": len(group),
            "median_ms": statistics.median(elapsed) / 1e6, "min_ms": min(elapsed) / 1e6,
            "max_ms": max(elapsed) / 1e6,
            "connects_per_s": group[0]["k"] / (statistics.median(elapsed) / 1e9),
            "process_wall_ms": statistics.median(walls) / 1e6,
            "user_us_per_connect": statistics.median(user_us), "kernel_us_per_connect": statistics.median(sys_us),
            "handshake_p50_us": statistics.median(r["handshake_ns"]["p50"] for r in group) / 1e3,
            "handshake_p99_us": statistics.median(r["handshake_ns"]["p99"] for r in group) / 1e3,
            "outcomes": group[-1]["outcomes"],
        })
    by_key = {(r["variant"], r["c"]): r for r in rows}
    for row in rows:
        for label, base in (("x_c", BASELINE_C), ("x_asyncio", BASELINE_ASYNCIO)):
            ref = by_key.get((base, row["c"]))
            row[label] = row["median_ms"] / ref["median_ms"] if ref else None
            row[label + "_process"] = row["process_wall_ms"] / ref["process_wall_ms"] if ref else None
    order = {name: i for i, name in enumerate(DEFAULT_VARIANTS)}
    rows.sort(key=lambda r: (r["c"], order.get(r["variant"], 99)))
    return rows


def check_goals(rows: list[dict], imports: dict | None, acc: dict | None = None) -> list[dict]:
    goals = []
    by_key = {(r["variant"], r["c"]): r for r in rows}
    # issue 13: nbconn against the bare Python loop making the same syscalls, in the same run
    for c in (64, 512):
        for mine, floor in (("nbconn", "python-epoll+3"), ("nbconn-exact", "python-epoll")):
            row, base = by_key.get((mine, c)), by_key.get((floor, c))
            if row and base and base["median_ms"]:
                ratio, goal = row["median_ms"] / base["median_ms"], GOALS["storm_ratio_to_bare"][mine]
                goals.append({"goal": f"{mine} storm time <= {goal}x {floor}, C={c}",
                              "value": round(ratio, 3), "met": ratio <= goal})
    nb, bare = by_key.get(("nbconn", 1)), by_key.get(("python-epoll+3", 1))
    if nb and bare:
        extra = nb["handshake_p50_us"] - bare["handshake_p50_us"]
        goals.append({"goal": f"idle handshake p50 (trace on) within {GOALS['idle_p50_extra_us']} µs of "
                              "python-epoll+3's", "value": round(extra, 2), "met": extra <= GOALS["idle_p50_extra_us"]})
    measured = (acc or {}).get("variants", {})
    if measured.get("nbconn", {}).get("count") and measured.get("python-epoll", {}).get("count"):
        extra = (measured["nbconn"]["difference_ns"]["p50"] - measured["python-epoll"]["difference_ns"]["p50"]) / 1e3
        goals.append({"goal": f"loopback: (handshake_ns - wire SYN->SYN-ACK) p50 within {GOALS['accuracy_extra_us']} "
                              "µs of python-epoll's same difference", "value": round(extra, 2),
                      "met": extra <= GOALS["accuracy_extra_us"]})
    if imports and imports.get("subprocess_extra_ms") is not None:
        worst = max(imports["subprocess_extra_ms"], imports.get("importtime_cumulative_ms") or 0)
        goals.append({"goal": f"import nbconn < {GOALS['import_ms']:.0f} ms", "value": round(worst, 1),
                      "met": worst < GOALS["import_ms"]})
    return goals


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# nbconn benchmarks, {m['date'][:10]}", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
             f"uvloop {m.get('uvloop') or '–'}, trio {m.get('trio') or '–'}, C client built with "
             f"{m.get('cc') or '– (not built)'}.", "",
             f"## Connect storm: K={data['params']['k']} loopback connects, {data['params']['rounds']} interleaved "
             "rounds", "",
             "Storm time = first socket() to last close(), measured inside the process (median, min..max). "
             "xC / xasyncio: ratio of medians to the C epoll client and to asyncio `sock_connect` at the same C. "
             "process xC: whole-process wall time (interpreter start-up and imports included), as a ratio to the "
             "C client's. user / kernel: CPU time per connect during the storm, in user space and in the kernel "
             "(getrusage; medians).", "",
             "| C | variant | storm ms | min..max | connects/s | xC | xasyncio | process xC | user µs | kernel µs |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["storm"]:
        lines.append(f"| {r['c']} | {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}..{r['max_ms']:.1f} | "
                     f"{r['connects_per_s']:,.0f} | {_x(r['x_c'])} | {_x(r['x_asyncio'])} | "
                     f"{_x(r['x_c_process'])} | {r['user_us_per_connect']:.1f} | {r['kernel_us_per_connect']:.1f} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{name}`: {text}" for name, text in data.get("variants", {}).items()]
    idle = [r for r in data["storm"] if r["c"] == 1]
    if idle:
        lines += ["", "## Idle handshake (C = 1): the time each variant measures and reports", "",
                  "| variant | p50 µs | p99 µs |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['handshake_p50_us']:.1f} | {r['handshake_p99_us']:.1f} |" for r in idle]
    if data.get("memory"):
        lines += ["", "## Memory per in-flight connect (Python heap, tracemalloc)", "",
                  "| variant | in flight | bytes per connect |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r.get('n', '–')} | {r.get('bytes_per_connect', r.get('error'))} |"
                  for r in data["memory"]]
    imp = data.get("import")
    if imp:
        lines += ["", "## import nbconn", "",
                  f"`python -X importtime`: {imp['importtime_cumulative_ms']:.1f} ms cumulative; "
                  f"a subprocess `python -c 'import nbconn'` takes {imp['subprocess_extra_ms']:.1f} ms longer than "
                  f"`python -c pass` ({imp['subprocess_python_ms']:.1f} ms); medians of {imp['repeats']}."]
    acc = data.get("accuracy")
    if acc:
        lines += ["", "## The instrument's own error: handshake time minus the wire's, loopback", ""]
        if acc.get("variants"):
            lines += [f"Each connect's handshake time as the variant reports it, minus SYN out -> SYN-ACK in from an "
                      f"AF_PACKET capture on {acc['where']}; one connect at a time, the variants taking turns in "
                      f"batches of {acc['batch']} (clock conversion error {acc['clock_error_ns'] / 1e3:.2f} µs, "
                      f"frames dropped {acc['frames_dropped']}).", "",
                      "| variant | connects | wire p50 µs | difference p50 µs | p99 µs |", "|---|---:|---:|---:|---:|"]
            for name, v in acc["variants"].items():
                if v["count"]:
                    lines.append(f"| {name} | {v['count']} | {v['wire_ns']['p50'] / 1e3:.1f} | "
                                 f"{v['difference_ns']['p50'] / 1e3:.1f} | {v['difference_ns']['p99'] / 1e3:.1f} |")
        else:
            lines.append(f"Not run: {acc.get('error')}")
    w = data.get("wire")
    if w:
        lines += ["", "## Over the impairment wire (20 ms RTT)", ""]
        if w.get("rows"):
            lines += ["| C | variant | K | connects/s (median) | handshake p50 ms |", "|---:|---|---:|---:|---:|"]
            groups: dict = {}
            for row in w["rows"]:
                groups.setdefault((row["c"], row["variant"]), []).append(row)
            for (c, name), group in sorted(groups.items()):
                rate = statistics.median(g["connects_per_s"] for g in group)
                p50 = statistics.median(g["handshake_ns"]["p50"] for g in group) / 1e6
                lines.append(f"| {c} | {name} | {group[0]['k']} | {rate:,.0f} | {p50:.1f} |")
        else:
            lines.append(f"Not run: {w.get('unavailable') or w.get('error')}")
    if data.get("goals"):
        lines += ["", "## Goals", "", "| goal | value | met |", "|---|---:|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'NO'} |" for g in data["goals"]]
    if data.get("unavailable"):
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in data["unavailable"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=20_000, help="connects per storm run (default 20000)")
    parser.add_argument("--c", default="1,64,512", help="concurrencies, comma-separated (default 1,64,512)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset")
    parser.add_argument("--no-wire", action="store_true", help="skip the impairment-wire sweep")
    parser.add_argument("--wire-c", default="1,4,16,64,256", help="concurrencies over the impairment wire")
    parser.add_argument("--storm-only", action="store_true", help="only the connect storm (quick comparisons)")
    parser.add_argument("--memory-n", type=int, default=2000, help="in-flight connects for the memory probe")
    parser.add_argument("--import-repeats", type=int, default=9)
    parser.add_argument("--accuracy-n", type=int, default=1000,
                        help="connects per variant for the instrument's error against a capture on lo (0: skip)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON and latest.md go")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite latest.md from a result file")
    args = parser.parse_args(argv)
    if args.render:
        text = markdown(json.loads(args.render.read_text()))
        (args.out / "latest.md").write_text(text)
        print(text)
        return 0
    cs = [int(x) for x in args.c.split(",")]
    if not 0 <= args.accuracy_n <= 1300:  # the quiet listener's backlog bounds the connects (variants.accuracy)
        parser.error(f"--accuracy-n {args.accuracy_n}: 0 (skip) to 1300")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in variants.VARIANTS]
    if bad:
        parser.error(f"unknown variant {bad[0]!r} (known: {', '.join(variants.VARIANTS)})")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    unavailable = {}
    if "c" in names:
        why = build_c_client()
        if why:
            unavailable["c"] = why
    for name in names:
        why = variants.available(name)
        if why:
            unavailable[name] = why
    names = [n for n in names if n not in unavailable]
    for name, why in unavailable.items():
        log(f"skipping {name}: {why}")

    data = {"machine": machine(), "params": {"k": args.k, "c": cs, "rounds": args.rounds, "variants": names},
            "variants": {n: variants.VARIANTS[n][0] for n in names}, "unavailable": unavailable}
    log(f"connect storm: K={args.k}, C={cs}, {args.rounds} rounds, {len(names)} variants")
    data["runs"] = run_storms(names, args.k, cs, args.rounds, log)
    data["storm"] = summarize_storms(data["runs"])
    if not args.storm_only:
        log("memory per in-flight connect")
        data["memory"] = memory(args.memory_n)
        log("import time")
        data["import"] = import_time(args.import_repeats)
        if args.accuracy_n:
            log("the instrument's error against a packet capture on lo")
            data["accuracy"] = accuracy(args.accuracy_n, cpus()[0])
    if not (args.no_wire or args.storm_only):
        log("impairment wire sweep")
        data["wire"] = wire([int(x) for x in args.wire_c.split(",")], 2)
    data["goals"] = check_goals(data["storm"], data.get("import"), data.get("accuracy"))

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = data["machine"]["date"][:10]
    (args.out / f"{stamp}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (args.out / "latest.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
