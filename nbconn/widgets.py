"""The interactive lab: an ipywidgets panel to turn the flow's knobs and watch what changes.

Every control maps to one argument of :func:`nbconn.connect` (the socket options
of :data:`nbconn.options.OPTIONS`, the non-blocking method, the epoll trigger,
the connect timeout) or picks a lab peer.  "Connect" runs one attempt and shows
its trace, its timeline, its outcome with nginx's verdict, and the options the
kernel kept next to those you asked for.  "Run N" measures a distribution in a
background thread (so the notebook stays responsive and "Stop" works), and
earlier runs can be kept and overlaid.

Results go into HTML and Image widgets, never into an ``Output`` widget: text
printed into an Output is stored differently by JupyterLab and by nbval, which
would break the notebooks' strict validation.

ipywidgets and matplotlib are imported here only, so ``import nbconn`` stays light.
"""

from __future__ import annotations

import html
import io
import threading

import ipywidgets as w

from . import lab
from .api import connect, connect_many
from .errors import OUTCOME_COLOURS
from .measure import Measurement, scenario_target

SCENARIOS = {
    "listening peer": "listening",
    "refused (closed port)": "refused",
    "black hole (SYNs dropped)": "blackhole",
    "reset after accept": "reset",
    "slow acceptor (queue of 8)": "slow-accept",
    "AF_UNIX backlog full": "unix-full",
    "impaired link (delay/jitter/loss)": "impaired",
}
MAX_RUN = 5000


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


