"""Notebooks 04, 05 and 11 show their mechanism in their cells (issue 20), and the packet capture is an instrument.

A tutorial's code cells are its lesson: the syscalls of a non-blocking connect are written in the cell the
learner reads, once per notebook (a small function defined where it is first taught, then reused), not behind
an opaque call.  And lab/capture.py holds the instrument only (packet socket, BPF, clock, parsed segments);
the experiments that use it live in nbconn/experiments/nb11.py.
"""

import ast
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: notebook -> what its cells must write out themselves
ON_THE_PAGE = {
    "04_connect.ipynb": ("socket.socket(", "termios.FIONBIO", "connect_ex(", "socket.TCP_INFO"),
    "05_writable_then_so_error.ipynb": ("termios.FIONBIO", "ep.register(", "connect_ex(", "ep.poll(",
                                        "socket.SO_ERROR", "getpeername()", "signal.setitimer("),
    "11_packets.ipynb": ("capture.Capture(", "cap.read()", "capture.for_client_port("),
}


def _code(name: str) -> str:
    with open(os.path.join(ROOT, "notebooks", name)) as f:
        cells = json.load(f)["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("name", sorted(ON_THE_PAGE))
def test_the_calls_are_written_in_the_cells(name):
    code = _code(name)
    assert [call for call in ON_THE_PAGE[name] if call not in code] == []
    assert "explain." not in code and "from nbconn import explain" not in code


@pytest.mark.parametrize("name", ["04_connect.ipynb", "05_writable_then_so_error.ipynb"])
def test_the_bare_connect_is_written_once_and_reused(name):
    """explain.py hand-wrote the same socket/FIONBIO/connect seven times; each notebook writes it once."""
    code = _code(name)
    assert code.count("termios.FIONBIO") == 1, code.count("termios.FIONBIO")
    assert code.count("connect_ex(") >= 1


def _imports(path: str) -> set:
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found |= {f"{node.module}" if node.module else a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_capture_is_an_instrument_only():
    """lab/capture.py runs no connects and draws nothing: no api, measure, plots or experiments imported."""
    imported = _imports(os.path.join(ROOT, "nbconn", "lab", "capture.py"))
    assert imported & {"api", "measure", "plots", "experiments", "peers", "wire", "namespace"} == set(), imported
    from nbconn.lab import capture

    assert not hasattr(capture, "shoot") and not hasattr(capture, "accuracy") and not hasattr(capture, "plot_shots")
    from nbconn.experiments import nb11

    assert callable(nb11.shoot) and callable(nb11.accuracy) and nb11.Shot.__module__ == "nbconn.experiments.nb11"
