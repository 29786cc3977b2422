"""Recorded datasets load with their provenance; the SYN schedule matches this kernel's sysctls."""

import pytest

from nbconn import data, plots, synretry

EXPECTED = {"loopback-idle", "loopback-burst", "impaired-jitter", "impaired-loss", "blackhole-syncnt"}


def test_datasets_present_and_have_provenance():
    assert EXPECTED <= set(data.available())
    for name in data.available():
        raw = data.load_raw(name)
        prov = raw["provenance"]
        for key in ("dataset", "description", "recorded", "machine", "kernel", "command", "nbconn"):
            assert prov[key], (name, key)
        assert prov["command"].startswith("python -m nbconn record " + name)


def test_connect_datasets_load_as_measurements_and_plot():
    idle = data.load("loopback-idle")
    assert len(idle) == 1000 and idle.outcome_counts() == {"connected": 1000}
    loss = data.load("impaired-loss")
    s = loss.summary()
    assert s["handshake_ms"]["p50"] == pytest.approx(20, rel=0.1)
    assert s["handshake_ms"]["max"] > 900  # the SYN-retransmission tail of a lost packet
    fig = plots.compare([data.load("impaired-jitter"), loss], log_x=True)
    assert len(fig.axes) == 2


def test_syn_dataset_and_timeline_plot():
    d = data.load("blackhole-syncnt")
    assert [r["label"] for r in d["runs"]] == ["TCP_SYNCNT=1", "TCP_SYNCNT=2", "TCP_SYNCNT=3"]
    fig = plots.syn_timeline(d["runs"])
    assert fig.axes[0].get_yticklabels()[0].get_text() == "TCP_SYNCNT=1"


def test_unknown_dataset_named():
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        data.load("nope")


def test_predicted_schedules():
    classic = synretry.predict(6, 0)  # the textbook schedule, and what pre-6.5 kernels do
    assert classic["sent_s"] == [0, 1, 3, 7, 15, 31, 63] and classic["failed_s"] == 127
    linear = synretry.predict(1, 4)
    assert linear["sent_s"] == [0, 1, 2] and linear["failed_s"] == 3


def test_syncnt_fails_when_this_kernels_schedule_says():
    sysctls = synretry.read_sysctls()
    runs = synretry.measure(syncnts=(1, 2), max_wait_s=12)
    for run in runs:
        assert run["errno"] == "ETIMEDOUT", run
        assert run["failed_s"] == pytest.approx(run["predicted_failed_s"], abs=0.3), run
        # one measured SYN per predicted one, each within 0.2 s
        assert len(run["sent_s"]) == len(run["predicted_s"]), run
        for got, want in zip(run["sent_s"], run["predicted_s"]):
            assert got == pytest.approx(want, abs=0.2)
    assert sysctls["tcp_syn_retries"] is not None


def test_bad_synretry_input_named():
    with pytest.raises(ValueError, match="TCP_SYNCNT 0"):
        synretry.measure(syncnts=(0,))
    with pytest.raises(ValueError, match="max_wait_s=999"):
        synretry.measure(max_wait_s=999)
