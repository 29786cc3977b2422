"""The interactive lab: an ipywidgets panel to turn the flow's knobs and watch what changes.

Every control maps to one argument of :func:`nbconn.connect` (the socket options
of :data:`nbconn.options.OPTIONS`, the non-blocking method, the epoll trigger,
the connect timeout) or picks a lab peer.  "Connect" runs one attempt and shows
its trace, its timeline, its outcome with nginx's verdict, and the options the
kernel kept next to those you asked for.  "Run N" measures a distribution, and
earlier runs can be kept and overlaid.

Three promises to a learner, and where they are kept:

* *The panel answers at once.*  A button's work runs in a thread of its own
  (:meth:`LabPanel.connect` and :meth:`LabPanel.run` with ``background=True``):
  the kernel is free again at once, so the button can show itself disabled, a
  ticker can count the seconds, and Stop gets through.  A click while something
  runs is answered, not queued.
* *Nothing stale.*  The result area says which settings produced it; when a
  control changes afterwards, or the next attempt is refused, the old result is
  labelled "previous run" and dimmed (:meth:`LabPanel._mark_stale`).
* *What it shows is what it uses.*  Values typed are taken as typed (the
  timeout is a text box; the slider beside it only fills it in), and the kernel's
  value is the only one: no control rounds or snaps a value the kernel set.

Results go into HTML and Image widgets, never into an ``Output`` widget: text
printed into an Output is stored differently by JupyterLab and by nbval, which
would break the notebooks' strict validation.

ipywidgets and matplotlib are imported here only, so ``import nbconn`` stays light.
"""

from __future__ import annotations

import html
import io
import math
import re
import select
import threading
import time

import ipywidgets as w

from .. import lab, validate
from ..api import connect_many
from .plots import ALERT_COLOUR, OUTCOME_COLOURS  # the one palette
from ..experiments.measure import Measurement
from ..settings import Settings
from ..strace import format_ns

#: what the dropdown shows -> the scenario's name (one of nbconn.validate.SCENARIOS)
SCENARIO_BY_LABEL = {
    "listening peer": "listening",
    "refused (closed port)": "refused",
    "black hole (SYNs dropped)": "blackhole",
    "reset after accept": "reset",
    "slow acceptor (queue of 8)": "slow-accept",
    "AF_UNIX backlog full": "unix-full",
    "impaired link (delay/jitter/loss)": "impaired",
}
assert set(SCENARIO_BY_LABEL.values()) <= set(validate.SCENARIOS)  # one list of scenarios: validate's

#: Run N's limits in the panel (tighter than the API's: a panel run should end while someone watches)
MAX_RUN = 5000
MAX_PANEL_CONCURRENCY = 1024
#: the positions of the timeout slider; any other value can be typed into the box beside it
TIMEOUT_PRESETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
#: the numeric socket options: (keyword, label, where the kernel's default comes from when it is left unset)
NUMBER_OPTIONS = (("rcvbuf", "SO_RCVBUF (bytes)", ("net/ipv4/tcp_rmem", 1)),
                  ("sndbuf", "SO_SNDBUF (bytes)", ("net/ipv4/tcp_wmem", 1)),
                  # TCP_SYNCNT counts retransmissions, not SYNs, and tcp_write_timeout also bounds them by a
                  # time budget (notebook 06): syncnt=1 sends 3 SYNs.  The result line shows the SYNs sent.
                  ("syncnt", "TCP_SYNCNT (retransmits)", ("net/ipv4/tcp_syn_retries", 0)),
                  ("user_timeout", "TCP_USER_TIMEOUT (ms)", None))
FLAG_OPTIONS = (("keepalive", "SO_KEEPALIVE"), ("nodelay", "TCP_NODELAY"), ("reuseaddr", "SO_REUSEADDR"),
                ("bind_address_no_port", "IP_BIND_ADDRESS_NO_PORT"))
NONBLOCKING_LABELS = {"ioctl": "ioctl(FIONBIO)", "fcntl": "fcntl(O_NONBLOCK)", "setblocking": "sock.setblocking(False)"}
TRIGGER_LABELS = {"edge": "edge (EPOLLET)", "level": "level"}
#: what the text/plain fallback of a panel says (shown where the widget cannot be: before the cells have run,
#: in a static page, in nbval's comparison)
PLAIN_TEXT = "The nbconn lab panel ({}): run the notebook's cells (Run All) to use it here."
#: how often the status line's clock and the progress bar are refreshed (s): often enough to read as live,
#: rarely enough that a 5000-connect run does not send 5000 widget updates
TICK_S = 0.1
#: the reset scenario's first read waits at most this long for the peer's RST (s)
FIRST_READ_S = 1.0
#: the panel's pictures: pixels per inch, and how much larger than matplotlib's default every text is drawn
PLOT_DPI = 100
PLOT_FONT_SCALE = 1.2


def _kernel_default(source) -> str:
    """The placeholder of an unset option box: the value the kernel uses when nothing is passed."""
    if source is None:
        return "unset: off (0)"
    path, field = source
    try:
        with open(f"/proc/sys/{path}") as f:
            value = f.read().split()[field]
    except (OSError, IndexError):
        return "unset: the kernel's default"
    return f"unset: kernel default {value} ({path.rsplit('/', 1)[-1]})"


def _decided(result) -> bool:
    """Not an attempt a Stop cut short or never started."""
    return result.errno != "ECANCELED"


