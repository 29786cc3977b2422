"""Notebook 00: connect_nonb, twenty lines on the page, connects as nginx 1.22.1 does.

Its outcomes, its syscalls under strace next to nbconn's nginx-exact mode and the recorded nginx worker
(nbconn.experiments.nb00), the notebook showing it verbatim, and the tables the notebook prints.
"""

import pytest

from nbconn import lab
from nbconn.experiments import nb00
from nbconn.strace import format_ns
from nbconn.experiments.table import Table


def test_table_renders_text_and_html_with_highlight():
    t = Table(["a", "b"], [[1, "x"], [22, "y"]], title="t", highlight=lambda r: r[0] == "22")
    text = repr(t)
    assert text.splitlines()[0] == "t" and text.endswith("<-")
    assert "<table>" in t._repr_html_() and "background" in t._repr_html_()


def test_extras_title_counts_the_rows_it_shows():
    import nbconn

    with lab.listening(hold=True) as up:
        table = nb00.extras_beyond_nginx(nbconn.connect(up))
    counted = sum(int(r[1]) for r in table.rows)
    assert table.title == f"beyond nginx 1.22.1: {counted} extra syscalls in this trace"
    assert any(r[0].startswith("SOCK_CLOEXEC") and r[1] == "0" for r in table.rows), "a flag is not a syscall"


def test_duration_units():
    """The notebooks' one duration formatter (imported there as ``duration``): µs, ms from 1 ms, s from 1 s."""
    assert format_ns(52_300) == "52.3 µs" and format_ns(200_336_300) == "200.3 ms"
    assert format_ns(12.5e9) == "12.50 s" and format_ns(1.5e9) == "1.50 s"


# -- the code on the page (notebook 00) --------------------------------------------------

def _strace(code: str) -> list[tuple]:
    from .conftest import require_tool

    require_tool("strace")
    return nb00.strace_python(code)


def test_connect_nonb_makes_nginx_syscalls_in_nginx_order():
    with lab.listening(hold=True) as target:
        host, port = target.rsplit(":", 1)
        plain = _strace(f"from nbconn.connect_nonb import connect_nonb; print(connect_nonb({host!r}, {port}))")
    assert plain == list(nb00.NGINX_WORKER_CALLS), plain


@pytest.mark.parametrize("peer", ["listening", "refused", "blackhole"])
def test_connect_nonb_matches_nbconn_in_nginx_exact_mode(peer):
    """Connected, refused (SO_ERROR 111) and timed out (the timer: no SO_ERROR read): the same calls in the same order."""
    start = {"listening": lambda: lab.listening(hold=True), "refused": lab.refused, "blackhole": lab.blackhole}[peer]
    with start() as target:
        host, port = target.rsplit(":", 1)
        plain = _strace(f"from nbconn.connect_nonb import connect_nonb; connect_nonb({host!r}, {port}, 0.2)")
        exact = _strace(f"import nbconn; nbconn.connect({target!r}, nginx_exact=True, timeout=0.2)")
    assert plain == exact, (plain, exact)
    if peer == "blackhole":
        assert ("getsockopt", "SO_ERROR") not in plain and plain[-1] == ("close",)


def test_connect_nonb_outcomes():
    from nbconn.connect_nonb import connect_nonb

    with lab.listening(hold=True) as up, lab.refused() as closed, lab.blackhole() as hole:
        def run(t, timeout_s=2.0):
            host, port = t.rsplit(":", 1)
            return connect_nonb(host, int(port), timeout_s)

        assert run(up).startswith("NGX_OK")
        assert run(closed) == "NGX_ERROR: ECONNREFUSED, try the next peer"
        assert run(hole, 0.05).startswith("NGX_HTTP_UPSTREAM_FT_TIMEOUT")


def test_notebook_00_shows_connect_nonb_character_for_character():
    import inspect
    import json
    import os

    from nbconn import connect_nonb

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "00_start_here.ipynb")
    with open(path) as f:
        cells = json.load(f)["cells"]
    shown = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    wanted = inspect.getsource(connect_nonb.connect_nonb).rstrip()
    assert any(wanted in src for src in shown), "notebook 00 must show nbconn/connect_nonb.py's function unchanged"




def test_options_table_marks_what_the_kernel_changed():
    """Notebook 01's step-2 table: SO_RCVBUF 4096 is kept doubled, so its row says the kernel changed it."""
    import nbconn
    from nbconn.experiments.table import options_table

    with lab.listening() as target:
        res = nbconn.connect(target, rcvbuf=4096, nodelay=True)
    rows = {r[0]: r[1:] for r in options_table(res).rows}
    assert rows["rcvbuf"] == ["4096", "8192", "yes"], rows
    assert rows["nodelay"][2] == "no", rows
