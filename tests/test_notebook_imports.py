"""Everything a notebook imports is installed with the package itself (issue 21: 12 imported trio, a test extra)."""

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\b|import\s+([\w., ]+))", re.M)
#: import name -> distribution name, where the two differ
DISTRIBUTION = {"ipython": "jupyterlab"}  # IPython comes with the kernel jupyterlab installs


def _runtime_dependencies() -> set:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: the same parser, as pip vendors it
        from pip._vendor import tomli as tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]  # not the extras: a learner may install none
    return {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps}


def _imported(path: str) -> set:
    with open(path) as f:
        cells = json.load(f)["cells"]
    names = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for m in IMPORT.finditer("".join(cell["source"])):
            parts = [m.group(1)] if m.group(1) else [n.strip().split(" as ")[0] for n in m.group(2).split(",")]
            names |= {p.split(".")[0] for p in parts if p.strip()}
    return names


def test_every_notebook_import_is_a_package_dependency():
    deps = _runtime_dependencies()
    missing = {}
    for path in NOTEBOOKS:
        for name in _imported(path) - set(sys.stdlib_module_names) - {"nbconn"}:
            if DISTRIBUTION.get(name.lower(), name.lower()) not in deps:
                missing.setdefault(name, []).append(os.path.basename(path))
    assert not missing, f"imported by a notebook but not in [project] dependencies: {missing}"


def test_the_scan_sees_third_party_imports():
    # guards the scan itself: notebook 12 imports trio, so an empty result would mean the regex broke
    assert "trio" in set().union(*(_imported(p) for p in NOTEBOOKS))
