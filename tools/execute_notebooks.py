"""Re-execute notebooks in place so their stored outputs match what nbconn does now.

    ./dev execute                 # every notebooks/NN_*.ipynb, in order
    ./dev execute notebooks/04_connect.ipynb

Each notebook runs in a fresh kernel of this environment with a per-cell
timeout, from the notebooks/ directory (as JupyterLab and nbval run them).
A cell error stops that notebook and makes the command exit 1.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT_S = 60


def execute(path: str) -> float:
    nb = nbformat.read(path, as_version=4)
    # Stored in the form JupyterLab writes back on save: no per-cell timing metadata (JupyterLab records none
    # unless asked) and no widget state (its widget manager saves none by default).  Otherwise the first
    # autosave rewrites every notebook and the learner's next `git pull` conflicts.
    for cell in nb.cells:  # and none left from an earlier run
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            store_widget_state=False,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    paths = argv or sorted(glob.glob(os.path.join(NOTEBOOKS, "[0-9][0-9]_*.ipynb")))
    failed = 0
    for path in paths:
        try:
            elapsed = execute(path)
            print(f"{os.path.relpath(path, ROOT)}: {elapsed:.1f} s")
        except CellExecutionError as exc:
            failed += 1
            print(f"{os.path.relpath(path, ROOT)}: FAILED\n{str(exc)[-2000:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
