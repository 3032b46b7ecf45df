"""No import cycles among the app's own modules.

Reads each module's import-time imports (module and class bodies, not function bodies, not
`if TYPE_CHECKING:`) without importing anything, so it costs milliseconds. The own modules are
the top-level .py files and every top-level package (web/, and training/ once it lands).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def own_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the project's top-level modules and packages."""
    modules = {path.stem: path for path in ROOT.glob("*.py") if path.stem.isidentifier()}  # not gunicorn.conf
    for init in ROOT.glob("*/__init__.py"):
        package = init.parent.name
        for path in init.parent.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _import_time_statements(body: list[ast.stmt]):
    """The statements that run when the module is imported: not function bodies, not TYPE_CHECKING."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _import_time_statements(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _import_time_statements(getattr(node, field, []))


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name the module imports at import time (`from a import b` gives a and a.b)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names = set()
    for node in _import_time_statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*filter(None, base), *([node.module] if node.module else [])])
            names |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Own module -> the own modules it needs loaded first (a submodule needs its package too)."""
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


def test_the_app_modules_import_without_cycles():
    graph = import_graph()
    assert {"app", "web", "web.api", "web.pages", "serving", "model_store"} <= graph.keys()
    assert "model_store" in graph["serving"] and "web.errors" in graph["web.api"]  # the scan sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
