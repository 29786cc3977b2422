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
    assert numbers[:11] == [f"{i:02d}" for i in range(11)]
    assert numbers == [f"{i:02d}" for i in range(len(numbers))], "numbers run 00, 01, ... without gaps"


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
    # nbval's markers live in cell tags (nbval-ignore-output, ...), never as comments in the code the reader sees
    for c in code:
        assert not re.search(r"#\s*(NBVAL_|PYTEST_VALIDATE_)", "".join(c["source"])), "".join(c["source"])
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in code]
    ignored = sum("nbval-ignore-output" in t for t in tags)
    assert ignored <= 2, "nbval-ignore-output only for inherently variable output (a widget)"
    assert not any("nbval-skip" in t for t in tags)


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


# -- the structure every notebook NN_*.ipynb follows (issue 11) ----------------------------------------------------
#
# 1. "## Objectives": a line exactly "## Objectives" in a markdown cell among the first two cells, followed (before
#    the next heading or the end of that cell) by 2 to 4 bullet lines starting with "- ".
# 2. The last cell is markdown and holds, in this order:
#    - a line exactly "## What you saw", followed by at least one bullet line ("- ");
#    - a line exactly "## Exercises", followed by 2 or 3 numbered lines ("1. ", "2. ", "3. "; lines inside the
#      answers are not counted);
#    - the answers collapsed: "<details><summary>...</summary>" ... "</details>", one block after each exercise
#      or one block after all of them;
#    - the "Next: [NN · title](NN_name.ipynb)" line (test_notebook_shape).
# 3. No stored output is a bare boolean: no output line that is just True or False, and none ending in ": True",
#    ": False", "= True" or "= False" -- print the number and its bound instead.
# 4. Every plot cell stores a PNG: an output whose text/plain is a matplotlib "<Figure size ...>" carries image/png,
#    and a code cell that calls plots.*( or plt.* stores at least one image/png output.

#: Every notebook follows the structure; the tests below run strictly for all of them.
STRUCTURED = [pytest.param(p, id=os.path.basename(p)) for p in NOTEBOOKS]


def _lines_after(text: str, heading: str) -> list[str]:
    """The lines after ``heading`` up to the next markdown heading."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    out = []
    for line in lines[start:]:
        if line.startswith("#"):
            break
        out.append(line)
    return out


@pytest.mark.parametrize("path", STRUCTURED)
def test_notebook_starts_with_objectives(path):
    cells = load(path)["cells"][:2]
    texts = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    holder = [t for t in texts if "## Objectives" in t.splitlines()]
    assert holder, "one of the first two cells has a line '## Objectives'"
    bullets = [line for line in _lines_after(holder[0], "## Objectives") if line.startswith("- ")]
    assert 2 <= len(bullets) <= 4, f"2-4 objectives ('- ' lines), found {len(bullets)}"


@pytest.mark.parametrize("path", STRUCTURED)
def test_notebook_ends_with_what_you_saw_and_exercises(path):
    last = load(path)["cells"][-1]
    assert last["cell_type"] == "markdown"
    lines = "".join(last["source"]).splitlines()
    assert "## What you saw" in lines and "## Exercises" in lines, "the last cell has both headings"
    assert lines.index("## What you saw") < lines.index("## Exercises")
    saw = _lines_after("\n".join(lines), "## What you saw")
    assert any(line.startswith("- ") for line in saw), "'What you saw' has bullets"
    exercises = "\n".join(lines[lines.index("## Exercises") + 1:])
    assert "<details>" in exercises and "<summary>" in exercises and "</details>" in exercises, "answers collapsed"
    # answers may follow each exercise or come together at the end: count the numbered lines outside them
    asked = [line for line in re.sub(r"<details>.*?</details>", "", exercises, flags=re.S).splitlines()
             if re.match(r"^\d+\. ", line)]
    assert 2 <= len(asked) <= 3, f"2-3 numbered exercises before the answers, found {len(asked)}"


_BARE_BOOLEAN = re.compile(r"^\s*(True|False)\s*$|[:=]\s*(True|False)\s*$")


def _output_texts(out: dict) -> list[str]:
    if "text" in out:
        return ["".join(out["text"])]
    return ["".join(out.get("data", {}).get("text/plain", ""))]


@pytest.mark.parametrize("path", STRUCTURED)
def test_no_output_is_a_bare_boolean(path):
    for c in load(path)["cells"]:
        for out in c.get("outputs", []):
            for text in _output_texts(out):
                for line in text.splitlines():
                    assert not _BARE_BOOLEAN.search(line), f"{c.get('id')}: print the number and its bound: {line!r}"


_PLOTS = re.compile(r"\bplots\.\w+\(|\bplt\.")


@pytest.mark.parametrize("path", STRUCTURED)
def test_every_plot_cell_stores_a_png(path):
    for c in load(path)["cells"]:
        if c["cell_type"] != "code":
            continue
        outputs = c.get("outputs", [])
        for out in outputs:
            plain = "".join(out.get("data", {}).get("text/plain", ""))
            if plain.startswith("<Figure size"):
                assert "image/png" in out["data"], f"{c.get('id')}: a Figure without its PNG"
        if _PLOTS.search("".join(c["source"])):
            assert any("image/png" in out.get("data", {}) for out in outputs), f"{c.get('id')}: plot cell, no PNG"


# -- the claims ledger, docs/claims.md ------------------------------------------------------------------------------

CLAIMS = os.path.join(ROOT, "docs", "claims.md")
SHOWN_BY = ("live measurement", "source line", "man page", "recording")


def claim_rows() -> list[dict]:
    """The table rows of docs/claims.md: notebook, cell, claim, shown by, evidence."""
    rows = []
    with open(CLAIMS) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
            if len(cells) not in (5, 7) or cells[0] in ("notebook", "") or set(cells[0]) <= {"-", ":"}:
                continue
            rows.append(dict(zip(("notebook", "cell", "claim", "shown_by", "evidence"), cells)))
    return rows


def test_every_notebook_claim_points_at_a_cell_that_exists():
    import nbformat

    rows = claim_rows()
    assert rows, "docs/claims.md has claim rows"
    ids = {}
    for path in NOTEBOOKS:
        ids[os.path.basename(path)[:2]] = {c.get("id") for c in nbformat.read(path, as_version=4).cells}
    for row in rows:
        assert row["shown_by"] in SHOWN_BY, f"'shown by' must be one of {SHOWN_BY}: {row}"
        assert row["claim"] and row["evidence"], row
        if re.fullmatch(r"\d\d", row["notebook"]):
            assert row["notebook"] in ids, f"no notebook {row['notebook']}: {row}"
            assert row["cell"].strip("`") in ids[row["notebook"]], f"no cell {row['cell']} in {row['notebook']}"


def test_notebooks_00_to_05_have_claims_in_the_ledger():
    have = {row["notebook"] for row in claim_rows()}
    assert {f"{i:02d}" for i in range(6)} <= have


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_as_jupyterlab_writes_it(path):
    """No per-cell timing and no widget state: JupyterLab's autosave would strip both and dirty the clone."""
    nb = load(path)
    timed = [i for i, cell in enumerate(nb["cells"]) if "execution" in cell.get("metadata", {})]
    assert not timed, f"cells {timed} carry timing metadata (re-execute with ./dev execute)"
    assert "widgets" not in nb["metadata"], "widget state is stored (re-execute with ./dev execute)"
