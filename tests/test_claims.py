"""docs/claims.md checks itself: every row names what fails when its claim stops being true (issue 19 E).

A `behaviour` row names a test in tests/ or a notebook cell that prints the number next to its bound; an
`attribution` row (which function, line or version does a thing) names a pinned source.  This module checks that
each named test and cell exists, and that the README's claims paragraph states the counts computed here.
Run `python -m tests.test_claims` to print the counts and rewrite that sentence of the README.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = os.path.join(ROOT, "docs", "claims.md")
README = os.path.join(ROOT, "README.md")
COLUMNS = ("notebook", "cell", "claim", "shown_by", "evidence", "kind", "checked_by")
KINDS = ("behaviour", "attribution")
ITEM = re.compile(r"(test|cell|source): (\S.*)")
TEST = re.compile(r"(tests/test_\w+\.py)::(\w+)(\[[^\]]+\])?")
CELL = re.compile(r"(?:(\d\d)/)?([\w-]+)")
# A pinned source: a line of a tagged nginx, a git grep at a tag, a function of a tagged Linux, an RFC section.
PINS = (re.compile(r"NG/\S+#L\d+"),
        re.compile(r"https://github\.com/nginx/nginx/blob/release-[\d.]+/\S+#L\d+"),
        re.compile(r"git grep .+ release-[\d.]+"),
        re.compile(r"linux v\d+\.\d+ [\w/.-]+\.[ch] \w+"),
        re.compile(r"RFC \d+ section \d+"))
# the sentence as it stands in the README, wrapped at any space
COUNTS_SENTENCE = re.compile(r"The\s+ledger\s+holds\s+\d+\s+claims:.*?pinned\s+to\s+a\s+source\s+line\.", re.S)
WHAT_TO_ADD = ("add two columns at its end: ' behaviour | test: tests/FILE.py::TEST_NAME |' (or 'cell: CELLID' of a "
               "cell that prints the number next to its bound), or, only where nothing can be measured, "
               "' attribution | source: NG/FILE#L<n> |' (see the Format section of docs/claims.md)")


def ledger() -> list[dict]:
    """The rows of the claims table, each with its line number and how many columns it has."""
    rows, in_table = [], False
    with open(CLAIMS) as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("| notebook | cell | claim"):
                in_table = True
                continue
            if not in_table or not line.startswith("|"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= {"-", ":"}:
                continue  # the separator line
            row = dict(zip(COLUMNS, cells))
            row.update(line=lineno, columns=len(cells))
            rows.append(row)
    return rows


def where(row: dict) -> str:
    return f"docs/claims.md:{row['line']} ({row['notebook']} {row['cell']}: {row['claim'][:60]}...)"


def checks(row: dict) -> list[tuple[str, str]]:
    """The `checked by` items of a row as (what, value): ('test', 'tests/x.py::name'), ('cell', 'id'), ..."""
    items = []
    for part in row.get("checked_by", "").split(";"):
        m = ITEM.fullmatch(part.strip())
        if m:
            items.append((m.group(1), m.group(2).strip()))
        elif part.strip() not in ("", "-"):
            items.append(("?", part.strip()))
    return items


@functools.lru_cache(maxsize=None)
def functions_in(path: str) -> frozenset[str]:
    """The names of the functions defined at any level of a test file."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    return frozenset(node.name for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


@functools.lru_cache(maxsize=None)
def collected_ids(path: str) -> frozenset[str]:
    """The test ids pytest collects from one file (only asked for when a row names a parametrised case)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", path],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return frozenset(line.strip() for line in proc.stdout.splitlines() if "::" in line)


@functools.lru_cache(maxsize=None)
def cell_outputs(number: str) -> dict[str, str] | None:
    """{cell id: the text the cell printed as stored} of notebook ``number`` (markdown cells: None), or None."""
    import nbformat

    paths = glob.glob(os.path.join(ROOT, "notebooks", f"{number}_*.ipynb"))
    if not paths:
        return None
    return {c.get("id"): None if c.cell_type != "code" else "".join(
        o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in c.get("outputs", []))
        for c in nbformat.read(paths[0], as_version=4).cells}


def counts(rows: list[dict]) -> dict:
    behaviour = [r for r in rows if r.get("kind") == "behaviour"]
    by_test = [r for r in behaviour if any(what == "test" for what, _ in checks(r))]
    by_cell = [r for r in behaviour if r not in by_test and any(what == "cell" for what, _ in checks(r))]
    return {"rows": len(rows), "behaviour": len(behaviour), "by_test": len(by_test), "by_cell_only": len(by_cell),
            "attribution": sum(r.get("kind") == "attribution" for r in rows)}


def sentence(c: dict) -> str:
    """The README's statement of the counts (one line, so the test can find it)."""
    live = c["by_test"] + c["by_cell_only"]
    return (f"The ledger holds {c['rows']} claims: {c['behaviour']} about behaviour, {live} of them "
            f"({100 * live // max(c['behaviour'], 1)} %) with a live check ({c['by_test']} checked by a test in "
            f"`tests/`, {c['by_cell_only']} only by a notebook cell that prints the number next to its bound), and "
            f"{c['attribution']} attributions pinned to a source line.")


# -- the tests ------------------------------------------------------------------------------------------------------

def test_the_ledger_has_rows():
    assert len(ledger()) > 100, "docs/claims.md: the claims table was not found or lost its rows"


