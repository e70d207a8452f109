"""The layers are a rule, not a convention (docs/ARCHITECTURE.md, "Code layout").

Every first-party import of every module, at module top or inside a function, is read with
``ast``, and so is every import named as a string (a package's ``lazy_exports``,
``importlib.import_module`` with a constant name): ``salient`` root < ``store`` < ``pipeline`` < ``trainer`` < ``jobs``, a module imports
only from its own layer or below, ``jobs/runtime`` imports no job, a first-party import inside a
function says why on its line (``# lazy: …``), and the module graph has no cycle. Each rule is
also run on a small planted tree, so the checks are shown to fail.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (package, layer); the root package lives in salient_root/
FOLDERS = {
    "salient_root": ("salient", 0),
    "store": ("salient.store", 1),
    "pipeline": ("salient.pipeline", 2),
    "trainer": ("salient.trainer", 3),
    "jobs": ("salient.jobs", 4),
}


def _modules(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every first-party module under ``root``."""
    found = {}
    for folder, (package, _) in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, module: str = "") -> list[tuple[str, int, str]]:
    """``(module, line, where)`` of every import in ``path`` (the module ``module``), ``where``
    being ``top``, ``typing`` (under a module-level ``if TYPE_CHECKING:``, never run),
    ``declared`` (inside a function, its line saying why: ``# lazy: <reason>``) or ``lazy``; a
    ``from X import Y`` counts as ``X.Y`` when that is a module, else ``X`` (see _resolve).
    Imports named as strings count too (:func:`_named_imports`): a package's
    ``lazy_exports`` modules (``declared``: that call says why) and
    ``importlib.import_module`` with a constant name (as an import statement where it
    stands)."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    where = {id(node): "top" for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            where.update({id(child): "typing" for child in node.body})
    in_function = {
        id(inner)
        for outer in ast.walk(tree)
        if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for inner in ast.walk(outer)
    }
    out = []
    for node in ast.walk(tree):
        kind = where.get(id(node), "lazy")
        if isinstance(node, ast.Call):
            kind = "lazy" if id(node) in in_function else "top"
        if kind == "lazy" and isinstance(node, ast.Import | ast.ImportFrom | ast.Call):
            end = lines[(node.end_lineno or node.lineno) - 1]
            if _LAZY_REASON.search(end):
                kind = "declared"
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, kind) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(f"{node.module}.{a.name}", node.lineno, kind) for a in node.names]
        elif isinstance(node, ast.Call):
            for name, lazy in _named_imports(node, module, path.name == "__init__.py"):
                out.append((name, node.lineno, "declared" if lazy else kind))
    return out


_LAZY_REASON = re.compile(r"#\s*lazy:\s*\S")  # "# lazy: <why>" on an import's (last) line


def _named_imports(call: ast.Call, module: str, package: bool) -> list[tuple[str, bool]]:
    """``(module, lazy)`` of each module the call imports by a constant name:
    ``lazy_exports(PACKAGE, {MODULE: [names]})`` (salient.lazy: ``lazy`` True, each module
    loads when one of its names is first read) and ``importlib.import_module(NAME[,
    PACKAGE])``. A relative name is read against ``PACKAGE`` when it is a constant,
    ``__name__`` or ``__package__`` (``module``'s; ``package``: ``module`` is a package)."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called == "lazy_exports" and len(call.args) == 2 and isinstance(call.args[1], ast.Dict):
        anchor, keys = call.args[0], call.args[1].keys
        lazy = True
    elif called == "import_module" and call.args:
        anchor, keys = (call.args[1] if len(call.args) > 1 else None), call.args[:1]
        lazy = False
    else:
        return []
    names = [key.value for key in keys if isinstance(key, ast.Constant)]
    found = []
    for name in (name for name in names if isinstance(name, str)):
        if name.startswith("."):
            base = _anchor(anchor, module, package)
            if base is None:
                continue
            name = importlib.util.resolve_name(name, base)
        found.append((name, lazy))
    return found


def _anchor(node: ast.expr | None, module: str, package: bool) -> str | None:
    """The package a relative name is read against: a constant, or ``module``'s own
    ``__name__`` / ``__package__``; None when the call does not say."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id == "__name__":
        return module
    if isinstance(node, ast.Name) and node.id == "__package__":
        return module if package else module.rpartition(".")[0]
    return None


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The first-party module ``name`` refers to (itself or the nearest enclosing one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _layer(module: str) -> int:
    return max(layer for package, layer in FOLDERS.values() if _within(module, package))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The first-party import graph and the rule breaks found while building it."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    problems: list[str] = []
    for name, path in modules.items():
        for imported, line, kind in _imports(path, name):
            target = _resolve(imported, modules)
            where = f"{path.relative_to(root)}:{line}"
            if target is None or target == name:  # third-party: lazy ones (ray) are fine
                continue
            if kind == "lazy":
                problems.append(f"{where}: first-party import of {target} inside a function")
            if _layer(target) > _layer(name):
                problems.append(f"{where}: {name} imports {target}, a higher layer")
            runtime = "salient.jobs.runtime"
            if (
                _within(name, runtime)
                and _within(target, "salient.jobs")
                and not _within(target, runtime)
            ):
                problems.append(f"{where}: {name} (shared Ray plumbing) imports the job {target}")
            if kind != "typing":
                graph[name].update(_run_by_import(target, name, modules))
    return graph, list(dict.fromkeys(problems))


def _run_by_import(target: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """What importing ``target`` from ``importer`` runs: ``target`` and every package above it
    (each package's ``__init__`` runs first), except the packages ``importer`` is inside
    (theirs ran before it did)."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(modules)
    return {m for m in chain if not importer.startswith(m + ".") and m != importer}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _check(root: Path) -> list[str]:
    graph, problems = _graph(root)
    problems += [f"import cycle: {' <-> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def test_the_project_keeps_its_layers_and_has_no_cycle():
    problems = _check(ROOT)
    assert not problems, "\n".join(problems)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"store/a.py": "from salient.pipeline.b import x\n", "pipeline/b.py": "x = 1\n"},
         "a higher layer"),
        ({"trainer/a.py": "def f():\n    from salient.jobs.b import x\n", "jobs/b.py": "x = 1\n"},
         "a higher layer"),
        ({"pipeline/a.py": "def f():\n    from salient.store.b import x\n", "store/b.py": "x = 1\n"},
         "inside a function"),
        ({"pipeline/a.py": "def f():\n    from salient.store.b import x  # lazy:\n", "store/b.py": "x = 1\n"},
         "inside a function"),
        ({"store/a.py": "def f():\n    from salient.jobs.b import x  # lazy: torch\n", "jobs/b.py": "x = 1\n"},
         "a higher layer"),
        ({"jobs/runtime/__init__.py": "", "jobs/runtime/a.py": "import salient.jobs.train\n",
          "jobs/train.py": "x = 1\n"}, "shared Ray plumbing"),
        ({"jobs/a.py": "from salient.jobs.b import x\ny = 1\n", "jobs/b.py": "from salient.jobs.a import y\nx = 1\n"},
         "import cycle"),
        ({"jobs/t/__init__.py": "from salient.jobs.t.d import r\n", "jobs/t/d.py": "from salient.jobs.e import f\nr = 1\n",
          "jobs/t/c.py": "c = 1\n", "jobs/e.py": "from salient.jobs.t.c import c\nf = 1\n"},
         "import cycle"),
        # imports named as strings: a package's lazy exports, importlib with a constant name
        ({"store/__init__.py": "from salient.lazy import lazy_exports\n"
          "__all__, __getattr__ = lazy_exports(__name__, {'salient.jobs.b': ['x']})\n",
          "jobs/b.py": "x = 1\n"}, "a higher layer"),
        ({"pipeline/a.py": "import importlib\nm = importlib.import_module('salient.trainer.b')\n",
          "trainer/b.py": "x = 1\n"}, "a higher layer"),
        ({"jobs/a.py": "from importlib import import_module\n\ndef f():\n    import_module('salient.store.b')\n",
          "store/b.py": "x = 1\n"}, "inside a function"),
        ({"jobs/t/__init__.py": "from salient.lazy import lazy_exports\n"
          "__all__, __getattr__ = lazy_exports(__name__, {'.d': ['r']})\n",
          "jobs/t/d.py": "from salient.jobs.e import f\nr = 1\n", "jobs/t/c.py": "c = 1\n",
          "jobs/e.py": "from salient.jobs.t.c import c\nf = 1\n"}, "import cycle"),
    ],
)  # fmt: skip
def test_each_rule_catches_its_break(tmp_path, files, expected):
    problems = _check(_plant(tmp_path, files))
    assert any(expected in problem for problem in problems), problems


