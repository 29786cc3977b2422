"""The benchmarks keep working: benchmarks/run.py end to end at a tiny K.

Nothing here looks at a timing -- this machine's numbers belong in
benchmarks/results/, not in assertions.  It checks that every variant that can
run here does run, connects K times, and lands in the JSON and the Markdown
table; variants whose package is missing (uvloop and trio come with the
``bench`` extra, not the ``test`` one) must be listed as unavailable with a
reason rather than crash the run.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
K = 200


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--k", str(K), "--c", "1,8", "--rounds", "1", "--no-wire",
         "--memory-n", "100", "--import-repeats", "1", "--accuracy-n", "100", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = out.glob("*.json")
    return json.loads(result.read_text()), (out / "latest.md").read_text(), proc


def _bench_module(name: str):
    """Import a module of benchmarks/ (not a package) without leaving it on sys.path."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_every_available_variant_runs_and_connects_k_times(smoke_run):
    data, _, _ = smoke_run
    variants = _bench_module("variants")
    expected = set(variants.VARIANTS) - set(data["unavailable"])
    for c in (1, 8):
        rows = {r["variant"]: r for r in data["storm"] if r["c"] == c}
        assert set(rows) == expected, (c, set(rows) ^ expected)
        for name, row in rows.items():
            assert row["outcomes"].get("connected") == K, (name, c, row["outcomes"])
            assert row["median_ms"] > 0 and row["handshake_p50_us"] > 0
    assert not [r for r in data["runs"] if "error" in r], [r["error"] for r in data["runs"] if "error" in r]


def test_missing_packages_and_compiler_are_reported_not_fatal(smoke_run):
    data, _, _ = smoke_run
    for module, names in (("uvloop", ("uvloop-sock_connect", "uvloop-open_connection")), ("trio", ("trio",))):
        for name in names:
            if importlib.util.find_spec(module) is None:
                assert module in data["unavailable"][name]
            else:
                assert name not in data["unavailable"]
    if shutil.which("cc") is None:
        assert "compiler" in data["unavailable"]["c"]
    else:
        assert "c" not in data["unavailable"] and (BENCH / "build" / "connect_storm").exists()


def test_markdown_table_ratios_and_extras(smoke_run):
    data, md, _ = smoke_run
    assert "| C | variant |" in md and "## Idle handshake" in md and "## import nbconn" in md
    for row in data["storm"]:
        if "c" not in data["unavailable"]:
            assert row["x_c"] is not None
        assert row["x_asyncio"] is not None
    assert {m["variant"] for m in data["memory"]} == {"nbconn", "asyncio-sock_connect"}
    assert all(m["bytes_per_connect"] > 0 for m in data["memory"])
    assert data["import"]["importtime_cumulative_ms"] > 0
    assert data["machine"]["kernel"] and data["machine"]["python"]


def test_the_instruments_error_is_measured_against_the_capture_or_says_why_not(smoke_run):
    data, md, _ = smoke_run
    acc = data["accuracy"]
    assert "## The instrument's own error" in md
    if "error" in acc:  # no root and no user namespaces here: the reason is in the table instead
        assert f"Not run: {acc['error']}" in md
        return
    assert set(acc["variants"]) == {"nbconn", "nbconn-exact", "python-epoll"}
    for name, v in acc["variants"].items():
        # the listener never refuses and the capture is filtered to its port: every connect is matched
        assert v["count"] + v["skipped"] == 100 and v["count"] > 0, (name, v)
        assert v["wire_ns"]["min"] > 0, (name, v)
    assert any(g["goal"].startswith("loopback: (handshake_ns - wire") for g in data["goals"])


def test_plots_draw_from_the_result(smoke_run):
    data, _, _ = smoke_run
    plot = _bench_module("plot")
    for make in (plot.storm_figure, plot.idle_figure, plot.wire_figure):
        fig = make(data)
        assert fig.axes, make.__name__


def test_bad_arguments_are_one_line_errors():
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--variants", "nbconn,bogus", "--k", "5"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "unknown variant 'bogus'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--accuracy-n", "5000", "--k", "5"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--accuracy-n 5000" in proc.stderr and "Traceback" not in proc.stderr