def test_every_row_has_a_kind_and_a_check_of_that_kind():
    problems = []
    for row in ledger():
        if row["columns"] == 5:
            problems.append(f"{where(row)} has the old five columns: {WHAT_TO_ADD}")
            continue
        if row["columns"] != 7:
            problems.append(f"{where(row)} has {row['columns']} columns, not 7 (no '|' inside a cell)")
            continue
        if row["kind"] not in KINDS:
            problems.append(f"{where(row)}: kind {row['kind']!r} is not one of {KINDS}")
            continue
        items = checks(row)
        for what, value in items:
            if what == "?":
                problems.append(f"{where(row)}: {value!r} in 'checked by' is not 'test: ...', 'cell: ...' "
                                f"or 'source: ...'")
        live = [v for what, v in items if what in ("test", "cell")]
        if row["kind"] == "behaviour" and not live:
            problems.append(f"{where(row)} is a behaviour claim with no check: name the test that measures it "
                            f"('test: tests/FILE.py::TEST_NAME') or the cell that prints it with its bound "
                            f"('cell: CELLID'); write the test if there is none")
        if row["kind"] == "attribution" and not any(what == "source" for what, _ in items):
            problems.append(f"{where(row)} is an attribution with no 'source: ' pin")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_every_named_test_exists():
    problems = []
    for row in ledger():
        for what, value in checks(row):
            if what != "test":
                continue
            m = TEST.fullmatch(value)
            if not m:
                problems.append(f"{where(row)}: {value!r} is not tests/FILE.py::TEST_NAME")
            elif not os.path.exists(os.path.join(ROOT, m.group(1))):
                problems.append(f"{where(row)}: no file {m.group(1)}")
            elif m.group(2) not in functions_in(m.group(1)):
                problems.append(f"{where(row)}: {m.group(1)} has no function {m.group(2)}")
            elif not m.group(2).startswith("test_"):
                problems.append(f"{where(row)}: {m.group(2)} is not a test")
            elif m.group(3) and value not in collected_ids(m.group(1)):
                problems.append(f"{where(row)}: {m.group(1)} has no parametrised case {m.group(2)}{m.group(3)}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_every_named_cell_exists_and_prints_a_number():
    problems = []
    for row in ledger():
        for what, value in checks(row):
            if what != "cell":
                continue
            m = CELL.fullmatch(value)
            number = (m.group(1) if m else None) or row["notebook"]
            outputs = cell_outputs(number) if re.fullmatch(r"\d\d", number) else None
            if not m:
                problems.append(f"{where(row)}: {value!r} is not CELLID or NN/CELLID")
            elif outputs is None:
                problems.append(f"{where(row)}: 'cell: {value}' but there is no notebook {number}")
            elif m.group(2) not in outputs:
                problems.append(f"{where(row)}: notebook {number} has no cell {m.group(2)!r}")
            elif not re.search(r"\d", outputs[m.group(2)] or ""):
                # a check prints its number (next to its bound): a markdown cell or a silent one checks nothing
                problems.append(f"{where(row)}: cell {number}/{m.group(2)} prints no number; name the code "
                                f"cell that prints the measurement and its bound")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_every_source_is_pinned():
    problems = []
    for row in ledger():
        for what, value in checks(row):
            if what == "source" and not any(p.search(value) for p in PINS):
                problems.append(f"{where(row)}: source {value!r} is not pinned (NG/FILE#L<n>, a release-X "
                                f"link with #L<n>, 'git grep ... release-X', 'linux vX.Y FILE FUNCTION', "
                                f"'RFC N section S')")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_readme_states_the_counts_computed_here():
    c = counts(ledger())
    print(sentence(c))
    with open(README) as f:
        readme = f.read()
    stated = [" ".join(s.split()) for s in COUNTS_SENTENCE.findall(readme)]
    assert len(stated) <= 1, f"README.md states the counts {len(stated)} times: keep one sentence"
    assert stated == [sentence(c)], (
        f"README.md's claims paragraph must state: {sentence(c)!r} (run `python -m tests.test_claims` to write it)")


def update_readme() -> str:
    """Rewrite the counts sentence in README.md's claims paragraph; returns the sentence."""
    text = sentence(counts(ledger()))
    with open(README) as f:
        readme = f.read()
    wrapped = textwrap.fill(text, width=115)
    if COUNTS_SENTENCE.search(readme):
        readme = COUNTS_SENTENCE.sub(lambda _: wrapped, readme, count=1)
    else:
        anchor = "Every claim the notebooks make is listed in [`docs/claims.md`](docs/claims.md)"
        start = readme.index(anchor)
        end = readme.index("\n\n", start)
        readme = readme[:end] + "\n" + wrapped + readme[end:]
    with open(README, "w") as f:
        f.write(readme)
    return text


if __name__ == "__main__":
    print(update_readme())


def test_a_row_in_the_old_five_columns_is_told_what_to_add(tmp_path, monkeypatch):
    """Rows written before the two columns existed (other branches add some) fail with the columns to add."""
    ledger_copy = tmp_path / "claims.md"
    with open(CLAIMS) as f:
        text = f.read()
    ledger_copy.write_text(text.rstrip("\n") + "\n| 04 | icmp | A claim. | live measurement | printed |\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["CLAIMS"]), "CLAIMS", str(ledger_copy))
    with pytest.raises(pytest.fail.Exception) as failed:
        test_every_row_has_a_kind_and_a_check_of_that_kind()
    message = str(failed.value)
    assert "04 icmp" in message and "old five columns" in message
    assert "' behaviour | test: tests/FILE.py::TEST_NAME |'" in message and "' attribution | source: " in message
    assert message.count("\n") == 0, "only the new row fails"
