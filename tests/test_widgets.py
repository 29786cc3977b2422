"""The lab panel driven without a browser: set values, click, read the result widgets.

Real peers, real connects; the numbered sections follow issue 16's items.  Times are
only ever compared against the timeout that produced them, with generous slack."""

import struct
import time

import pytest

from nbconn import lab
from nbconn.view import widgets
from nbconn.settings import Settings

from .conftest import open_fds, wait_for

BLACK_HOLE = "black hole (SYNs dropped)"


@pytest.fixture
def panel():
    p = widgets.panel()
    yield p
    p.stop()
    assert p.wait(15)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


# -- what the panel does at all ------------------------------------------------------------------

def test_connect_shows_trace_timeline_outcome_and_options(panel):
    panel.scenario.value = "listening peer"
    panel.rcvbuf.value = "4096"
    panel.nodelay.value = True
    panel.connect()
    assert panel.result.outcome == "connected"
    assert "connected" in panel.outcome.value and "NGX_AGAIN -&gt; NGX_OK" in panel.outcome.value
    assert "ioctl(" in panel.trace.value and "EPOLL_CTL_ADD" in panel.trace.value
    assert "8192 (changed by the kernel)" in panel.options_view.value and "background" in panel.options_view.value
    assert _png_size(panel.timeline.value)[0] > 0 and panel.timeline.layout.display is None


@pytest.mark.parametrize("knob, value, words", [
    ("rcvbuf", -5, "rcvbuf=-5"),
    ("syncnt", 500, "syncnt=500"),
    ("user_timeout", -1, "user_timeout=-1"),
])
def test_bad_values_give_a_message_not_a_traceback(panel, knob, value, words):
    before = open_fds()
    getattr(panel, knob).value = str(value)
    panel.connect_button.click()
    assert "not connected" in panel.status.value and words in panel.status.value
    panel.run_button.click()
    assert "not run" in panel.status.value and words in panel.status.value
    assert open_fds() == before


def test_bad_count_and_concurrency(panel):
    panel.count.value = "0"
    panel.run()
    assert "repeat count=0 is outside 1..5000" in panel.status_text
    panel.count.value = "2.5"  # a typed point is kept and refused, not dropped (it once became 25)
    panel.run()
    assert "repeat count '2.5' is not a whole number" in panel.status_text
    panel.count.value, panel.concurrency.value = "10", "99999"
    panel.run()
    assert "concurrency=99999 is outside 1..1024" in panel.status_text


def test_runs_are_kept_and_overlaid_then_cleared(panel):
    panel.scenario.value = BLACK_HOLE
    panel.count.value, panel.concurrency.value = "4", "4"
    for t in (0.05, 0.1):
        panel.timeout.value = t
        panel.run()
    assert [m.timeout_s for m in panel.runs] == [0.05, 0.1]
    assert _png_size(panel.distribution.value)[0] > 0 and panel.distribution.layout.display is None
    panel.clear_button.click()
    assert panel.runs == [] and panel.distribution.layout.display == "none"


# -- 1. Connect runs in the background: button disabled, a clock, no queued second connect --------

def test_connect_button_runs_in_background_with_a_clock_and_ignores_a_second_click(panel):
    panel.scenario.value = BLACK_HOLE
    # 3 s: a black hole cannot end the connect sooner, so every check below happens while it runs (no guard
    # that would skip them on a slow machine)
    panel.timeout.value = 3.0
    t0 = time.monotonic()
    panel.connect_button.click()
    returned_s = time.monotonic() - t0
    assert returned_s < 2.0, f"the click handler held the kernel for {returned_s:.2f} s of a 3 s connect"
    assert panel.connect_button.disabled and panel.run_button.disabled
    assert "connecting to black hole" in panel.status_text and "up to 3.000 s" in panel.status_text
    # the clock: an elapsed time appears while the connect runs
    assert wait_for(lambda: " s (up to" in panel.status_text, 2.5), panel.status_text
    assert panel.connect_button.disabled and "connecting" in panel.status_text
    started = panel.connects_started
    panel.connect_button.click()  # a second click while it runs: answered, not queued
    assert panel.connects_started == started and "1 click ignored" in panel.status_text
    assert panel.wait(15)
    assert not panel.connect_button.disabled and not panel.run_button.disabled
    assert panel.connects_started == 1
    assert panel.result.outcome == "timed_out" and "connecting" not in panel.status_text
    assert "timed_out ETIMEDOUT in 3.0" in panel.status_text and "µs" not in panel.status_text


# -- 2. stale results are labelled "previous run" -------------------------------------------------

