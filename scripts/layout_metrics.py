"""Measure the package's layout: module sizes, import cycles, function-local project imports and
private names used outside their module.

    python scripts/layout_metrics.py [--json]

Reads the source with `ast` only (imports nothing of the package), so it runs without the
package's dependencies. `tests/test_layout.py` asserts the rules on the same measurements.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGE = "dude_trl"


@dataclass
class ModuleInfo:
    name: str
    path: Path
    lines: int
    top_level_imports: set[str] = field(default_factory=set)
    local_imports: list[tuple[int, str]] = field(default_factory=list)  # (line, module) inside a function
    private_uses: list[tuple[int, str, str]] = field(default_factory=list)  # (line, module, name)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    """Absolute name of ``from <level dots><module> import ...`` inside `importer`."""
    if level == 0:
        return module
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _inside_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return True
    return False


def scan(root: Path) -> dict[str, ModuleInfo]:
    """One `ModuleInfo` per module of the package under `root` (the directory holding it)."""
    modules: dict[str, ModuleInfo] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = module_name(path, root)
        source = path.read_text()
        tree = ast.parse(source)
        info = ModuleInfo(name, path, len(source.splitlines()))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.ImportFrom):
                target = resolve(node.module or "", node.level, name, path.name == "__init__.py")
                names = [a.name for a in node.names]
                # `from . import x` imports the submodule x.
                targets = [(f"{target}.{n}" if not node.module else target, [n]) for n in names]
            elif isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            for target, names in targets:
                if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                    continue
                if _under_type_checking(node, parents):
                    continue
                if _inside_function(node, parents):
                    info.local_imports.append((node.lineno, target))
                else:
                    info.top_level_imports.add(target)
                for imported in names:
                    if imported.startswith("_") and not imported.startswith("__"):
                        info.private_uses.append((node.lineno, target, imported))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                # `module._name` where `module` is an imported project module
                if isinstance(node.value, ast.Name):
                    info.private_uses.extend(_private_attribute_uses(node, tree, name, path))
        modules[name] = info
    return modules


def _private_attribute_uses(node: ast.Attribute, tree: ast.Module, importer: str, path: Path):
    alias = node.value.id  # type: ignore[attr-defined]
    for imp in ast.walk(tree):
        if isinstance(imp, ast.ImportFrom) and imp.module is None:
            for a in imp.names:
                if (a.asname or a.name) == alias:
                    target = resolve("", imp.level, importer, path.name == "__init__.py") + "." + a.name
                    yield (node.lineno, target, node.attr)
        elif isinstance(imp, ast.Import):
            for a in imp.names:
                if (a.asname or a.name.split(".")[0]) == alias and a.name.startswith(PACKAGE):
                    yield (node.lineno, a.name, node.attr)


def _owner(target: str, modules: dict[str, ModuleInfo]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def dependency_graph(modules: dict[str, ModuleInfo], include_local: bool = True) -> dict[str, set[str]]:
    """Module -> project modules it imports (a package's `__init__` re-exports are not followed)."""
    graph: dict[str, set[str]] = {}
    for name, info in modules.items():
        targets = set(info.top_level_imports)
        if include_local:
            targets |= {t for _, t in info.local_imports}
        graph[name] = {o for t in targets if (o := _owner(t, modules)) and o != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Level of each module in an acyclic graph: 0 for one importing no project module, else one
    more than the highest level it imports."""
    level: dict[str, int] = {}

    def visit(module: str, path: tuple[str, ...] = ()) -> int:
        if module not in level:
            if module in path:
                raise ValueError(f"import cycle through {module}")
            level[module] = 1 + max((visit(dep, path + (module,)) for dep in graph[module]), default=-1)
        return level[module]

    for module in graph:
        visit(module)
    return level


def private_cross_module_uses(modules: dict[str, ModuleInfo]) -> list[str]:
    """``importer:line -> module.name`` for private names taken from another project module."""
    uses = []
    for name, info in modules.items():
        for line, target, private in info.private_uses:
            owner = _owner(target, modules)
            if owner is not None and owner != name:
                uses.append(f"{name}:{line} -> {owner}.{private}")
    return sorted(set(uses))


def measure(root: Path) -> dict:
    modules = scan(root)
    graph = dependency_graph(modules)
    cycles = import_cycles(graph)
    return {
        "modules": len(modules),
        "total_lines": sum(m.lines for m in modules.values()),
        "largest": sorted(((m.lines, n) for n, m in modules.items()), reverse=True)[:8],
        "import_cycles": cycles,
        "levels": {} if cycles else dict(sorted(levels(graph).items(), key=lambda item: (item[1], item[0]))),
        "function_local_project_imports": sorted(
            {f"{n}:{line} -> {t}" for n, m in modules.items() for line, t in m.local_imports}
        ),
        "private_cross_module_uses": private_cross_module_uses(modules),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--json", action="store_true", help="print the full measurement as JSON")
    args = parser.parse_args(argv)
    result = measure(args.root)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"modules: {result['modules']}, lines: {result['total_lines']}")
    print("largest: " + ", ".join(f"{n} ({lines})" for lines, n in result["largest"]))
    print(f"import cycles: {len(result['import_cycles'])}  {result['import_cycles']}")
    if result["levels"]:
        print("levels: " + ", ".join(f"{n.removeprefix(PACKAGE + '.')}={lvl}" for n, lvl in result["levels"].items()))
    print(f"function-local project imports: {len(result['function_local_project_imports'])}")
    for line in result["function_local_project_imports"]:
        print(f"  {line}")
    print(f"private names used across modules: {len(result['private_cross_module_uses'])}")
    for line in result["private_cross_module_uses"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