def _seconds(value: float) -> str:
    """A timeout as set: 3 -> "3.000 s", 0.0015 -> "0.0015 s" (never rounded away)."""
    return f"{value:.3f} s" if round(value, 3) == value else f"{value:g} s"


# Scenario notes: what one Connect will and will not show for each peer.
SCENARIO_NOTES = {
    "listening": "A listener on 127.0.0.1: the handshake completes in the kernel before anyone calls accept().",
    "refused": "Nothing listens on the port: the kernel answers the SYN with RST.  On loopback the SYN and the "
               "RST are both on the wire before connect() returns, yet connect() returns EINPROGRESS: the "
               "client socket is locked during the call and handles the RST only as it is released (notebook 11 "
               "shows the packets inside the call).  epoll then reports the socket and getsockopt(SO_ERROR) "
               "reads ECONNREFUSED -- nginx's ngx_http_upstream_test_connect.",
    "blackhole": "SYNs are dropped (a listener whose accept queue is full and never drained): nothing ever "
                 "answers, the kernel retransmits the SYN, and only the connect timer (or TCP_SYNCNT) ends the "
                 "attempt -- like nginx's proxy_connect_timeout.",
    "reset": "The peer accepts, then closes with SO_LINGER {1, 0}, which sends RST.  The handshake completed "
             "first, so the connect itself ends <b>connected</b>: the RST arrives <i>after</i> it, and the "
             "client only learns on its first read.  The panel reads once after connecting and shows what "
             "recv() returned (ECONNRESET: the RST).  Sometimes the RST is faster than the client's SO_ERROR "
             "check (the acceptor runs on another core): then the connect itself ends <b>reset</b>.",
    "slow-accept": "An accept queue of 8 and an acceptor that takes one connection every 5 ms.  One Connect "
                   "looks normal (one SYN fits in the queue); a burst shows it: <b>Run N</b> with repeat count "
                   "100, concurrency 100 and a 3 s timeout overflows the queue, the kernel drops SYNs, and part "
                   "of the burst connects only after the ~1 s SYN retransmission.  The button below sets all "
                   "three.",
    "unix-full": "An AF_UNIX listener whose backlog is full: no handshake and no timer, connect() itself "
                 "answers EAGAIN at once (nginx: NGX_DECLINED, next peer).",
    "impaired": "A real link with delay, jitter and loss between two network namespaces the lab creates.",
}
#: (repeat count, concurrency, timeout in s) the slow-acceptor note offers: the timeout must outlast the
#: first SYN retransmission (1 s) for the second cluster to show
SLOW_ACCEPT_BURST = (100, 100, 3.0)