def test_a_refused_value_labels_the_old_result_previous_run(panel):
    panel.scenario.value = "listening peer"
    panel.connect()
    assert panel.result_header_text.startswith("last Connect: listening peer, timeout 1.000 s")
    assert "opacity" not in panel.outcome.value
    panel.rcvbuf.value = "-5"
    panel.connect()
    assert "not connected" in panel.status_text and "rcvbuf=-5" in panel.status_text
    assert "previous run" in panel.result_header.value and "was not run" in panel.result_header.value
    assert "opacity:0.45" in panel.outcome.value and "opacity:0.45" in panel.trace.value
    assert panel.timeline.layout.display == "none"
    # the red line goes once the value it was about is gone
    panel.rcvbuf_unset.value = True
    assert not panel.status_is_error and "settings changed" in panel.status_text
    panel.connect()
    assert "previous run" not in panel.result_header.value and "opacity" not in panel.outcome.value


def test_changing_a_control_labels_the_result_previous_run(panel):
    panel.scenario.value = "listening peer"
    panel.connect()
    panel.timeout.value = 0.5
    assert "previous run" in panel.result_header.value and "settings have changed" in panel.result_header.value
    panel.timeout.value = 1.0  # back to what produced the result: the label stays honest either way
    panel.connect()
    assert panel.result_header_text.startswith("last Connect:")


# -- 3. Stop counts honestly, progress is live, no stale red line --------------------------------

def test_stop_reports_finished_and_not_started_and_progress_is_live(panel):
    panel.count.value = "0"
    panel.run()  # leaves a red "not run" line ...
    assert panel.status_is_error
    panel.scenario.value = BLACK_HOLE
    panel.count.value, panel.concurrency.value = "200", "2"
    panel.timeout.value = 0.2
    panel.run_button.click()  # 200 x 0.2 s / 2 would take 20 s
    assert not panel.status_is_error and "running 0/200" in panel.status_text  # ... gone at once
    assert wait_for(lambda: any(f"running {k}/200" in panel.status_text for k in range(2, 200)), 15), \
        panel.status_text
    assert panel.stop_button.disabled is False and panel.connect_button.disabled
    panel.stop_button.click()
    assert panel.wait(5), "Stop did not end the run within 5 s"
    text = panel.status_text
    assert " finished (timed_out " in text and " not started" in text and "error" not in text, text
    m = panel.runs[-1]
    finished = int(text.split(": ")[-1].split(" finished")[0])
    not_started = int(text.split(", ")[-1].split(" not started")[0])
    assert len(m) == finished and set(m.outcome) == {"timed_out"}  # only decided connects are in the run
    assert finished + not_started <= 200 and not_started > 100
    assert "stopped after" in m.label and not panel.run_button.disabled and panel.stop_button.disabled


# -- 4. units and labels; the timeout taken exactly; SO_RCVBUF consistent with the API ------------

def test_the_panel_uses_the_one_duration_formatter():
    from nbconn import strace

    assert widgets.format_ns is strace.format_ns


def test_durations_above_a_millisecond_are_in_ms(panel):
    panel.scenario.value = BLACK_HOLE
    panel.timeout.value = 0.2
    panel.connect()
    assert "µs" not in panel.result_line() and " in 2" in panel.result_line() and " ms " in panel.result_line()
    assert ">called at</th>" in panel.trace.value and ">took</th>" in panel.trace.value and "since socket()" not in panel.trace.value


def test_typed_timeout_is_taken_exactly_and_the_slider_only_fills_it(panel):
    panel.timeout.value = 3
    assert panel.options()["timeout"] == 3.0 and panel.timeout_slider.value == 3.0
    panel.timeout.value = 2.5  # between two slider positions: the box keeps 2.5
    assert panel.options()["timeout"] == 2.5 and panel.timeout.value == 2.5
    panel.timeout_slider.value = 0.05
    assert panel.timeout.value == 0.05 and panel.options()["timeout"] == 0.05
    assert panel._describe_inputs(Settings(timeout=3.0)).count("3.000 s") == 1
    assert panel.timeout_slider.layout.width == "440px"


def test_numeric_options_are_unset_or_a_value_the_api_checks(panel):
    assert not any("0=default" in box.description for box in panel.numbers.values())
    assert all(panel.unset[name].value for name in panel.numbers)
    assert panel.options() == {"timeout": 1.0, "trigger": "edge", "nonblocking": "ioctl"}
    panel.rcvbuf.value = "0"  # typing un-ticks "unset": 0 goes to the API, which rejects it, as it should
    assert panel.rcvbuf_unset.value is False and panel.options()["rcvbuf"] == 0
    panel.connect()
    assert "rcvbuf=0 is outside 1.." in panel.status_text
    panel.rcvbuf_unset.value = True
    assert "rcvbuf" not in panel.options() and panel.rcvbuf.value == ""  # ticking "unset" empties the box


