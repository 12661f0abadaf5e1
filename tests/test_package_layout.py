"""The package's modules import one another without cycles (at import time
or inside functions): each builds on the ones below it."""

import ast
from pathlib import Path

import densenet_efficient

PACKAGE = Path(densenet_efficient.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *([node.module] if node.module else [])])
            candidates = [target] + [f"{target}.{alias.name}".strip(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("densenet_efficient"):
            target = node.module.removeprefix("densenet_efficient").strip(".")
            candidates = [target] + [f"{target}.{alias.name}".strip(".") for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name.removeprefix("densenet_efficient").strip(".") for a in node.names
                          if a.name.startswith("densenet_efficient.")]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name and c != "")
    return found


def test_no_import_cycles():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths) - {""}  # the package's __init__ imports its parts; it is no part itself
    graph = {name: _imports(path, name, modules) for name, path in paths.items() if name}
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            cycle = on_path[on_path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        on_path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