class LabPanel:
    """The panel.  ``panel.widget`` is the VBox to display; the panel also displays itself."""

    def __init__(self, *, scenarios=None, compact: bool = False, scenario: str = "listening peer",
                 timeout: float | None = None, settings: Settings | None = None) -> None:
        # settings=: the controls start from a Settings; what the panel has no control for is refused here,
        # naming it, before any widget exists.  timeout= alone sets the timer (1 s when neither is given).
        if settings is not None:
            if timeout is not None:
                raise TypeError("LabPanel: pass a Settings or timeout=, not both (settings.replace(timeout=...))")
            _check_shown_by_panel(settings)
            timeout = settings.timeout
        elif timeout is None:
            timeout = 1.0
        names = list(scenarios or SCENARIO_BY_LABEL)
        self.compact = compact
        self.wire_reason = lab.wire_unavailable_reason() if "impaired" in {SCENARIO_BY_LABEL[n] for n in names} else None
        wide = {"description_width": "170px"}
        row = {"width": "520px"}
        self.scenario = w.Dropdown(options=names, value=scenario, description="scenario", style=wide, layout=row)
        self.scenario_note = w.HTML(layout={"max_width": "760px"})
        self.use_burst_button = w.Button(description=f"use {SLOW_ACCEPT_BURST[0]} connects, "
                                                     f"{SLOW_ACCEPT_BURST[1]} at once, {SLOW_ACCEPT_BURST[2]:g} s",
                                         icon="forward", layout={"width": "320px", "display": "none"})
        self.delay_ms = w.FloatSlider(value=10, min=0, max=200, step=1, description="delay each way (ms)",
                                      style=wide, layout=row)
        self.jitter_ms = w.FloatSlider(value=0, min=0, max=20, step=0.5, description="jitter (ms)", style=wide,
                                       layout=row)
        self.loss = w.FloatSlider(value=0, min=0, max=0.5, step=0.01, description="loss each way", style=wide,
                                  layout=row)
        self.wire_note = w.HTML(layout={"max_width": "760px"})
        # The timeout is a text box (what is typed is what is used); the slider is a quick pick that fills it.
        self.timeout = w.FloatText(value=float(timeout), description="connect timeout (s)", style=wide,
                                   layout={"width": "300px"})
        self.timeout_slider = w.SelectionSlider(options=[(f"{v:g} s", v) for v in TIMEOUT_PRESETS],
                                                value=_nearest_preset(float(timeout)), description="quick pick",
                                                readout=False, continuous_update=True,
                                                style={"description_width": "80px"}, layout={"width": "440px"})
        self.flags = {name: w.Checkbox(description=label, indent=False, layout={"width": "300px"})
                      for name, label in FLAG_OPTIONS}
        self.keepalive, self.nodelay = self.flags["keepalive"], self.flags["nodelay"]
        self.reuseaddr, self.bind_address_no_port = self.flags["reuseaddr"], self.flags["bind_address_no_port"]
        self.trigger = w.ToggleButtons(options=[(TRIGGER_LABELS[t], t) for t in validate.TRIGGERS], value="edge",
                                       description="epoll", style=wide)
        self.nonblocking = w.Dropdown(options=[(NONBLOCKING_LABELS[m], m) for m in validate.NONBLOCKING_METHODS],
                                      value="ioctl", description="non-blocking via", style=wide, layout=row)
        self.nginx_exact = w.Checkbox(description="nginx-exact: only nginx's syscalls (no read-back, no TCP_INFO)",
                                      indent=False, layout={"width": "520px"})
        # A numeric option is either unset (the kernel's default: nothing is passed) or a value the API checks;
        # 0 is not a stand-in for "default" (the API rejects rcvbuf=0).  An unset box is empty, with the
        # kernel's default as its grey placeholder: typing anything un-ticks "unset" (even the value that was
        # there before), emptying the box or ticking "unset" clears it.
        self.numbers: dict[str, w.Text] = {}
        self.unset: dict[str, w.Checkbox] = {}
        for name, label, source in NUMBER_OPTIONS:
            box = w.Text(value="", placeholder=_kernel_default(source), description=label,
                         style={"description_width": "220px"}, layout={"width": "560px"})
            unset = w.Checkbox(value=True, description="unset", indent=False, layout={"width": "90px"})
            box.observe(lambda change, u=unset: setattr(u, "value", not change["new"].strip()), names="value")
            unset.observe(lambda change, b=box: change["new"] and setattr(b, "value", ""), names="value")
            self.numbers[name], self.unset[name] = box, unset
            setattr(self, name, box)
            setattr(self, f"{name}_unset", unset)
        # Text boxes, read by validate.int_text: an IntText drops a typed "." (so "2.5" became 25).
        self.count = w.Text(value="200", description="repeat count", style=wide, layout={"width": "320px"})
        self.concurrency = w.Text(value="16", description="concurrency", style=wide, layout={"width": "320px"})
        self.keep_runs = w.Checkbox(value=True, description="keep earlier runs to compare", indent=False,
                                    layout={"width": "300px"})

        self.connect_button = w.Button(description="Connect", button_style="primary", icon="plug")
        self.run_button = w.Button(description="Run N", button_style="info", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear runs", icon="trash")

        self.status = w.HTML(value="<i>Pick a scenario and press Connect.</i>")
        self.status_is_error = False  # what the status line says is a refusal (the state, not its colour)
        self.result_header = w.HTML()
        self.outcome = w.HTML()
        self.trace = w.HTML()
        self.options_view = w.HTML()
        # Images stay hidden until they hold a picture (an empty Image renders as a broken-image icon).
        self.timeline = w.Image(format="png", layout={"display": "none", "width": "100%", "max_width": "1000px"})
        self.progress = w.IntProgress(value=0, min=0, max=1, description="run", layout={"display": "none"})
        self.distribution = w.Image(format="png", layout={"display": "none", "width": "100%",
                                                          "max_width": "1000px"})

        self.result = None  # the last Result of Connect
        self.first_read: str | None = None  # what the reset scenario's one recv() returned
        self.runs: list[Measurement] = []
        self.connects_started = 0  # how many Connects ran (a click while one runs must not add one)
        self.ignored_clicks = 0  # clicks answered "still running" during the job in flight
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # the job running now (Connect or Run N), if any
        self._lock = threading.Lock()
        self._shown_inputs: dict | None = None  # the inputs behind what the result area shows
        self._fresh: dict = {}  # the result area's HTML as drawn, to re-draw it dimmed when it goes stale
        self._stale = False
        self._syncing_timeout = False
        self._peer_ready_at: float | None = None

        self.connect_button.on_click(lambda _: self.connect(background=True))
        self.run_button.on_click(lambda _: self.run(background=True))
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.use_burst_button.on_click(lambda _: self.use_burst())
        self.timeout_slider.observe(self._slider_moved, names="value")
        self.timeout.observe(self._timeout_typed, names="value")
        self.scenario.observe(lambda _: self._sync_scenario(), names="value")
        for control in self._inputs():
            control.observe(lambda _: self._inputs_changed(), names="value")
        self._sync_scenario()
        if settings is not None:
            self._show_settings(settings)
        self.widget = self._layout(compact)

    # -- layout ----------------------------------------------------------------------
    def _layout(self, compact: bool):
        timeout_row = w.HBox([self.timeout, self.timeout_slider])
        result = [self.result_header, self.outcome, self.timeline, self.trace]
        if compact:
            controls = w.VBox([self.scenario, self.scenario_note, self.wire_note, timeout_row,
                               w.HBox([self.connect_button])])
            return w.VBox([controls, self.status, *result])
        wire = w.VBox([self.delay_ms, self.jitter_ms, self.loss, self.wire_note])
        flags = w.VBox(list(self.flags.values()))
        numbers = w.VBox([w.HBox([self.numbers[n], self.unset[n]]) for n, _, _ in NUMBER_OPTIONS])
        flow = w.VBox([timeout_row, self.trigger, self.nonblocking, self.nginx_exact, self.count, self.concurrency,
                       self.keep_runs])
        tabs = w.Tab(children=[w.VBox([self.scenario, self.scenario_note, self.use_burst_button, wire]), flow,
                               w.HBox([flags, numbers])])
        for i, title in enumerate(("scenario", "the flow", "socket options")):
            tabs.set_title(i, title)
        buttons = w.HBox([self.connect_button, self.run_button, self.stop_button, self.clear_button])
        one = w.VBox([*result, self.options_view])
        # Two accordions, not one with two children: an ipywidgets Accordion keeps one child open, so opening
        # "distribution" would hide the last Connect.
        self.one_section = w.Accordion(children=[one], titles=("one connect",), selected_index=0)
        self.distribution_section = w.Accordion(children=[self.distribution], titles=("distribution",),
                                                selected_index=None)
        return w.VBox([tabs, buttons, self.status, self.progress, self.one_section, self.distribution_section])

    def _repr_mimebundle_(self, **kwargs):
        # The widget view, and -- where no widget can show (before the cells ran, a static page, nbval) --
        # a sentence instead of ipywidgets' "VBox(children=(Tab(..." repr.
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = PLAIN_TEXT.format("compact slice" if self.compact else "every knob")
        return bundle

    def _inputs(self) -> list:
        """Every control whose value changes what Connect or Run N does."""
        return [self.scenario, self.delay_ms, self.jitter_ms, self.loss, self.timeout, self.trigger,
                self.nonblocking, self.nginx_exact, *self.flags.values(), *self.numbers.values(), *self.unset.values(),
                self.count, self.concurrency]

    def _sync_scenario(self) -> None:
        name = self._scenario_name()
        impaired = name == "impaired"
        usable = impaired and self.wire_reason is None
        for slider in (self.delay_ms, self.jitter_ms, self.loss):
            slider.disabled = not usable
            slider.layout.display = None if impaired else "none"  # the link's knobs, shown with the link only
        self.scenario_note.value = f"<div style='color:#444;{TEXT}'>{SCENARIO_NOTES[name]}</div>"
        self.use_burst_button.layout.display = None if name == "slow-accept" and not self.compact else "none"
        if impaired and self.wire_reason:
            from ..experiments import data

            recorded = [n for n in data.available() if n.startswith("impaired")]
            loads = ", ".join(f"<code>nbconn.experiments.data.load({n!r})</code>" for n in recorded)
            self.wire_note.value = (
                f"<div style='color:#9a3412;{TEXT}'>The impaired link cannot run here: "
                f"{html.escape(self.wire_reason)}<br>That line (<code>nbconn.lab.wire_unavailable_reason()</code>) "
                "names what to change; until then, runs recorded on such a link ship with nbconn"
                + (f": {loads} (plotted in notebook 08)." if loads else " (nbconn.experiments.data).") + "</div>")
        else:
            self.wire_note.value = ""

    # -- the timeout: a box that takes values exactly, and a slider that fills it in --------------------
    def _slider_moved(self, change) -> None:
        if not self._syncing_timeout:
            self.timeout.value = float(change["new"])

    def _timeout_typed(self, change) -> None:
        # Move the slider near the typed value without writing the slider's value back into the box.
        self._syncing_timeout = True
        try:
            value = change["new"]
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                self.timeout_slider.value = _nearest_preset(float(value))
        finally:
            self._syncing_timeout = False

    # -- reading the controls ---------------------------------------------------------
    def options(self) -> dict:
        """The keyword arguments for nbconn.connect that the controls describe (unset options are left out)."""
        opts: dict = {"timeout": self.timeout.value, "trigger": self.trigger.value,
                      "nonblocking": self.nonblocking.value}
        if self.nginx_exact.value:
            opts["nginx_exact"] = True
        for name, box in self.flags.items():
            if box.value:
                opts[name] = True
        for name, box in self.numbers.items():
            if not self.unset[name].value:
                opts[name] = validate.int_text(name, box.value)
        return opts

    def _show_settings(self, settings: Settings) -> None:
        """Set the controls to ``settings`` (checked by _check_shown_by_panel): settings() then gives it back."""
        self.trigger.value, self.nonblocking.value = settings.trigger, settings.nonblocking
        self.nginx_exact.value = settings.nginx_exact
        for name, box in self.flags.items():
            box.value = settings.options.get(name) is True
        for name, box in self.numbers.items():
            value = settings.options.get(name)
            self.unset[name].value = value is None
            box.value = "" if value is None else str(value)

    def settings(self) -> Settings:
        """The :class:`nbconn.settings.Settings` the controls describe: the panel's one constructor (Settings
        checks every value and raises ValueError/TypeError naming it)."""
        return Settings(**self.options())

    def _checked_settings(self) -> Settings:
        settings = self.settings()
        if self._scenario_name() == "impaired" and self.wire_reason:
            raise RuntimeError(f"the impaired link cannot run here: {self.wire_reason}")
        return settings

    def _scenario_name(self) -> str:
        return SCENARIO_BY_LABEL[self.scenario.value]

    def _target(self):
        """Start the chosen peer; a context manager yielding (target, context manager for the client side)."""
        name = self._scenario_name()
        wire = {}
        if name == "impaired":
            wire = {"delay_ms": self.delay_ms.value, "jitter_ms": min(self.jitter_ms.value, self.delay_ms.value),
                    "loss": self.loss.value}
        return lab.scenario(name, **wire)

    def _snapshot(self) -> dict:
        """The inputs as they are now (to tell later whether what is shown still matches them)."""
        return {id(c): c.value for c in self._inputs()}

    def _say(self, message: str, *, error: bool = False, busy: bool = False) -> None:
        self.status_is_error = error
        colour = ALERT_COLOUR if error else "#333"
        weight = "font-weight:600;" if busy else ""  # a job is running: the line that changes stands out
        self.status.value = f"<span style='color:{colour};{weight}'>{html.escape(message)}</span>"

    @property
    def status_text(self) -> str:
        """The status line as plain text (what a person reads in it)."""
        return _plain(self.status.value)

    @property
    def result_header_text(self) -> str:
        """The line above the result as plain text: "last Connect: ..." or "previous run (...): why"."""
        return _plain(self.result_header.value)

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _refuse_if_busy(self) -> bool:
        """A click while a job runs is answered in the status line and dropped (never queued)."""
        if self._busy():
            self.ignored_clicks += 1
            self._say(re.sub(r" -- \d+ clicks? ignored.*", "", self.status_text) + self._ignored_note(), busy=True)
            return True
        return False

    def _ignored_note(self) -> str:
        n = self.ignored_clicks
        return f" -- {n} click{'s' if n > 1 else ''} ignored while this runs" if n else ""

    # -- the result area: fresh, or labelled "previous run" ---------------------------------------------
    def _describe_inputs(self, settings: Settings) -> str:
        parts = [self.scenario.value, f"timeout {_seconds(settings.timeout)}", f"epoll {settings.trigger}",
                 NONBLOCKING_LABELS[settings.nonblocking]]
        if settings.nginx_exact:
            parts.append("nginx-exact")
        parts += [f"{k}={v}" if v is not True else k for k, v in settings.options.items()]
        if self._scenario_name() == "impaired":
            parts.append(f"delay {self.delay_ms.value:g} ms, jitter {self.jitter_ms.value:g} ms, "
                         f"loss {self.loss.value:g}")
        return ", ".join(parts)

    def _show_result(self, header: str, outcome: str, trace: str, options_html: str, png: bytes) -> None:
        self._fresh = {"header": header, "outcome": outcome, "trace": trace, "options": options_html}
        self._stale = False
        self.result_header.value = f"<div style='{TEXT}'><b>last Connect</b>: {html.escape(header)}</div>"
        self.outcome.value, self.trace.value, self.options_view.value = outcome, trace, options_html
        self.timeline.value = png
        self.timeline.layout.display = None if png else "none"

    def _mark_stale(self, why: str) -> None:
        """Label what the result area shows as a previous run (dimmed, its picture hidden)."""
        if not self._fresh:
            return
        self._stale = True
        dim = "<div style='opacity:0.45'>{}</div>"
        self.result_header.value = (f"<div style='{TEXT}'><b style='color:#9a3412'>previous run</b> "
                                    f"({html.escape(self._fresh['header'])}): {html.escape(why)}</div>")
        self.outcome.value = dim.format(self._fresh["outcome"])
        self.trace.value = dim.format(self._fresh["trace"])
        self.options_view.value = dim.format(self._fresh["options"])
        self.timeline.layout.display = "none"

    def _inputs_changed(self) -> None:
        busy = self._busy()
        connecting = busy and self._thread.name == "nbconn-lab-connect"
        # (a Connect in flight already labelled the area; its result is checked against the inputs when it lands)
        if not connecting and self._fresh and self._shown_inputs is not None \
                and self._snapshot() != self._shown_inputs:
            self._mark_stale("the settings have changed since; press Connect to see them")
        if not busy and self.status_is_error:  # an error about values that are no longer there
            self._say("settings changed: press Connect or Run N")

    def _refused(self, what: str, exc: Exception) -> None:
        self._say(f"{what}: {exc}", error=True)
        self._mark_stale("the last attempt was not run (see the red line above)")

    # -- Connect ------------------------------------------------------------------------
    def connect(self, *, background: bool = False) -> None:
        """One attempt with the current settings; every result widget is updated.

        ``background=True`` (the button) runs it in a thread: the button is disabled and the status line counts
        the seconds until the result is in.
        """
        if self._refuse_if_busy():
            return
        try:
            settings = self._checked_settings()
        except (ValueError, TypeError, RuntimeError) as exc:
            self._refused("not connected", exc)
            return
        inputs, header = self._snapshot(), self._describe_inputs(settings)
        self.connects_started += 1
        self.ignored_clicks = 0
        self._mark_stale("a new Connect is running")
        self._stop.clear()
        self.connect_button.disabled = self.run_button.disabled = True
        self.stop_button.disabled = False  # a black hole with nginx's default 60 s must not be a minute lost
        timeout, peer_name = settings.timeout, self.scenario.value
        done = threading.Event()
        started = time.monotonic()
        self._peer_ready_at = None  # set by the job once the peer runs: the connect's own clock starts there

        def tick() -> None:  # the status line's clock: elapsed and the most it can take
            while not done.wait(TICK_S):
                with self._lock:
                    if done.is_set():
                        break
                    ready = self._peer_ready_at
                    if ready is None:  # the peer (an impaired link: two namespaces) is still being set up
                        self._say(f"starting {peer_name}... {time.monotonic() - started:.1f} s"
                                  f"{self._ignored_note()}", busy=True)
                    else:
                        self._say(f"connecting to {peer_name}... {time.monotonic() - ready:.1f} s "
                                  f"(up to {_seconds(timeout)}){self._ignored_note()}", busy=True)

        def job() -> None:
            try:
                self._connect_job(settings, inputs, header, done)
            except Exception as exc:  # a bug must not leave the panel saying "connecting..." for ever
                with self._lock:
                    done.set()
                    self._refused("Connect failed", exc)
            finally:
                with self._lock:
                    done.set()
                self.connect_button.disabled = self.run_button.disabled = False
                self.stop_button.disabled = True

        self._say(f"connecting to {self.scenario.value}... (up to {_seconds(timeout)})", busy=True)
        if background:
            self._thread = threading.Thread(target=job, name="nbconn-lab-connect", daemon=True)
            self._thread.start()
            threading.Thread(target=tick, name="nbconn-lab-clock", daemon=True).start()
        else:
            job()

    def _connect_job(self, settings: Settings, inputs: dict, header: str, done: threading.Event) -> None:
        # Each final write happens under the lock with `done` set first, so the clock cannot write
        # "connecting..." over the result.
        scenario = self._scenario_name()
        try:
            with self._target() as (target, client_side), client_side():
                self._peer_ready_at = time.monotonic()
                # connect_many of one target: the same attempt as nbconn.connect, with a stop callable that the
                # loop asks at least every 100 ms (Stop).
                if scenario == "reset":  # kept for one read: the RST shows there
                    settings = settings.replace(keep=True)
                res = connect_many([target], settings, concurrency=1, stop=self._stop.is_set)[0]
                first_read = _read_once(res) if scenario == "reset" else None
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            with self._lock:
                done.set()
                self._refused("not connected", exc)
            return
        if res.errno == "ECANCELED":  # Stop: the attempt was aborted, nothing was decided
            with self._lock:
                done.set()
                self._say(f"Connect stopped after {time.monotonic() - self._peer_ready_at:.1f} s: nothing was "
                          "decided (the socket was closed, as nginx closes it when a request is finalized)")
                self._mark_stale("the last Connect was stopped")
            return
        self.result, self.first_read = res, first_read
        colour = OUTCOME_COLOURS.get(res.outcome, "#333")
        # The verdict in Result.summary's words (one code when connect() decided at once), then the details.
        outcome = (
            f"<b style='color:{colour}'>{html.escape(res.summary())}</b><br>"
            f"connect() returned <code>{res.connect_returned}</code>"
            + (f"<br>nginx would log: <code>{html.escape(res.ngx_log)}</code>" if res.ngx_log else "")
            + (f"<br>SYNs sent before the timer fired: {res.syns_sent} (TCP_INFO's tcpi_total_retrans + 1; "
               "TCP_SYNCNT counts only the resent ones)" if res.timer_fired and res.syns_sent else ""))
        if first_read is not None:
            why = (" -- the peer's RST arrived after the handshake had completed, so connect() could not see it"
                   if "ECONNRESET" in first_read else "")
            outcome += f"<br>then the first read: <code>{html.escape(first_read)}</code>{why}"
        outcome = f"<div style='{TEXT}'>{outcome}</div>"
        png = _png(lambda: _plots().timeline(res))
        with self._lock:
            done.set()
            self._show_result(header, outcome, _trace_html(res), _options_html(res), png)
            self._shown_inputs = inputs
            self._say(f"{res.target}: {self.result_line()}")
            if self._snapshot() != inputs:  # a control moved while the connect ran
                self._mark_stale("the settings have changed since; press Connect to see them")

    def result_line(self) -> str:
        """The last Connect in one line, durations in readable units."""
        res = self.result
        if res is None:
            return "no Connect yet"
        parts = [res.summary()]
        if self.first_read is not None:
            parts.append(f"; first read: {self.first_read}")
        return " ".join(parts)

    # -- Run N ---------------------------------------------------------------------------
    def run(self, *, background: bool = False) -> None:
        """Measure ``count`` connects; in a thread when ``background`` (the Stop button can end it)."""
        if self._refuse_if_busy():
            return
        try:
            count = validate.integer("repeat count", validate.int_text("repeat count", self.count.value), 1, MAX_RUN)
            concurrency = validate.integer("concurrency", validate.int_text("concurrency", self.concurrency.value),
                                           1, MAX_PANEL_CONCURRENCY)
            settings = self._checked_settings()
        except (ValueError, TypeError, RuntimeError) as exc:
            self._say(f"not run: {exc}", error=True)
            return
        self._stop.clear()
        self.ignored_clicks = 0
        self.progress.max, self.progress.value = count, 0
        self.progress.layout.display = None
        self.run_button.disabled = self.connect_button.disabled = True
        self.stop_button.disabled = False
        self._say(f"running 0/{count}", busy=True)  # replaces whatever the last run said, red or not
        job = (lambda: self._run(count, concurrency, settings))
        if background:
            self._thread = threading.Thread(target=job, name="nbconn-lab-run", daemon=True)
            self._thread.start()
        else:
            job()

    def _run(self, count: int, concurrency: int, settings: Settings) -> None:
        finished = [0]
        started = time.monotonic()
        last = [0.0]

        def tick(_index, _result) -> None:  # called by connect_many as each attempt is decided
            finished[0] += 1
            now = time.monotonic()
            if now - last[0] >= TICK_S or finished[0] == count:
                last[0] = now
                self.progress.value = finished[0]
                self._say(f"running {finished[0]}/{count} ({now - started:.1f} s){self._ignored_note()}",
                          busy=True)

        try:
            timeout = settings.timeout
            with self._target() as (target, client_side), client_side():
                results = connect_many([target] * count, settings, concurrency=concurrency, on_result=tick,
                                       stop=self._stop.is_set)
            counts = run_counts(results)
            decided = list(filter(_decided, results))  # (no comprehension in a try: tests/test_interrupt_coverage.py)
            label = f"{self.scenario.value}, timeout {_seconds(timeout)}"
            if self._scenario_name() == "impaired":  # runs on links differ by the link: say it in the legend
                label += (f", delay {self.delay_ms.value:g} ms, jitter {self.jitter_ms.value:g} ms, "
                          f"loss {self.loss.value:g}")
            if counts["not started"] or counts["cut short"]:
                label += f", stopped after {counts['finished']} of {count}"
            if any(m.label == label for m in self.runs):  # same settings again: number the repeat
                label += f" (#{sum(m.label.startswith(label) for m in self.runs) + 1})"
            m = Measurement.from_results(decided, label=label, scenario=self._scenario_name(), timeout_s=timeout,
                                         concurrency=concurrency, settings=settings)
            with self._lock:
                self.runs = (self.runs if self.keep_runs.value else []) + [m]
            self._draw_runs()
            self.distribution_section.selected_index = 0  # open: the run's picture is what Run N is for
            self._say(f"{label}: {describe_counts(counts, m.outcome_counts())}")
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            self._say(f"run failed: {exc}", error=True)
        finally:
            self.progress.value = finished[0]
            self.run_button.disabled = self.connect_button.disabled = False
            self.stop_button.disabled = True
            self.progress.layout.display = "none"

    def _draw_runs(self) -> None:
        with self._lock:
            runs = list(self.runs)
        png = _png(lambda: _distribution(runs), tidy=_tidy_distribution) if runs else b""
        self.distribution.value = png
        self.distribution.layout.display = None if png else "none"

    def stop(self) -> None:
        self._stop.set()

    def use_burst(self) -> None:
        """The slow-acceptor note's offer: everything Run N needs for a burst that overflows the accept queue."""
        count, concurrency, timeout = SLOW_ACCEPT_BURST
        self.count.value, self.concurrency.value, self.timeout.value = str(count), str(concurrency), timeout
        self._say(f"repeat count {count}, concurrency {concurrency}, connect timeout {_seconds(timeout)} "
                  "(longer than the 1 s SYN retransmission): press Run N")

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Wait for a background Connect or run to end (bounded); True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True

    def clear(self) -> None:
        with self._lock:
            self.runs = []
        self._draw_runs()
        self._say("runs cleared")


def run_counts(results) -> dict:
    """How a (possibly stopped) run ended: finished, cut short by Stop (in flight), not started."""
    not_started = sum(1 for r in results if r.errno == "ECANCELED" and not r.started_ns)
    cut_short = sum(1 for r in results if r.errno == "ECANCELED" and r.started_ns)
    return {"finished": len(results) - not_started - cut_short, "cut short": cut_short, "not started": not_started}


def describe_counts(counts: dict, outcomes: dict) -> str:
    """ "16 finished (timed_out 16), 184 not started" -- connects Stop prevented are not errors."""
    text = f"{counts['finished']} finished"
    if outcomes:
        text += " (" + ", ".join(f"{k} {v}" for k, v in outcomes.items()) + ")"
    if counts["cut short"]:
        text += f", {counts['cut short']} in flight stopped"
    if counts["not started"]:
        text += f", {counts['not started']} not started"
    return text


# Inline styles for the HTML widgets: ipywidgets gives an HTML widget the line height of a one-line control
# (28 px), which spreads wrapped text and table rows far apart; times must not wrap inside their cell.
TEXT = "line-height:1.45"
_TABLE = "style='border-collapse:collapse;line-height:1.3;margin-top:4px'"
_NUM = "style='white-space:nowrap;text-align:right;padding:1px 10px 1px 2px;vertical-align:top'"
_CELL = "style='text-align:left;padding:1px 4px;vertical-align:top'"


def _plain(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup)).strip()


