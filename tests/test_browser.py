"""Notebook 09 in a real browser: JupyterLab on 127.0.0.1 with a token, headless Chromium, run all cells, then use
the panel as a learner would (issue 16): Connect on the black hole shows a disabled button and a "connecting" line
before its result; a refused value labels the old result "previous run"; Stop reports "not started" counts; the
timeout box shows the kernel's value and takes a typed value exactly.  Screenshots go to tests/artifacts/.
The page must not contact anything but 127.0.0.1."""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlparse

import pytest

from .conftest import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def _exactly(text):
    """A locator text filter for exactly this label (has_text alone would match "use 100 connects" for Connect)."""
    return re.compile(rf"^\s*{re.escape(text)}\s*$")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab():
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")  # the test environment's own
    if not os.path.exists(jupyter):
        pytest.skip("jupyter is not installed in this environment")
    lab_args = subprocess.run(["bash", os.path.join(ROOT, "dev"), "lab-args"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.split()
    tmp = tempfile.mkdtemp(prefix="nbconn-lab-")
    # serve a copy: running the cells in the browser must never autosave over the committed notebooks
    shutil.copytree(os.path.join(ROOT, "notebooks"), f"{tmp}/notebooks")
    token, port = secrets.token_hex(16), _free_port()
    keep = [a for a in lab_args if not a.startswith(("--LabApp.workspaces_dir", "--ServerApp.root_dir"))]
    argv = [jupyter, "lab", *keep, f"--ServerApp.root_dir={tmp}/notebooks",
            f"--LabApp.workspaces_dir={tmp}/workspaces", f"--ServerApp.runtime_dir={tmp}/runtime",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--no-browser",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands without clicking menus
            f"--IdentityProvider.token={token}"]
    env = dict(os.environ, JUPYTER_CONFIG_DIR=f"{tmp}/config", JUPYTER_DATA_DIR=f"{tmp}/data", HOME=tmp)
    env["JUPYTER_PATH"] = os.path.join(sys.prefix, "share", "jupyter")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/lab.log", "w"),
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("JupyterLab did not start: " + open(f"{tmp}/lab.log").read()[-2000:])
                time.sleep(0.3)
        # without the token, the server refuses (token auth stays on)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5)
        yield f"http://127.0.0.1:{port}", token
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(300)
def test_notebook_09_panel_in_chromium(jupyterlab):
    chromium = require_tool("chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    base, token = jupyterlab
    requests = []
    os.makedirs(ARTIFACTS, exist_ok=True)
    # playwright's launch() gives Chromium a fresh temporary profile of its own
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"{base}/lab/tree/09_interactive_lab.ipynb?token={token}", timeout=60_000)
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            # "Run All Cells" through JupyterLab's command registry; a click can land before the notebook is
            # ready for it, so ask again (bounded) until the panel's first widget appears
            page.wait_for_function(  # the notebook's kernel connected and idle: cells sent now will run
                "(() => { const app = window.jupyterapp; const w = app && app.shell.currentWidget;"
                " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
                " return !!k && k.connectionStatus === 'connected' && k.status === 'idle'"
                " && app.commands.isEnabled('notebook:run-all-cells'); })()", timeout=60_000)
            # 5. before the cells run, a panel's output is its text/plain fallback: a sentence, not "VBox(children=..."
            page.wait_for_selector(".jp-OutputArea-output", timeout=30_000)
            page.screenshot(path=os.path.join(ARTIFACTS, "lab09-0-before-run.png"))
            assert "VBox(children" not in page.inner_text(".jp-Notebook")
            dropdown = page.locator(".widget-dropdown select").first
            for attempt in range(3):
                page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
                try:
                    dropdown.wait_for(timeout=40_000)
                    break
                except sync_api.TimeoutError:
                    page.screenshot(path=os.path.join(ARTIFACTS, f"lab09-no-widget-{attempt}.png"))
            else:
                pytest.fail("the panel never rendered after three 'run all cells' (screenshots in tests/artifacts)")
            # wait until every code cell has run (its prompt shows a number), so the tour cells that drive the
            # panel from Python are done before the browser takes over
            page.wait_for_function("(() => { const p = [...document.querySelectorAll('.jp-CodeCell "
                                   ".jp-InputArea-prompt')]; return p.length > 0 && "
                                   "p.every(e => /\\[\\d+\\]/.test(e.textContent)); })()", timeout=90_000)
            html_has = ("[...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes(%s))")
            panel = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-tab")).first

            def shot(name):  # the panel itself, whatever its height (tests/artifacts/lab09-NAME.png)
                panel.screenshot(path=os.path.join(ARTIFACTS, f"lab09-{name}.png"))

            # 5. before anything is clicked: no raw widget repr, no broken-image icon under an unused panel
            assert "VBox(children" not in page.inner_text(".jp-Notebook")
            broken = page.evaluate("[...document.querySelectorAll('.jp-OutputArea img')].filter(i => "
                                   "i.offsetParent !== null && i.complete && i.naturalWidth === 0).length")
            assert broken == 0, f"{broken} broken image(s) in the notebook"
            # 6. the timeout box shows what the kernel holds after the tour (1.0 s), not a browser-side value
            flow_tab = panel.locator(".lm-TabBar-tabLabel", has_text="the flow").first
            flow_tab.click()
            timeout_box = panel.locator(".widget-text", has_text="connect timeout").locator("input").first
            assert float(timeout_box.input_value()) == 1.0, timeout_box.input_value()

            # 1. Connect on the black hole runs in the background: disabled button, a "connecting" line first
            timeout_box.fill("3")  # typed values are taken exactly: 3 is 3.000 s, not a slider's 3.162
            timeout_box.press("Enter")
            panel.locator(".lm-TabBar-tabLabel", has_text="scenario").first.click()
            panel.locator(".widget-dropdown select").first.select_option(label="black hole (SYNs dropped)")
            connect = panel.locator("button.jupyter-button", has_text=_exactly("Connect")).first
            connect.click()
            page.wait_for_function(html_has % "'connecting to black hole'", timeout=10_000)
            assert connect.is_disabled(), "Connect stays enabled while it runs"
            page.wait_for_function(html_has % "'s (up to 3.000 s)'", timeout=10_000)  # the clock ticks
            assert not page.evaluate(html_has % "'timed_out'"), "the result came before the 'connecting' line"
            shot("1-connecting")
            page.wait_for_function(html_has % "'timed_out ETIMEDOUT in 3'", timeout=30_000)
            assert page.evaluate(html_has % "'timeout 3.000 s'"), "the result does not say the timeout it used"
            page.wait_for_function("(b => !b.disabled)", arg=connect.element_handle(), timeout=10_000)
            shot("4-timed-out")

            # 2. a refused value labels the shown result "previous run"
            panel.locator(".lm-TabBar-tabLabel", has_text="socket options").first.click()
            rcvbuf = panel.locator(".widget-text", has_text="SO_RCVBUF").locator("input").first
            rcvbuf.fill("-5")
            rcvbuf.press("Enter")
            connect.click()
            page.wait_for_function(html_has % "'rcvbuf=-5'", timeout=10_000)
            page.wait_for_function(html_has % "'previous run'", timeout=10_000)
            shot("2-previous-run")
            panel.locator(".widget-checkbox", has_text="unset").first.locator("input").check()
            page.wait_for_function(html_has % "'settings changed'", timeout=10_000)

            # 3. Run N shows live progress; Stop counts "not started", not errors
            flow_tab.click()
            for label, value in (("connect timeout", "0.5"), ("repeat count", "200"), ("concurrency", "2")):
                box = panel.locator(".widget-text", has_text=label).locator("input").first
                box.fill(value)
                box.press("Enter")
            panel.locator("button.jupyter-button", has_text=_exactly("Run N")).first.click()
            page.wait_for_function("[...document.querySelectorAll('.widget-html')].some("
                                   "e => /running [1-9]\\d*\\/200/.test(e.textContent))", timeout=30_000)
            shot("3-running")
            panel.locator("button.jupyter-button", has_text=_exactly("Stop")).first.click()
            page.wait_for_function(html_has % "' not started'", timeout=15_000)
            status = page.evaluate("[...document.querySelectorAll('.widget-html')].map(e => e.textContent)"
                                   ".find(t => t.includes(' not started'))")
            assert " finished (timed_out" in status and "error" not in status, status
            shot("3-stopped")
            # Run N opens "distribution" itself, and "one connect" stays open beside it (two accordions: opening
            # one no longer folds the other away)
            page.wait_for_function("[...document.querySelectorAll('img.widget-image, .widget-image img')].some(i => i.naturalWidth > 0 "
                                   "&& i.getBoundingClientRect().height > 0)", timeout=15_000)
            shot("5-distribution")
            page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-dropdown")).last.screenshot(
                path=os.path.join(ARTIFACTS, "lab09-5-compact.png"))  # the unused compact slice: no broken image

            # 7. scenarios that need a word: the reset's first read, the slow acceptor's burst, the impaired link
            scenario_tab = panel.locator(".lm-TabBar-tabLabel", has_text="scenario").first
            scenario_tab.click()
            panel.locator(".widget-dropdown select").first.select_option(label="reset after accept")
            connect.click()
            page.wait_for_function(html_has % "'last Connect: reset after accept'", timeout=30_000)
            shot("7-reset")
            panel.locator(".widget-dropdown select").first.select_option(label="slow acceptor (queue of 8)")
            panel.locator("button.jupyter-button", has_text="use 100 connects").first.click()
            page.wait_for_function(html_has % "'press Run N'", timeout=10_000)
            shot("7-slow-acceptor")
            panel.locator(".widget-dropdown select").first.select_option(label="impaired link (delay/jitter/loss)")
            page.wait_for_function(html_has % "'real link with delay'", timeout=10_000)
            shot("7-impaired")

            # the trace of a refused connect, as before
            panel.locator(".lm-TabBar-tabLabel", has_text="scenario").first.click()
            panel.locator(".widget-dropdown select").first.select_option(label="refused (closed port)")
            connect.click()
            page.wait_for_function(html_has % "': refused ECONNREFUSED'", timeout=30_000)
            page.wait_for_selector("table.nbconn-trace", timeout=30_000)
            trace = page.locator("table.nbconn-trace").first.inner_text()
            assert "getsockopt" in trace and "SO_ERROR, [111]" in trace
            page.locator("table.nbconn-trace").first.scroll_into_view_if_needed()
            page.screenshot(path=os.path.join(ARTIFACTS, "lab09.png"), full_page=False)
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page contacted {hosts - {'127.0.0.1'}}"