def test_a_clean_planted_tree_passes(tmp_path):
    files = {
        "store/a.py": "from salient.errors import E\n",
        "salient_root/errors.py": "E = 1\n",
        "jobs/b.py": "from salient.store.a import E\n\ndef f():\n    import ray\n",
        "jobs/c.py": "def f():\n    from salient.store.a import E  # lazy: keeps c light\n",
        "jobs/d/__init__.py": "from salient.lazy import lazy_exports\n"
        "__all__, __getattr__ = lazy_exports(__name__, {'.e': ['x'], 'salient.store.a': ['E']})\n",
        "jobs/d/e.py": "import importlib\n\ndef f():\n"
        "    return importlib.import_module('.a', 'salient.store')  # lazy: keeps e light\n",
    }
    assert _check(_plant(tmp_path, files)) == []


def _packages(root: Path) -> set[str]:
    """Every first-party package: each folder under ``FOLDERS`` that holds an ``__init__.py``."""
    return {name for name, path in _modules(root).items() if path.name == "__init__.py"}


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists the packages by hand (its package-dir maps folders to names, which
    setuptools' discovery does not follow): a package missing there is left out of a wheel, and
    ``pip install .`` without ``-e`` gives a job that cannot import."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    assert listed == _packages(ROOT)


def test_a_package_left_out_of_the_wheel_is_caught(tmp_path):
    root = _plant(tmp_path, {"jobs/__init__.py": "", "jobs/new/__init__.py": "", "jobs/a.py": ""})
    roots = {package for package, _ in FOLDERS.values()}
    assert _packages(root) == roots | {"salient.jobs.new"}  # a package, not a module (a.py)