def _read_once(res) -> str:
    """One recv() on a connected (kept) socket, waiting at most FIRST_READ_S for something to arrive; closes it."""
    sock = res.sock
    if sock is None:
        return f"no read: the connect ended {res.outcome}"
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
        start = time.monotonic_ns()
        ready = poller.poll(FIRST_READ_S * 1000)
        waited = format_ns(time.monotonic_ns() - start)
        if not ready:
            return f"nothing to read within {FIRST_READ_S:g} s"
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            return f"recv() = -1 ECONNRESET ({waited} after connected)"
        except BlockingIOError:
            return "recv() = -1 EAGAIN"
        return f"recv() = {len(data)} ({waited} after connected)" + (" (EOF: FIN, not RST)" if not data else "")
    finally:
        res.close()


def _plots():
    from . import plots

    return plots


def _distribution(runs):
    """plots.compare of the runs, labelled by what differs between them (the scenario goes in the title)."""
    import dataclasses

    scenarios = {m.label.split(", timeout ")[0] for m in runs}
    if len(scenarios) == 1:
        title = f"handshake times: {scenarios.pop()}"
        runs = [dataclasses.replace(m, label=m.label.split(", ", 1)[-1]) for m in runs]
    else:
        title = "handshake times"
    return _plots().compare(runs, log_x=True, title=title)


