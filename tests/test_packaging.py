"""The project's own promises: light import, deps in step, the lab command's safety settings."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject_deps():
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: the same parser, as pip vendors it (every venv has pip)
        from pip._vendor import tomli as tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += extra
    return {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower(): d for d in deps}


def _environment_deps():
    names = {}
    with open(os.path.join(ROOT, "environment.yml")) as f:
        text = f.read().split("dependencies:", 1)[1]
        for line in text.splitlines():
            m = re.match(r"\s+- ([A-Za-z0-9_.-]+)\s*([<>=!~].*)?$", line)
            if m and m.group(1) not in ("python", "pip", "-e"):
                names[m.group(1).lower()] = (m.group(1) + (m.group(2) or "")).replace(" ", "")
    return names


def test_environment_yml_matches_pyproject():
    py, env = _pyproject_deps(), _environment_deps()
    assert set(py) == set(env), f"only in pyproject: {set(py) - set(env)}, only in environment.yml: {set(env) - set(py)}"
    for name, spec in py.items():
        assert spec.replace(" ", "") == env[name], f"{name}: pyproject {spec!r} vs environment.yml {env[name]!r}"


def test_import_nbconn_is_light():
    code = ("import sys, nbconn; heavy = [m for m in ('matplotlib', 'ipywidgets', 'numpy', 'IPython', 'tqdm') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lab_command_binds_loopback_with_token_and_no_network_calls():
    out = subprocess.run(["bash", os.path.join(ROOT, "dev"), "lab-args"], capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    assert "--ServerApp.ip=127.0.0.1" in out
    assert not any("token=" in a.lower() and a.rstrip().endswith(("=", "=''", '=""')) for a in out)
    assert not any("disable_check_xsrf" in a or "password=" in a for a in out)
    assert "--LabApp.news_url=None" in out
    with open(os.path.join(ROOT, "dev")) as f:
        dev = f.read()
    assert '"fetchNews": "false"' in dev and '"checkForUpdates": false' in dev


def test_no_far_addresses_in_code_or_notebooks():
    """Traffic stays on loopback, AF_UNIX or our own namespaces: no private or public literals anywhere."""
    far = re.compile(r"\b(10\.\d+\.\d+\.\d+|192\.168\.\d+\.\d+|172\.(1[6-9]|2\d|3[01])\.\d+\.\d+|8\.8\.[48]\.[48]|"
                     r"1\.1\.1\.1)\b")
    hits = []
    for base in ("nbconn", "notebooks", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if name.endswith((".py", ".ipynb", ".c", ".cfg")):
                    path = os.path.join(dirpath, name)
                    with open(path, errors="replace") as f:
                        for n, line in enumerate(f, 1):
                            if far.search(line) and "noqa: far" not in line:
                                hits.append(f"{path}:{n}")
    assert not hits, hits


def test_package_init_is_plain_code():
    """nbconn/__init__.py neither reads sys.argv nor catches anything while importing (issue 20): it imports no
    module of its own, so a Ctrl-C at start-up lands in __main__'s handler, and `import nbconn` loads only itself."""
    import ast

    with open(os.path.join(ROOT, "nbconn", "__init__.py")) as f:
        tree = ast.parse(f.read())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Try)]
    assert "sys" not in {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    code = "import sys, nbconn; print(sorted(m for m in sys.modules if m.startswith('nbconn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.stdout.strip() == "['nbconn']", out.stdout + out.stderr


def test_lab_namespace_is_a_function_and_its_module_a_plain_module():
    """No callable-module trick (issue 20): lab.namespace is the function, whoever imported the module first."""
    code = ("import inspect, sys, types; import nbconn.lab.wire.link; from nbconn import lab; "
            "from nbconn.lab.namespace import namespace; "
            "print(inspect.isfunction(lab.namespace), lab.namespace is namespace, "
            "type(sys.modules['nbconn.lab.namespace']) is types.ModuleType)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr
