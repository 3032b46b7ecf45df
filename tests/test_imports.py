"""Boundaries between the app's own modules, read from their source.

Every import statement counts, those inside functions too: a function-level import is still a
dependency, and hiding a cycle in a function body does not remove it. The scan parses files
without importing them, so it costs milliseconds. The own modules are the top-level .py files
and every top-level package (web/, training/, deploy/); the benchmarks and docs scripts are
checked for what they may import.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def own_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the project's top-level modules and packages."""
    modules = {path.stem: path for path in ROOT.glob("*.py") if path.stem.isidentifier()}  # not gunicorn.conf
    for init in ROOT.glob("*/__init__.py"):
        package = init.parent.name
        for path in init.parent.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


@functools.cache
def nodes_of(path: Path) -> tuple[ast.AST, ...]:
    """Every node of a file's syntax tree, parsed and walked once per test process (several
    tests read the same files)."""
    return tuple(ast.walk(ast.parse(path.read_text(), str(path))))


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name the module imports anywhere in it (`from a import b` gives a and a.b)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names = set()
    for node in nodes_of(path):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*filter(None, base), *([node.module] if node.module else [])])
            names |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Own module -> the own modules it imports (a submodule needs its package too)."""
    modules = own_modules()
    graph = {}
    for module, path in modules.items():
        needed = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            needed |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
        if "." in module:
            needed.add(module.rpartition(".")[0])
        graph[module] = needed - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for needed in sorted(graph[module]):
            cycle = visit(needed, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    return next(filter(None, (visit(module, []) for module in sorted(graph))), None)


def test_the_app_modules_import_without_cycles_counting_function_level_imports():
    graph = import_graph()
    assert {"app", "web", "web.api", "web.pages", "serving", "model_store", "training.data"} <= graph.keys()
    assert "model_store" in graph["serving"] and "web.errors" in graph["web.api"]  # the scan sees imports
    assert "registry.model_formats" in graph["model_sandbox"]  # ... and those inside function bodies
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def web_importers(graph: dict[str, set[str]]) -> set[str]:
    """The own modules outside the web layer that import from it."""
    return {
        module
        for module, needed in graph.items()
        if module.partition(".")[0] != "web" and any(name.partition(".")[0] == "web" for name in needed)
    }


def test_only_the_edges_import_the_web_layer():
    """The web layer sits on the domain (serving, registry, monitoring, ...), never under it: only
    the app factory, the CLI commands and the deployment scripts import from web/."""
    inner = {module for module in web_importers(import_graph()) if module != "app"}
    assert {module for module in inner if not module.startswith(("cli", "deploy."))} == set()
    assert "serving" in web_importers({"serving": {"web.prometheus"}, "web.ops": {"serving"}})


def test_find_cycle_reports_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def later():\n    from a import thing\n")
    graph = {name: imported_names(name, tmp_path / f"{name}.py") & {"a", "b"} for name in ("a", "b")}
    assert find_cycle(graph) == ["a", "b", "a"]


def script_imports(folder: str) -> dict[str, set[str]]:
    """Script file -> the top-level names it imports (scripts import each other by bare name)."""
    return {
        str(path.relative_to(ROOT)): {name.split(".")[0] for name in imported_names(path.stem, path)}
        for path in sorted((ROOT / folder).glob("*.py"))
    }


def test_benchmarks_do_not_import_tests_and_docs_import_neither():
    tests = {"tests"} | {path.stem for path in (ROOT / "tests").glob("*.py")}
    benchmarks = {"benchmarks"} | {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
    assert "serve" in script_imports("benchmarks")["benchmarks/soak.py"]  # the scan sees bare names
    wrong = {script: names & tests for script, names in script_imports("benchmarks").items()}
    wrong |= {script: names & (benchmarks | tests) for script, names in script_imports("docs").items()}
    assert {script: names for script, names in wrong.items() if names} == {}


def test_no_script_edits_sys_path():
    """The project is installed (`pip install -e .`, make install): its modules import from anywhere."""
    editing = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]:
        if path.parent.name == ".venv":
            continue
        for node in nodes_of(path):
            if isinstance(node, ast.Attribute) and ast.unparse(node) in ("sys.path.insert", "sys.path.append"):
                editing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not editing


# The web framework, its extensions, and the database layer the registry runs on.
FLASK_PACKAGES = (
    *("flask", "flask_sqlalchemy", "flask_migrate", "flask_login", "flask_wtf", "flask_limiter"),
    *("werkzeug", "sqlalchemy", "alembic"),
)


@pytest.mark.slow
def test_training_imports_no_web_framework_in_a_fresh_interpreter():
    """`train.py` and the training package, calibration_fit.py included, load neither Flask nor the database layer."""
    training = sorted(name for name in own_modules() if name.startswith("training."))
    code = (
        f"import sys, train, training, {', '.join(training)}\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({FLASK_PACKAGES!r}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", "loaded by training: " + result.stdout


def calls_by_module(method: str) -> dict[str, set[str]]:
    """Own module -> the receivers of its `X.method(...)` calls (`csrf` for csrf.init_app(app))."""
    found: dict[str, set[str]] = {}
    for module, path in own_modules().items():
        for node in nodes_of(path):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
                found.setdefault(module, set()).add(ast.unparse(node.func.value))
    return found


def test_extensions_are_bound_in_web_extensions_and_blueprints_registered_by_the_factory():
    extensions = {"db", "migrate", "csrf", "limiter", "login_manager", "model_serving"}
    binding = {module: receivers & extensions for module, receivers in calls_by_module("init_app").items()}
    assert binding.pop("web.extensions", set()) >= {"csrf", "limiter", "login_manager", "model_serving"}
    assert binding.pop("database", set()) == {"db", "migrate"}  # database.init_app, which web.extensions calls
    assert {module: receivers for module, receivers in binding.items() if receivers} == {}
    assert calls_by_module("register_blueprint") == {"app": {"app"}}


def test_the_installed_project_lists_every_top_level_module_and_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {*setuptools["py-modules"], *setuptools["packages"]}
    assert listed == {name for name in own_modules() if "." not in name}
