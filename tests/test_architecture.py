"""The package's shape, as a contract that stays true.

- the layers of ``pyproject.toml`` ([tool.importlinter]), checked by
  import-linter, which also fails on a copy of the package broken on
  purpose (so the contract can fail);
- no import cycle between modules and no private name imported from
  another module (function-level imports included);
- no function longer than 80 lines of code (docstring excluded);
- the plugin's operators and panels import only the public API
  (``prelabel.<name>``), the ``check_*`` functions, and the modules made
  for them (``constants``, ``progress``, ``panel_data``).
"""

import ast
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

import prelabel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "prelabel")
PLUGIN_FILES = ["__init__.py"] + [
    os.path.join(d, f)
    for d in ("operators", "panels")
    for f in sorted(os.listdir(os.path.join(REPO, d)))
    if f.endswith(".py")
]
MAX_LINES = 80


def _modules(root=PACKAGE):
    """``module name -> path`` of every module of the package."""
    out = {}
    base = os.path.dirname(root)
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(name, path, modules):
    """``(imported module, imported name or None)`` of a module."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                if not path.endswith("__init__.py"):
                    parts = parts[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in modules else base), alias.name


def _graph(modules):
    graph, private = defaultdict(set), []
    for name, path in modules.items():
        for target, imported in _imports(name, path, modules):
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if not target or target == name:
                continue
            graph[name].add(target)
            if imported and imported.startswith("_"):
                if not imported.startswith("__"):
                    private.append(f"{name} imports {imported} from {target}")
    return graph, private


def _cycles(graph):
    """The strongly connected components of more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_and_no_private_name_across_modules():
    graph, private = _graph(_modules())
    assert _cycles(graph) == []
    assert private == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(defaultdict(set, graph)) == [["a", "b", "c"]]


def _long_functions(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0]
            docstring = (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            )
            start = (
                body[1].lineno
                if docstring and len(body) > 1
                else (first.lineno)
            )
            lines = node.end_lineno - start + 1
            if lines > MAX_LINES:
                yield f"{path}:{node.name} {lines}"


def test_no_function_longer_than_80_lines():
    found = [
        long for path in _modules().values() for long in _long_functions(path)
    ]
    assert found == []


def _lint_imports(cwd, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return subprocess.run(
        [exe, "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layers_of_pyproject_hold():
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_the_layer_contract_fails_on_a_broken_copy(tmp_path):
    """The core importing FiftyOne, and the index importing the pipeline
    above it: both are reported."""
    copy = tmp_path / "prelabel"
    shutil.copytree(
        PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
    with open(copy / "core" / "vectors.py", "a") as f:
        f.write("\nimport fiftyone  # noqa\n")
    with open(copy / "index" / "base.py", "a") as f:
        f.write("\nimport prelabel.preannotate  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = _lint_imports(tmp_path, env)
    assert proc.returncode != 0
    assert "2 broken" in proc.stdout or "3 broken" in proc.stdout
    assert "prelabel.core.vectors -> fiftyone" in proc.stdout


def _plugin_imports(path):
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "prelabel"
        ):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("prelabel."):
                    yield alias.name, []


#: the modules made for the plugin to import whole
PLUGIN_MODULES = {"constants", "progress", "panel_data"}


@pytest.mark.parametrize("path", PLUGIN_FILES)
def test_the_plugin_imports_only_the_public_api_and_checks(path):
    for module, names in _plugin_imports(path):
        if module == "prelabel":
            for name in names:
                assert (
                    name in prelabel.__all__ or name in PLUGIN_MODULES
                ), f"{path} imports prelabel.{name}"
            continue
        sub = module.removeprefix("prelabel.")
        if sub in PLUGIN_MODULES:
            continue
        for name in names:
            assert name.startswith(
                "check_"
            ), f"{path} imports {name} from {module}"


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("prelabel.knn", "vote", "prelabel.core.voting.vote"),
        (
            "prelabel.calibration",
            "calibrate",
            "prelabel.core.calibration.calibrate",
        ),
        (
            "prelabel.propagate",
            "knn_graph",
            "prelabel.core.vectors.exact_neighbors",
        ),
        ("prelabel.scored", "adapt_index", "prelabel.adapt.adapt_index"),
        ("prelabel.sync", "sync_points", "prelabel.index.sync.sync_points"),
        ("prelabel.adapt", "train_head", "prelabel.core.adapter.train_head"),
        (
            "prelabel.preannotate",
            "resolve_index",
            "prelabel.neighbors.load_index",
        ),
    ],
)
def test_moved_names_still_import_with_a_warning(old, name, new):
    import importlib

    module, attr = new.rsplit(".", 1)
    want = getattr(importlib.import_module(module), attr)
    with pytest.warns(DeprecationWarning, match=f"{name} moved to {new}"):
        got = getattr(importlib.import_module(old), name)
    assert got is want