def _tidy_distribution(fig) -> None:
    """Room for the panel's long run labels: one legend, below both plots (never over a curve or an axis
    label, however many runs are kept), and plain tick labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    left, right = fig.axes[:2]
    handles, labels = right.get_legend_handles_labels()
    if not handles:
        handles, labels = left.get_legend_handles_labels()
    for ax in (left, right):
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:  # the figure's constrained layout makes room for an "outside" legend
        fig.legend(handles, labels, loc="outside lower center", ncols=1, fontsize="small", frameon=False)
    fig.set_size_inches(10, 3.6 + 0.25 * len(labels))
    for ax in (left, right):
        if ax.get_xscale() == "log":  # 200, 500, 1000 instead of crowded 2x10^2 3x10^2 4x10^2
            low, high = ax.get_xlim()
            decades = math.log10(high / low) if low > 0 and high > low else 1.0
            subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)  # over many decades, 1-2-5 would crowd
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def _png(make, tidy=None) -> bytes:
    """Draw a figure with fonts a person can read at the size the panel shows it."""
    from matplotlib.text import Text

    fig = make()
    if tidy is not None:
        tidy(fig)
    # Scale this figure's texts (not rcParams: that is global state, shared with the notebook's own plots
    # while a background job draws).
    for text in fig.findobj(Text):
        text.set_fontsize(text.get_fontsize() * PLOT_FONT_SCALE)
    buf = io.BytesIO()
    # "tight": the picture grows to hold the legend below the axes and every axis label (none is clipped)
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    return buf.getvalue()


def _nearest_preset(value: float) -> float:
    """The slider position nearest to ``value`` on a log scale (the box keeps the exact value)."""
    if not (math.isfinite(value) and value > 0):
        return 1.0
    return min(TIMEOUT_PRESETS, key=lambda p: abs(math.log(p) - math.log(value)))


def _trace_html(res) -> str:
    t0 = res.started_ns
    rows = []
    for s in res.steps:
        step = s.ngx_step
        rows.append(f"<tr><td {_NUM}>{'' if step is None else step.number}</td>"
                    f"<td {_NUM}>{format_ns(s.t_start_ns - t0)}</td>"
                    f"<td {_NUM}>{format_ns(s.duration_ns)}</td>"
                    f"<td {_CELL}><code>{html.escape(s.call)}</code></td></tr>")
    return (f"<table class='nbconn-trace' {_TABLE}><thead><tr><th {_NUM}>step</th><th {_NUM}>called at</th>"
            f"<th {_NUM}>took</th><th {_CELL}>syscall</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<div style='color:#666;font-size:90%;{TEXT}'>step: which of the five steps (notebook 00); times from "
            "just before socket(); <i>took</i>: how long the call itself ran (for epoll_wait: how long it waited; timer events take no time). "
            "The panel's epoll_wait wakes at least every 100 ms to see whether Stop was pressed, so its timeout reads 100 "
            "or less; nginx's waits until its next timer. It asks for up to 512 events because the panel connects "
            "through connect_many, whose loop keeps nginx's default event list (epoll_events 512, "
            "ngx_epoll_init_conf); nbconn.connect, one socket, asks for 8</div>")


def _check_shown_by_panel(settings: Settings) -> None:
    """Refuse a Settings the panel's controls cannot show (a TypeError for a non-Settings, a ValueError naming
    the setting): the panel's settings() must give back what it was given."""
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a nbconn.Settings, got {validate.shown(settings)}")
    flags, numbers = dict(FLAG_OPTIONS), {name for name, _, _ in NUMBER_OPTIONS}
    for name, value in settings.options.items():
        if name not in flags and name not in numbers:
            raise ValueError(f"the panel has no control for {name} (settings {settings!r})")
        if name in flags and value is not True:
            raise ValueError(f"the panel sets {name} or leaves it unset: {name}={value!r} has no control")
    for name, default in (("keep", False), ("trace", True), ("tcp_info", True), ("bind", None)):
        if getattr(settings, name) != default:
            raise ValueError(f"the panel has no control for {name}={getattr(settings, name)!r}")


