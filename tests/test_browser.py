"""Notebook 09 in a real browser: JupyterLab on 127.0.0.1 with a token, headless Chromium, run all cells,
change a value, click Connect, see the trace and the outcome.  The page must not contact anything but 127.0.0.1."""

import os
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


@pytest.mark.timeout(180)
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
            page.locator(".lm-TabBar-tabLabel", has_text="scenario").first.click()
            dropdown.select_option(label="refused (closed port)")
            page.locator("button.jupyter-button", has_text="Connect").first.click()
            page.wait_for_function("[...document.querySelectorAll('.widget-html')].some("
                                   "e => e.textContent.includes('ECONNREFUSED'))", timeout=30_000)
            page.wait_for_selector("table.nbconn-trace", timeout=30_000)
            trace = page.locator("table.nbconn-trace").first.inner_text()
            assert "getsockopt" in trace and "SO_ERROR, [111]" in trace
            page.locator("table.nbconn-trace").first.scroll_into_view_if_needed()
            page.screenshot(path=os.path.join(ARTIFACTS, "lab09.png"), full_page=False)
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page contacted {hosts - {'127.0.0.1'}}"
