"""Issue 19's kernel review, the findings outside nbconn/nginx/why.py (whose texts tests/test_why.py checks): the words
that were wrong in nbconn/flow.py's docstring, nbconn/errors.py's SO_ERROR list and notebooks 01, 05 and 06 stay
gone, and the corrected mechanism is named.  Pure: reads text, opens no socket."""

from __future__ import annotations

import inspect
import os

import nbformat

from nbconn import errors, flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cell(notebook: str, cell_id: str) -> str:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", notebook), as_version=4)
    return next(c.source for c in nb.cells if c.get("id") == cell_id)


def test_flow_step_4_says_registering_after_connect_loses_nothing():
    """Finding 3: ep_insert polls the file, so no readiness change slips by when registering after connect()."""
    doc = " ".join(flow.__doc__.split())
    assert "slip by unseen" not in doc
    assert "registering after ``connect()`` would lose nothing" in doc and "``ep_insert``" in doc


def test_errors_so_error_list_names_no_netfilter_verdict():
    """Finding 1 (errors.py side): EPERM through SO_ERROR is a resend's failed route lookup (an IPsec block
    policy), kept in sk_err_soft; netfilter's verdict on a SYN is stored nowhere, and icmp_err_convert has no
    EACCES."""
    source = " ".join(line.strip("#: ") for line in inspect.getsource(errors).splitlines() if line.startswith("#:"))
    assert "a netfilter verdict (EPERM)" not in source
    assert "EHOSTDOWN, EACCES)" not in source
    assert "inet_sk_rebuild_header" in source and "sk_err_soft" in source and "IPsec" in source


def test_user_timeout_prose_names_the_first_check_and_the_one_jiffy_clamp():
    """Finding 6: the 1 s expiry does check TCP_USER_TIMEOUT (retransmits_timed_out says no while nothing was
    retransmitted); the resend's one-jiffy timer ends the connect."""
    for notebook, cell_id in (("01_socket_and_options.ipynb", "user-timeout-reading"),
                              ("06_timeouts.ipynb", "c68223c7")):
        text = " ".join(cell(notebook, cell_id).split())
        assert "first check happens at the first SYN retransmission" not in text
        assert "before anything checks the user timeout" not in text
        assert "one jiffy" in text and "tcp_clamp_rto_to_user_timeout" in text, (notebook, cell_id)
    text = " ".join(cell("06_timeouts.ipynb", "604d5d99").split())
    assert "retransmits_timed_out" in text and "one jiffy" in text


def test_so_error_prose_names_icmp_in_syn_sent():
    """Finding 8: in SYN-SENT an ICMP error goes to sk_err_soft only while the owner holds the lock; otherwise a
    destination unreachable ends the connect; with IP_RECVERR an established socket's goes to sk_err."""
    text = " ".join(cell("05_writable_then_so_error.ipynb", "so-error-reading").split())
    assert "SYN in flight" in text and "holds the socket lock" in text and "ends the connect in SYN-SENT" in text
    assert "IP_RECVERR" in text