def _options_html(res) -> str:
    if res.requested and not res.effective:
        return "<i>socket options set, not read back (nginx-exact: nginx reads nothing back)</i>"
    if not res.effective:
        return "<i>no socket options set: the kernel's defaults</i>"
    rows = []
    for name, value in res.effective.items():
        asked = res.requested.get(name)
        changed = value != asked
        style = " style='background:#fff3cd'" if changed else ""
        note = " (changed by the kernel)" if changed else ""
        rows.append(f"<tr{style}><td {_CELL}>{name}</td><td {_NUM}>{asked!r}</td><td {_CELL}>{value!r}{note}</td></tr>")
    return (f"<table class='nbconn-options' {_TABLE}><thead><tr><th {_CELL}>option</th><th {_NUM}>requested</th>"
            f"<th {_CELL}>effective</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def panel(**kwargs) -> LabPanel:
    """The whole lab panel (notebook 09)."""
    return LabPanel(**kwargs)


def timeout_slider_panel(timeout: float = 0.2) -> LabPanel:
    """A slice of the panel: the black hole, a timeout and Connect (notebook 06's experiment)."""
    return LabPanel(scenarios=["black hole (SYNs dropped)", "listening peer"], scenario="black hole (SYNs dropped)",
                    compact=True, timeout=timeout)


def scenario_picker_panel() -> LabPanel:
    """A slice of the panel: pick a scenario and Connect (notebooks 04 and 08)."""
    return LabPanel(compact=True)