class LabPanel:
    """The panel.  ``panel.widget`` is the VBox to display; the panel also displays itself."""

    def __init__(self, *, scenarios=None, compact: bool = False, scenario: str = "listening peer",
                 timeout: float = 1.0) -> None:
        names = list(scenarios or SCENARIOS)
        self.wire_reason = lab.wire_unavailable_reason()
        style = {"description_width": "150px"}
        self.scenario = w.Dropdown(options=names, value=scenario, description="scenario", style=style)
        self.delay_ms = w.FloatSlider(value=10, min=0, max=200, step=1, description="delay each way (ms)", style=style)
        self.jitter_ms = w.FloatSlider(value=0, min=0, max=20, step=0.5, description="jitter (ms)", style=style)
        self.loss = w.FloatSlider(value=0, min=0, max=0.5, step=0.01, description="loss each way", style=style)
        self.wire_note = w.HTML()
        self.timeout = w.FloatLogSlider(value=timeout, base=10, min=-2, max=1, step=0.05,
                                        description="connect timeout (s)", style=style, readout_format=".2f")
        self.keepalive = w.Checkbox(description="SO_KEEPALIVE")
        self.nodelay = w.Checkbox(description="TCP_NODELAY")
        self.reuseaddr = w.Checkbox(description="SO_REUSEADDR")
        self.bind_address_no_port = w.Checkbox(description="IP_BIND_ADDRESS_NO_PORT")
        self.trigger = w.ToggleButtons(options=[("edge (EPOLLET)", "edge"), ("level", "level")], value="edge",
                                       description="epoll", style=style)
        self.nonblocking = w.Dropdown(options=[("ioctl(FIONBIO)", "ioctl"), ("fcntl(O_NONBLOCK)", "fcntl"),
                                               ("sock.setblocking(False)", "setblocking")],
                                      value="ioctl", description="non-blocking via", style=style)
        self.rcvbuf = w.IntText(value=0, description="SO_RCVBUF (0=default)", style=style)
        self.sndbuf = w.IntText(value=0, description="SO_SNDBUF (0=default)", style=style)
        self.syncnt = w.IntText(value=0, description="TCP_SYNCNT (0=default)", style=style)
        self.user_timeout = w.IntText(value=0, description="TCP_USER_TIMEOUT ms", style=style)
        self.count = w.IntText(value=200, description="repeat count", style=style)
        self.concurrency = w.IntText(value=16, description="concurrency", style=style)
        self.keep_runs = w.Checkbox(value=True, description="keep earlier runs to compare")

        self.connect_button = w.Button(description="Connect", button_style="primary", icon="plug")
        self.run_button = w.Button(description="Run N", button_style="info", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear runs", icon="trash")

        self.status = w.HTML(value="<i>Pick a scenario and press Connect.</i>")
        self.outcome = w.HTML()
        self.trace = w.HTML()
        self.options_view = w.HTML()
        self.timeline = w.Image(format="png")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="run", layout={"visibility": "hidden"})
        self.distribution = w.Image(format="png")

        self.result = None  # the last Result of Connect
        self.runs: list[Measurement] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

        self.connect_button.on_click(lambda _: self.connect())
        self.run_button.on_click(lambda _: self.run(background=True))
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.scenario.observe(lambda _: self._sync_wire(), names="value")
        self._sync_wire()
        self.widget = self._layout(compact)

    # -- layout ----------------------------------------------------------------------
    def _layout(self, compact: bool):
        if compact:
            controls = w.VBox([self.scenario, self.timeout, w.HBox([self.connect_button])])
            return w.VBox([controls, self.status, self.outcome, self.timeline, self.trace])
        wire = w.VBox([self.delay_ms, self.jitter_ms, self.loss, self.wire_note])
        flags = w.VBox([self.keepalive, self.nodelay, self.reuseaddr, self.bind_address_no_port])
        numbers = w.VBox([self.rcvbuf, self.sndbuf, self.syncnt, self.user_timeout])
        flow = w.VBox([self.timeout, self.trigger, self.nonblocking, self.count, self.concurrency, self.keep_runs])
        tabs = w.Tab(children=[w.VBox([self.scenario, wire]), flow, w.HBox([flags, numbers])])
        for i, title in enumerate(("scenario", "the flow", "socket options")):
            tabs.set_title(i, title)
        buttons = w.HBox([self.connect_button, self.run_button, self.stop_button, self.clear_button])
        one = w.VBox([self.outcome, self.timeline, self.trace, self.options_view])
        return w.VBox([tabs, buttons, self.status, self.progress,
                       w.Accordion(children=[one, self.distribution], titles=("one connect", "distribution"),
                                   selected_index=0)])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _sync_wire(self) -> None:
        impaired = SCENARIOS.get(self.scenario.value) == "impaired"
        usable = impaired and self.wire_reason is None
        for slider in (self.delay_ms, self.jitter_ms, self.loss):
            slider.disabled = not usable
        if impaired and self.wire_reason:
            self.wire_note.value = f"<span style='color:#d62828'>the impaired link cannot run here: " \
                                   f"{html.escape(self.wire_reason)}</span>"
        else:
            self.wire_note.value = ""

    # -- reading the controls ---------------------------------------------------------
    def options(self) -> dict:
        """The keyword arguments for nbconn.connect that the controls describe (0 = leave the default)."""
        opts: dict = {"timeout": round(float(self.timeout.value), 3), "trigger": self.trigger.value,
                      "nonblocking": self.nonblocking.value}
        for box in ("keepalive", "nodelay", "reuseaddr", "bind_address_no_port"):
            if getattr(self, box).value:
                opts[box] = True
        for number in ("rcvbuf", "sndbuf", "syncnt", "user_timeout"):
            value = getattr(self, number).value
            if value:
                opts[number] = value
        return opts

    def _scenario_name(self) -> str:
        return SCENARIOS[self.scenario.value]

    def _target(self):
        """Start the chosen peer; a context manager yielding (target, context manager for the client side)."""
        name = self._scenario_name()
        if name == "impaired" and self.wire_reason:
            raise RuntimeError(f"the impaired link cannot run here: {self.wire_reason}")
        wire = {}
        if name == "impaired":
            wire = {"delay_ms": self.delay_ms.value, "jitter_ms": min(self.jitter_ms.value, self.delay_ms.value),
                    "loss": self.loss.value}
        return scenario_target(name, **wire)

    def _say(self, message: str, *, error: bool = False) -> None:
        colour = "#d62828" if error else "#333"
        self.status.value = f"<span style='color:{colour}'>{html.escape(message)}</span>"

    # -- Connect ------------------------------------------------------------------------
    def connect(self) -> None:
        """One attempt with the current settings; every result widget is updated."""
        try:
            opts = self.options()
            with self._target() as (target, client_side), client_side():
                res = connect(target, keep=False, **opts)
        except (ValueError, TypeError, RuntimeError) as exc:
            self._say(f"not connected: {exc}", error=True)
            return
        self.result = res
        colour = OUTCOME_COLOURS.get(res.outcome, "#333")
        ms = "" if res.handshake_ns is None else f" in {res.handshake_ns / 1e6:.3f} ms"
        self.outcome.value = (
            f"<b style='color:{colour}'>{res.outcome}</b> {html.escape(res.errno or '')}{ms} &nbsp; "
            f"connect() returned <code>{res.connect_returned}</code>; nginx: <code>{res.ngx_connect} -&gt; "
            f"{res.ngx_decision}</code>" + (f"<br>nginx would log: <code>{html.escape(res.ngx_log)}</code>"
                                           if res.ngx_log else ""))
        self.trace.value = _trace_html(res)
        self.options_view.value = _options_html(res)
        from . import plots

        self.timeline.value = _png(plots.timeline(res))
        self._say(f"{res.target}: {res.summary()}")

    # -- Run N ---------------------------------------------------------------------------
    def run(self, *, background: bool = False) -> None:
        """Measure ``count`` connects; in a thread when ``background`` (the Stop button can end it)."""
        try:
            opts = self.options()
            count, concurrency = self.count.value, self.concurrency.value
            if not 1 <= count <= MAX_RUN:
                raise ValueError(f"repeat count {count} is outside 1..{MAX_RUN}")
            if not 1 <= concurrency <= 1024:
                raise ValueError(f"concurrency {concurrency} is outside 1..1024")
            from .flow import check_settings

            check_settings(timeout=opts["timeout"], nonblocking=opts["nonblocking"], trigger=opts["trigger"],
                           options={k: v for k, v in opts.items() if k not in ("timeout", "nonblocking", "trigger")})
        except (ValueError, TypeError) as exc:
            self._say(f"not run: {exc}", error=True)
            return
        if self._thread is not None and self._thread.is_alive():
            self._say("a run is already going: press Stop first", error=True)
            return
        self._stop.clear()
        self.progress.max, self.progress.value = count, 0
        self.progress.layout.visibility = "visible"
        self.run_button.disabled, self.stop_button.disabled = True, False
        job = (lambda: self._run(count, concurrency, opts))
        if background:
            self._thread = threading.Thread(target=job, name="nbconn-lab-run", daemon=True)
            self._thread.start()
        else:
            job()

    def _run(self, count: int, concurrency: int, opts: dict) -> None:
        try:
            timeout = opts.pop("timeout")
            with self._target() as (target, client_side), client_side():
                results = connect_many([target] * count, concurrency=concurrency, timeout=timeout,
                                       on_result=self._tick, stop=self._stop.is_set, **opts)
            label = f"{self.scenario.value}, timeout {timeout:g} s"
            if any(m.label == label for m in self.runs):  # same settings again: number the repeat
                label += f" (#{sum(m.label.startswith(label) for m in self.runs) + 1})"
            m = Measurement.from_results(results, label=label, scenario=self._scenario_name(), timeout_s=timeout,
                                         concurrency=concurrency, settings=opts)
            with self._lock:
                self.runs = (self.runs if self.keep_runs.value else []) + [m]
            stopped = " (stopped)" if self._stop.is_set() else ""
            counts = ", ".join(f"{k} {v}" for k, v in m.outcome_counts().items())
            self._say(f"{label}: {counts}{stopped}")
            self._draw_runs()
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            self._say(f"run failed: {exc}", error=True)
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True
            self.progress.layout.visibility = "hidden"

    def _tick(self, index: int, result) -> None:
        self.progress.value += 1

    def _draw_runs(self) -> None:
        from . import plots

        with self._lock:
            runs = list(self.runs)
        if runs:
            self.distribution.value = _png(plots.compare(runs, log_x=True, title="handshake times"))
        else:
            self.distribution.value = b""

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Wait for a background run to end (bounded); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def clear(self) -> None:
        with self._lock:
            self.runs = []
        self._draw_runs()
        self._say("runs cleared")