def test_an_unset_box_is_empty_with_the_kernel_default_and_typing_always_unticks(panel):
    # The learner's report: a box showing 4096 with "unset" ticked, where retyping 4096 set nothing.
    for name, box in panel.numbers.items():
        assert box.value == "" and panel.unset[name].value and box.placeholder.startswith("unset")
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        assert f.read().split()[1] in panel.rcvbuf.placeholder
    panel.rcvbuf.value = "4096"
    assert panel.rcvbuf_unset.value is False and panel.options()["rcvbuf"] == 4096
    panel.rcvbuf_unset.value = True
    panel.rcvbuf.value = "4096"  # the same value typed again still counts
    assert panel.rcvbuf_unset.value is False and panel.options()["rcvbuf"] == 4096
    panel.rcvbuf.value = ""  # emptying the box is "unset"
    assert panel.rcvbuf_unset.value is True and "rcvbuf" not in panel.options()
    assert "retransmits" in panel.syncnt.description


def test_connect_can_be_stopped(panel):
    panel.scenario.value = BLACK_HOLE
    panel.timeout.value = 60.0  # nginx's default proxy_connect_timeout
    panel.connect_button.click()
    assert wait_for(lambda: panel.stop_button.disabled is False, 5)
    assert wait_for(lambda: "connecting to" in panel.status_text, 10), panel.status_text
    started = time.monotonic()
    panel.stop_button.click()
    assert panel.wait(10), "Stop did not end the Connect"
    assert time.monotonic() - started < 10
    assert "Connect stopped" in panel.status_text and panel.stop_button.disabled
    assert not panel.connect_button.disabled and panel.result is None


def test_the_distribution_opens_beside_the_connect_and_labels_links():
    p = widgets.panel()
    assert p.one_section.selected_index == 0 and p.distribution_section.selected_index is None
    p.scenario.value = "listening peer"
    p.count.value, p.concurrency.value = "5", "5"
    p.run()
    assert p.one_section.selected_index == 0 and p.distribution_section.selected_index == 0


def test_labels_fit():
    p = widgets.panel()
    for control in p._inputs():
        # at ~7.5 px a character (JupyterLab's 13 px font) the description fits the width given to it: the
        # learner saw "TCP_SYNCNT (retransmi..." cut at 170 px
        width = getattr(getattr(control, "style", None), "description_width", "")
        if width:  # (a checkbox's label is not cut to a width)
            assert len(control.description) * 7.5 <= int(width.rstrip("px")), (control.description, width)
    longest = max(len(o) for o in p.scenario.options)
    assert int(p.scenario.layout.width.rstrip("px")) - 170 >= longest * 7.5


# -- 5. display: no broken images, a sentence before the cells run, plain status, readable plots --

def test_images_hidden_until_drawn_and_plain_text_is_a_sentence():
    for p in (widgets.panel(), widgets.timeout_slider_panel(0.2), widgets.scenario_picker_panel()):
        assert p.timeline.value == b"" and p.timeline.layout.display == "none"
        assert p.distribution.layout.display == "none"
        bundle = p._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert bundle["text/plain"].startswith("The nbconn lab panel") and "VBox" not in bundle["text/plain"]


def test_status_text_is_plain_and_plots_are_readable(panel):
    panel.syncnt.value = "500"
    panel.connect()
    assert panel.status_text.startswith("not connected: ") and "syncnt=500 is outside 1..127" in panel.status_text
    assert "<" not in panel.status_text
    panel.syncnt_unset.value = True
    panel.connect()
    width, height = _png_size(panel.timeline.value)
    assert width >= 1000 and height >= 360, (width, height)  # 10 x 3.6 in at 100 dpi


# -- 6. what the panel shows is what it uses --------------------------------------------------------

def test_shown_timeout_is_the_used_timeout(panel):
    panel.scenario.value = BLACK_HOLE
    for t in (0.2, 0.3):  # the tour's pattern: set, set again, connect
        panel.timeout.value = t
    panel.connect()
    assert panel.timeout.value == 0.3 and panel.result.handshake_ms >= 300
    assert "timeout 0.300 s" in panel.result_header.value
    assert "timer armed: 300 ms" in panel.trace.value


# -- 7. scenarios that need a word ------------------------------------------------------------------

def test_reset_after_accept_reads_once_to_show_the_rst(panel):
    before = open_fds()
    panel.scenario.value = "reset after accept"
    assert "first read" in panel.scenario_note.value
    panel.connect()
    if panel.result.outcome == "connected":
        assert "ECONNRESET" in panel.first_read and "first read" in panel.outcome.value
    else:  # the RST beat the SO_ERROR check: connect() itself saw it
        assert panel.result.outcome == "reset"
    assert open_fds() == before  # the kept socket was closed after the read


