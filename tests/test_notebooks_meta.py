"""The series as a whole: numbered, titled, linked, executed with outputs, validated strictly, loopback only."""

import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
ALLOWED_IP = re.compile(r"^(127\.\d+\.\d+\.\d+|198\.1[89]\.\d+\.\d+|0\.0\.0\.0)$")


def load(path):
    with open(path) as f:
        return json.load(f)


def test_the_whole_series_is_there():
    numbers = [os.path.basename(p)[:2] for p in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(len(NOTEBOOKS))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_shape(path):
    nb = load(path)
    cells = nb["cells"]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert cells[0]["cell_type"] == "markdown"
    title = "".join(cells[0]["source"]).splitlines()[0]
    assert title.startswith(f"# {os.path.basename(path)[:2]} · ")
    last = "".join(cells[-1]["source"])
    assert "## What you saw" in last
    number = int(os.path.basename(path)[:2])
    following = [os.path.basename(p) for p in NOTEBOOKS if int(os.path.basename(p)[:2]) == number + 1]
    if following:  # the last one links back to the start, or on to a notebook another branch adds
        assert f"]({following[0]})" in last, f"{path} should end with a link to {following[0]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_executed_with_outputs_and_no_errors(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code), "every code cell is executed"
    assert sum(bool(c["outputs"]) for c in code) >= len(code) // 2
    for c in code:
        for out in c["outputs"]:
            assert out["output_type"] != "error", "".join(c["source"])
            assert "Traceback" not in "".join(out.get("text", ""))
    ignored = sum("NBVAL_IGNORE_OUTPUT" in "".join(c["source"]) for c in code)
    assert ignored <= 2, "NBVAL_IGNORE_OUTPUT only for inherently variable output (a widget)"
    assert not any("NBVAL_SKIP" in "".join(c["source"]) for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_code_cells_name_only_loopback_or_own_namespaces(path):
    for c in load(path)["cells"]:
        if c["cell_type"] != "code":
            continue
        for ip in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", "".join(c["source"])):
            assert ALLOWED_IP.match(ip), f"{path}: {ip}"


def test_plots_are_stored_as_images():
    images = 0
    for path in NOTEBOOKS:
        for c in load(path)["cells"]:
            for out in c.get("outputs", []):
                images += "image/png" in out.get("data", {})
    assert images >= 8


def test_index_in_readme_and_notebook_00_lists_every_notebook():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start = "".join("".join(c["source"]) for c in load(NOTEBOOKS[0])["cells"])
    for path in NOTEBOOKS:
        name = os.path.basename(path)
        assert name in readme, f"README does not list {name}"
        assert f"]({name})" in start, f"00 does not link {name}"


def test_validation_is_strict():
    with open(os.path.join(ROOT, "dev")) as f:
        dev = f.read()
    assert "--nbval " in dev and "--nbval-lax" not in dev and "--nbval-sanitize-with notebooks/sanitize.cfg" in dev