def _trace_html(res) -> str:
    t0 = res.started_ns
    rows = "".join(
        f"<tr><td>{s.ngx_step.number if s.ngx_step else ''}</td><td>{(s.t_ns - t0) / 1e3:.1f}</td>"
        f"<td><code>{html.escape(s.call)}</code></td></tr>" for s in res.steps)
    return ("<table class='nbconn-trace'><thead><tr><th>seed step</th><th>µs since socket()</th><th>syscall</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _options_html(res) -> str:
    if not res.effective:
        return "<i>no socket options set: the kernel's defaults</i>"
    rows = []
    for name, value in res.effective.items():
        asked = res.requested.get(name)
        changed = value != asked
        style = " style='background:#fff3cd'" if changed else ""
        note = " (changed by the kernel)" if changed else ""
        rows.append(f"<tr{style}><td>{name}</td><td>{asked!r}</td><td>{value!r}{note}</td></tr>")
    return ("<table class='nbconn-options'><thead><tr><th>option</th><th>requested</th><th>effective</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def panel(**kwargs) -> LabPanel:
    """The whole lab panel (notebook 09)."""
    return LabPanel(**kwargs)


def timeout_slider_panel(timeout: float = 0.2) -> LabPanel:
    """A slice of the panel: the black hole, a timeout slider and Connect (notebook 06's experiment)."""
    return LabPanel(scenarios=["black hole (SYNs dropped)", "listening peer"], scenario="black hole (SYNs dropped)",
                    compact=True, timeout=timeout)


def scenario_picker_panel() -> LabPanel:
    """A slice of the panel: pick a scenario and Connect (notebooks 04 and 08)."""
    return LabPanel(compact=True)