def test_slow_acceptor_offers_the_burst_that_shows_it(panel):
    panel.scenario.value = "slow acceptor (queue of 8)"
    assert "Run N" in panel.scenario_note.value and panel.use_burst_button.layout.display is None
    panel.use_burst_button.click()  # sets everything the burst needs, the timeout included
    assert (panel.count.value, panel.concurrency.value, panel.timeout.value) == ("100", "100", 3.0)
    panel.run()
    m = panel.runs[-1]
    assert m.outcome_counts().get("connected") == 100
    # the queue overflowed: part of the burst waited for the ~1 s SYN retransmission
    assert max(m.handshake_ms) >= 900, max(m.handshake_ms)
    panel.scenario.value = "listening peer"
    assert panel.use_burst_button.layout.display == "none"


def test_impaired_scenario_note_points_to_recordings_and_the_reason(monkeypatch):
    monkeypatch.setattr(lab, "wire_unavailable_reason", lambda: "cannot open /dev/net/tun: Permission denied",
                        raising=False)
    p = widgets.panel()
    p.scenario.value = "impaired link (delay/jitter/loss)"
    assert p.delay_ms.disabled and "cannot run here" in p.wire_note.value
    assert "Permission denied" in p.wire_note.value and "wire_unavailable_reason()" in p.wire_note.value
    assert "nbconn.experiments.data.load(" in p.wire_note.value
    p.connect()
    assert "impaired link cannot run here" in p.status_text


def test_impaired_scenario_runs_where_it_can():
    p = widgets.panel()
    p.scenario.value = "impaired link (delay/jitter/loss)"
    if lab.wire_unavailable_reason():
        assert p.delay_ms.disabled and "cannot run here" in p.wire_note.value
    else:
        assert not p.delay_ms.disabled
        p.delay_ms.value, p.timeout.value = 5, 1.0
        p.connect()
        assert p.result.outcome == "connected" and p.result.handshake_ms >= 9


def test_slices_for_other_notebooks():
    t = widgets.timeout_slider_panel(0.2)
    assert t.scenario.value.startswith("black hole") and t.timeout.value == 0.2
    t.connect()
    assert t.result.outcome == "timed_out"
    s = widgets.scenario_picker_panel()
    assert len(s.scenario.options) == len(widgets.SCENARIO_BY_LABEL)


def test_a_control_changed_during_a_run_labels_the_connect_result(panel):
    panel.scenario.value = "listening peer"
    panel.count.value, panel.concurrency.value = "20", "2"
    panel.connect()
    assert panel.result_header_text.startswith("last Connect:")
    panel.run_button.click()
    panel.nodelay.value = True  # while Run N goes: the Connect result above no longer matches the controls
    assert panel.wait(15)
    assert "previous run" in panel.result_header_text and "settings have changed" in panel.result_header_text


@pytest.mark.parametrize("scenario, connect_returned, errno, note", [
    ("refused (closed port)", "EINPROGRESS", "ECONNREFUSED", "connect() returns EINPROGRESS"),
    ("AF_UNIX backlog full", "EAGAIN", "EAGAIN", "answers EAGAIN at once"),
])
def test_scenario_notes_say_what_a_connect_shows(panel, scenario, connect_returned, errno, note):
    panel.scenario.value = scenario
    assert note in panel.scenario_note.value
    panel.connect()
    assert (panel.result.connect_returned, panel.result.errno) == (connect_returned, errno)


def test_timeline_step_labels_do_not_overprint(panel):
    from matplotlib.text import Text

    from nbconn.view import plots

    panel.scenario.value = BLACK_HOLE  # steps microseconds apart on an axis of 0.2 s: they used to pile up at 0
    panel.timeout.value = 0.2
    panel.connect()
    fig = plots.timeline(panel.result)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    labels = [t for t in ax.get_yticklabels() + ax.texts if isinstance(t, Text) and t.get_text()]
    assert len(labels) >= 6
    boxes = [Text.get_window_extent(t) for t in labels]
    overlapping = [(labels[i].get_text(), labels[j].get_text()) for i, a in enumerate(boxes)
                   for j, b in enumerate(boxes) if i < j and a.overlaps(b)]
    assert overlapping == []


def test_a_timed_out_connect_says_how_many_syns_went_out(panel):
    """TCP_SYNCNT counts retransmissions; the result shows the SYNs themselves (issue 21)."""
    panel.scenario.value = BLACK_HOLE
    panel.timeout.value = 1.5
    panel.syncnt.value = "1"
    panel.connect()
    assert panel.result.timer_fired and panel.result.syns_sent == 2  # the first at 0 s, the resend at ~1 s
    assert "SYNs sent before the timer fired: 2" in panel.outcome.value
