"""One name, one home (issue 20): each rule or table is defined in one module, the others import it.

Read from the source with ``ast`` (no import needed): a second definition fails here, naming file and line."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(*bases):
    for base in bases:
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        yield os.path.relpath(path, ROOT), f.read()


def _assigned_names(tree):
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name):
                    yield leaf.id, node.lineno


@pytest.mark.parametrize("name, home", [
    ("SCENARIOS", "nbconn/validate.py"),
    ("CAPTURE_SCENARIOS", "nbconn/validate.py"),
    ("OUTCOME_COLOURS", "nbconn/view/plots.py"),
])
def test_a_table_is_defined_in_its_home_only(name, home):
    where = [f"{path}:{line}" for path, text in _sources("nbconn", "benchmarks")
             for assigned, line in _assigned_names(ast.parse(text)) if assigned == name]
    assert where and all(w.startswith(home + ":") for w in where), where


def test_one_percentile_rule():
    """nbconn.stats is the one nearest-rank rule: no other module defines a percentile or loads stats.py by path."""
    where = []
    for path, text in _sources("nbconn", "benchmarks"):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and "percentile" in node.name and path != "nbconn/stats.py":
                where.append(f"{path}:{node.lineno} def {node.name}")
        if "stats.py" in text and "spec_from_file_location" in text:
            where.append(f"{path}: loads stats.py by path")
    assert not where, where


def test_colours_and_tool_lookups_have_one_home():
    """The palette's literals live in plots.py; a system tool is found through nbconn.systools.find only."""
    where = []
    for path, text in _sources("nbconn"):
        for n, line in enumerate(text.splitlines(), 1):
            if "#d62828" in line.lower() and path != "nbconn/view/plots.py":
                where.append(f"{path}:{n}: {line.strip()}")
            if "shutil.which(" in line and path != "nbconn/systools.py":
                where.append(f"{path}:{n}: {line.strip()}")
    assert not where, where


#: test modules other helpers were editing this session; their own polling helper goes in a later step (issue 20)
POLLING_HELPER_EXCEPTIONS = {"tests/test_nginx_exact.py"}


def test_tests_poll_through_the_one_helper():
    """tests/conftest.py's wait_for is the one polling helper: no test module defines its own."""
    where = []
    for path, text in _sources("tests"):
        if path == "tests/conftest.py" or path in POLLING_HELPER_EXCEPTIONS:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in ("wait_for", "until", "wait_until",
                                                                                "poll", "eventually"):
                where.append(f"{path}:{node.lineno} def {node.name}")
    assert not where, where
