"""The lab panel driven without a browser: set values, click, read the result widgets."""

import pytest

from nbconn import lab, widgets

from .conftest import open_fds


@pytest.fixture
def panel():
    p = widgets.panel()
    yield p
    p.stop()
    assert p.wait(10)


def test_connect_shows_trace_timeline_outcome_and_options(panel):
    panel.scenario.value = "listening peer"
    panel.rcvbuf.value = 4096
    panel.nodelay.value = True
    panel.connect_button.click()
    assert panel.result.outcome == "connected"
    assert "connected" in panel.outcome.value and "NGX_AGAIN -&gt; NGX_OK" in panel.outcome.value
    assert "ioctl(" in panel.trace.value and "EPOLL_CTL_ADD" in panel.trace.value
    assert "8192 (changed by the kernel)" in panel.options_view.value and "background" in panel.options_view.value
    assert panel.timeline.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_black_hole_with_short_timeout(panel):
    panel.scenario.value = "black hole (SYNs dropped)"
    panel.timeout.value = 0.2
    panel.connect_button.click()
    assert panel.result.outcome == "timed_out" and 200 <= panel.result.handshake_ms < 250
    assert "upstream timed out" in panel.outcome.value


@pytest.mark.parametrize("knob, value, words", [
    ("rcvbuf", -5, "rcvbuf=-5"),
    ("syncnt", 500, "syncnt=500"),
    ("user_timeout", -1, "user_timeout=-1"),
])
def test_bad_values_give_a_message_not_a_traceback(panel, knob, value, words):
    before = open_fds()
    getattr(panel, knob).value = value
    panel.connect_button.click()
    assert "not connected" in panel.status.value and words in panel.status.value
    panel.run_button.click()
    assert "not run" in panel.status.value and words in panel.status.value
    assert open_fds() == before


def test_bad_count_and_concurrency(panel):
    panel.count.value = 0
    panel.run()
    assert "repeat count 0" in panel.status.value
    panel.count.value, panel.concurrency.value = 10, 99999
    panel.run()
    assert "concurrency 99999" in panel.status.value


def test_runs_are_kept_and_overlaid_then_cleared(panel):
    panel.scenario.value = "black hole (SYNs dropped)"
    panel.count.value, panel.concurrency.value = 4, 4
    for t in (0.05, 0.1):
        panel.timeout.value = t
        panel.run()
    assert [round(m.timeout_s, 2) for m in panel.runs] == [0.05, 0.1]
    assert panel.distribution.value[:4] == b"\x89PNG"
    panel.clear_button.click()
    assert panel.runs == []


def test_background_run_can_be_stopped(panel):
    panel.scenario.value = "black hole (SYNs dropped)"
    panel.count.value, panel.concurrency.value = 200, 2
    panel.timeout.value = 0.5
    panel.run_button.click()  # runs in a thread: 200 x 0.5 s / 2 would take 50 s
    panel.stop_button.click()
    assert panel.wait(5), "Stop did not end the run within 5 s"
    assert "(stopped)" in panel.status.value and not panel.run_button.disabled


def test_impaired_scenario_disabled_with_reason_or_runs():
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
    assert t.scenario.value.startswith("black hole") and abs(t.timeout.value - 0.2) < 0.01
    t.connect()
    assert t.result.outcome == "timed_out"
    s = widgets.scenario_picker_panel()
    assert len(s.scenario.options) == len(widgets.SCENARIOS)
