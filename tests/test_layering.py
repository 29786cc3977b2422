"""The layering of README.md's ARCHITECTURE section, enforced from the import graph.

Every ``import`` of an nbconn module anywhere in nbconn/ -- at module level and inside functions alike, read
with ``ast`` -- may only go to the same layer or one below, with no exception.  A module's layer is its package's
(nbconn/lab/, nginx/, experiments/, view/, cli/); the core's modules sit flat in nbconn/ and are listed here, so a
new flat module must be placed (the test names it).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: lowest first: a module may import its own layer and the ones before it, never one after
LAYERS = ("core", "lab", "nginx", "experiments", "view", "cli")

#: the core's modules sit flat in nbconn/ (what nginx does to connect, and the numbers about it: no matplotlib,
#: no lab, no subprocess); every other layer is a package, and a module's layer is its package's
CORE = ("", "api", "connect_nonb", "errors", "flow", "loop", "options", "result", "settings", "socketsource", "stats",
        "strace", "systools", "targets", "tcpinfo", "validate")  # "": nbconn/__init__.py, the public names

#: package (or top-level module) -> layer
PACKAGE_LAYER = {
    "lab": "lab",  # the instruments: peers, namespaces, the wire, the packet capture, counters
    "nginx": "nginx",  # the upstream model and the real nginx side by side
    "experiments": "experiments",  # what the notebooks run with the instruments
    "view": "view",  # figures and the widget panel
    "cli": "cli", "__main__": "cli",  # the command line: nothing else imports it
}

#: what core modules must not import at all (the core runs anywhere: no figures, no processes)
CORE_FORBIDDEN = ("matplotlib", "ipywidgets", "numpy", "subprocess", "IPython")


def _modules() -> dict[str, str]:
    """module name without "nbconn." ("" for the package, "lab.wire.link", ...) -> its file."""
    found = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "nbconn")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.join(ROOT, "nbconn"))[:-3].replace(os.sep, ".")
                found["" if rel == "__init__" else rel.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules: dict) -> list[tuple[str, int]]:
    """Every nbconn module ``module`` imports, anywhere in the file: (imported module, line)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name == "nbconn" or a.name.startswith("nbconn.")]
            out += [(name.removeprefix("nbconn").lstrip("."), node.lineno) for name in names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[:len(parts) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "nbconn" or (node.module or "").startswith("nbconn."):
                base = node.module.removeprefix("nbconn").lstrip(".")
            else:
                continue
            for alias in node.names:  # "from . import lab" imports the module nbconn.lab
                sub = f"{base}.{alias.name}" if base else alias.name
                out.append((sub if sub in modules else base, node.lineno))
    return [(name, line) for name, line in out if name != module]


def _layer(module: str) -> str | None:
    """The layer of ``module`` (without "nbconn."): the core's flat modules by name, the rest by package;
    None for a flat module the core does not list (the test names it)."""
    if module in CORE:
        return "core"
    return PACKAGE_LAYER.get(module.split(".")[0])


def test_every_module_has_a_layer():
    assert [m for m in _modules() if _layer(m) is None] == []


def test_no_import_goes_up_a_layer():
    modules = _modules()
    up = []
    for module, path in sorted(modules.items()):
        mine = LAYERS.index(_layer(module) or "core")
        for imported, line in _imports(module, path, modules):
            theirs = _layer(imported)
            if theirs is None or LAYERS.index(theirs) <= mine:
                continue
            up.append(f"nbconn/{os.path.relpath(path, os.path.join(ROOT, 'nbconn'))}:{line}: "
                      f"{module or 'nbconn'} ({_layer(module)}) imports {imported} ({theirs})")
    assert up == [], "\n".join(up)


def test_core_imports_no_figures_and_starts_no_processes():
    bad = []
    for module, path in _modules().items():
        if _layer(module) != "core":
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in CORE_FORBIDDEN]
    assert bad == [], bad


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, relative two levels up, is found and placed."""
    path = tmp_path / "capture.py"
    path.write_text("def f():\n    from ..view.plots import packets\n    import nbconn.view.widgets\n")
    found = _imports("lab.capture", str(path), {"view.plots": "", "view.widgets": ""})
    assert found == [("view.plots", 2), ("view.widgets", 3)]
    assert [_layer(m) for m, _ in found] == ["view", "view"] and _layer("lab.wire.link") == "lab"
    assert _layer("upstream") is None and _layer("nginx.upstream") == "nginx"

