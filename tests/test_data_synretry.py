"""Recorded datasets load with their provenance; the SYN schedule matches this kernel's sysctls."""

import pytest

from nbconn.experiments import data, synretry
from nbconn.view import plots

EXPECTED = {"loopback-idle", "loopback-burst", "impaired-clean", "impaired-jitter", "impaired-loss", "impaired-scaling",
            "blackhole-syncnt", "syn-default"}


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
    assert 20 <= s["handshake_ms"]["p50"] < 30  # one 20 ms round trip, plus what a loaded machine added
    assert s["handshake_ms"]["max"] > 900  # the SYN-retransmission tail of a lost packet
    fig = plots.compare([data.load("impaired-jitter"), loss], log_x=True)
    assert len(fig.axes) == 2


def test_burst_dataset_has_both_views_and_the_counters():
    b = data.load("loopback-burst")
    assert b["sysctls"] == {"tcp_syncookies": "1", "tcp_abort_on_overflow": "0"}
    outcomes = b["client"]["outcomes"]
    assert len(outcomes) == b["count"] == 100 and outcomes.count("connected") == 100
    accepted, unknown = b["server"]["accepted_during_connects"], b["server"]["connected_but_not_accepted"]
    assert accepted + unknown == 100 and unknown > 0  # the half-open "connected" the issue is about
    k = b["counters"]["during_connects"]
    assert k["SyncookiesSent"] == k["SyncookiesRecv"] > 0 and k["ListenOverflows"] > k["SyncookiesSent"]
    fig = plots.accept_queue(b)
    assert len(fig.axes[0].lines) >= 3


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


def test_both_limits_of_tcp_write_timeout():
    # TCP_SYNCNT=1 on 6.5+: the count would allow 1 + 4 retransmissions, the time budget (3 s) ends it after 2
    one = synretry.predict(1, 4)
    assert one["max_retransmits"] == 5 and one["budget_s"] == 3 and one["limit"] == "time budget"
    two = synretry.predict(2, 4)
    assert len(two["sent_s"]) == 6 and two["failed_s"] == 7 and two["limit"] == "time budget"
    # the default: 6 + 4 = 10 retransmissions (11 SYNs), and the 127 s budget, both reached at 131 s
    default = synretry.predict(6, 4, hz=250)
    assert len(default["sent_s"]) == 11 and default["failed_s"] == 131 and default["limit"] == "both"
    # the timer wheel at HZ=250: 1-2 s timers up to 32 ms late, 4-16 s up to 256 ms, 32-64 s up to 2.048 s
    assert default["late_s"] == pytest.approx(6 * 0.036 + 3 * 0.26 + 2 * 2.052)
    # TCP_USER_TIMEOUT shorter than the first RTO: the 1 s timer still fires first, resends, then gives up
    short = synretry.predict(6, 4, user_timeout_ms=500)
    assert short["sent_s"] == [0, 1] and short["failed_s"] == 1 and short["limit"] == "TCP_USER_TIMEOUT"
    assert synretry.predict(6, 4, user_timeout_ms=1500)["failed_s"] == 1.5


def test_recorded_rows_fall_inside_the_predicted_window():
    for name in ("blackhole-syncnt", "syn-default"):
        d = data.load(name)
        for run in d["runs"]:
            retries = run["value"] or d["sysctls"]["tcp_syn_retries"]
            p = synretry.predict(retries, d["sysctls"]["tcp_syn_linear_timeouts"], hz=250)
            assert len(run["sent_s"]) == len(p["sent_s"]), run["label"]
            assert p["failed_s"] <= run["failed_s"] <= p["failed_s"] + p["late_s"], run["label"]


def test_syncnt_fails_when_this_kernels_schedule_says():
    sysctls = synretry.read_sysctls()
    runs = synretry.measure(syncnts=(1, 2), max_wait_s=12)
    for run in runs:
        assert run["errno"] == "ETIMEDOUT", run
        assert run["failed_s"] >= run["predicted_failed_s"] - 0.01, run  # kernel timers never fire early
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
